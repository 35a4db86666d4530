"""Analysis: the report (tables, figures), the projection, hist-bench and the accuracy suite."""
