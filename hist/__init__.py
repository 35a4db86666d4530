"""hist: independent subnetwork training (ResIST) of ResNets with Horovod and MPI."""

__version__ = "0.1.0"
