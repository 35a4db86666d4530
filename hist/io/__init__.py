"""Files a run writes: the HDF5 timing file, checkpoints, and the lock that keeps two runs apart."""
