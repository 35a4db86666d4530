"""User-facing errors: one line saying what is wrong, where, and what to do."""


class HistError(Exception):
    """An error caused by input or environment, reported without a traceback."""
