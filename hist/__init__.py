"""hist: independent subnetwork training (ResIST) of ResNets with Horovod and MPI.

`hist.IST` and `hist.LocalSGD` put it in your own training loop (docs/api.md); they are imported
on first use, so `import hist` itself stays cheap and starts no engine."""

__version__ = "0.1.0"

_API = ("IST", "LocalSGD")


def __getattr__(name):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'hist' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API])
