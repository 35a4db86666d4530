"""torch's SGD, without the 1.5-2 s import of torch._dynamo that its first step costs each rank.

torch.optim wraps `step` (and `add_param_group`, `zero_grad`, `state_dict`, `load_state_dict`)
to keep torch.compile out of them; the wrappers import torch._dynamo on first use, although
nothing compiles in hist-train. Every rank of every run paid that at start-up, and a test suite
that starts hundreds of ranks paid it hundreds of times. `SGD` steps through torch's own
update under no_grad (what the wrapper does outside torch.compile), and `skip_dynamo_wrappers`
marks the Optimizer's wrappers as resolved to the methods themselves. Where a torch release
builds these differently, both leave torch as it is: the numbers never change, only the start-up.
"""

from __future__ import annotations

import torch

_RAW_STEP = getattr(torch.optim.SGD.step, "__wrapped__", None)


def skip_dynamo_wrappers() -> None:
    """For a process that never compiles (hist-train): torch.optim.Optimizer's dynamo-disabled
    methods run as they are, without importing torch._dynamo to disable it first."""
    try:
        from torch._compile import _disable_dynamo
    except ImportError:
        return
    wrapper = _disable_dynamo(lambda: None).__code__
    for f in vars(torch.optim.Optimizer).values():
        if getattr(f, "__code__", None) is wrapper and f.__closure__:
            cells = dict(zip(f.__code__.co_freevars, f.__closure__))
            if "fn" in cells:
                fn = cells["fn"].cell_contents
                setattr(fn, "__dynamo_disable", fn)  # torch's cache of the disabled function


class SGD(torch.optim.SGD):
    """torch.optim.SGD with the same update, bit for bit (tests/test_train.py)."""

    def step(self, closure=None):
        if _RAW_STEP is None:
            return super().step(closure)
        with torch.no_grad():
            return _RAW_STEP(self, closure)
