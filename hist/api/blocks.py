"""The blocks of a user's model that IST partitions: checked, made switchable without editing
their classes, and the view of the model that hist's methods train through (`Switchboard`).

A block is switched by replacing its instance's `forward` (the class, its parameters and its
state_dict keys stay as they are): an inactive block returns its input untouched, an active one
its own output, and at evaluation `s * block(x) + (1 - s) * x`, which for a block computing
x + f(x) is x + s * f(x): the residual branch scaled by the block's probability of being trained.
hist's own blocks (`models.SwitchableBlock`) switch and scale themselves, so they are switched
through their own `active` and `scale`, and hist-train's model computes as it always has.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from ..errors import ArgumentTypeError, BlockError
from ..models import SwitchableBlock


def _label(names: dict[int, str], module: nn.Module) -> str:
    name = names.get(id(module), "")
    return f"{name or 'the model itself'}, {type(module).__name__}"


def resolve_blocks(who: str, model: nn.Module, blocks) -> tuple[list[nn.Module], dict[int, str]]:
    """The blocks as a list of modules of `model` (modules or their qualified names), and every
    module's name; one line naming the module for each way the list cannot work."""
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(f"{who}: model must be a torch.nn.Module, not {type(model).__name__}")
    names: dict[int, str] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), name)
    if blocks is None:
        raise BlockError(f"{who}: no blocks given; pass the residual modules IST partitions (e.g. model.layers)")
    if isinstance(blocks, (str, nn.Module)) and not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        blocks = [blocks]
    try:
        items = list(blocks)
    except TypeError:
        raise ArgumentTypeError(
            f"{who}: blocks must be a list of modules (or an nn.ModuleList), not {type(blocks).__name__}"
        ) from None
    if not items:
        raise BlockError(f"{who}: no blocks given; pass the residual modules IST partitions (e.g. model.layers)")
    out = []
    for i, b in enumerate(items):
        if isinstance(b, str):
            try:
                b = model.get_submodule(b)
            except AttributeError:
                raise BlockError(f"{who}: blocks[{i}] {items[i]!r} is not a module of the model") from None
        if not isinstance(b, nn.Module):
            raise ArgumentTypeError(f"{who}: blocks[{i}] is a {type(b).__name__}, not a torch.nn.Module")
        if id(b) not in names:
            raise BlockError(
                f"{who}: blocks[{i}] ({type(b).__name__}) is not part of the model; pass modules of the model given"
            )
        out.append(b)
    first: dict[int, int] = {}
    for i, b in enumerate(out):
        if id(b) in first:
            raise BlockError(f"{who}: blocks[{i}] ({_label(names, b)}) is listed twice (also blocks[{first[id(b)]}])")
        first[id(b)] = i
    for i, b in enumerate(out):
        for sub in b.modules():
            j = first.get(id(sub))
            if sub is not b and j is not None:
                raise BlockError(
                    f"{who}: blocks[{j}] ({_label(names, sub)}) is nested inside blocks[{i}] ({_label(names, b)}); "
                    f"list the outer block or the inner ones, not both"
                )
    return out, names


class Switch:
    """One block made switchable through its instance's forward."""

    def __init__(self, who: str, index: int, label: str, module: nn.Module):
        self.who, self.index, self.label, self.module = who, index, label, module
        # Where `active` and `scale` live: hist's own blocks keep them, any other block here.
        self.native = isinstance(module, SwitchableBlock)
        self._state = module if self.native else types.SimpleNamespace()
        self.active = True
        self.scale = 1.0
        self.checked = self.native  # its output's shape against its input's, at its first active forward
        self._own = module.__dict__.get("forward")  # an instance forward set before hist's
        if not self.native:
            self._call = self._own if self._own is not None else types.MethodType(type(module).forward, module)
            module.forward = self.forward

    @property
    def active(self) -> bool:
        return self._state.active

    @active.setter
    def active(self, on: bool) -> None:
        self._state.active = on

    @property
    def scale(self) -> float:
        return self._state.scale

    @scale.setter
    def scale(self, s: float) -> None:
        self._state.scale = s

    def forward(self, *args, **kwargs):
        x = args[0] if args else next(iter(kwargs.values()), None)  # the block's first input
        if not self.active:
            return x
        out = self._call(*args, **kwargs)
        if not self.checked:
            self.check(x, out)
        if self.scale != 1.0:
            return out * self.scale + x * (1.0 - self.scale)
        return out

    def check(self, x, out) -> None:
        where = f"{self.who}: blocks[{self.index}] ({self.label})"
        if not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor):
            raise BlockError(
                f"{where} maps a {type(x).__name__} to a {type(out).__name__}; an IST block takes a tensor "
                f"first and returns a tensor of its shape (x + f(x))"
            )
        if out.shape != x.shape:
            raise BlockError(
                f"{where} returns shape {tuple(out.shape)} for an input of shape {tuple(x.shape)}; an IST block "
                f"computes x + f(x) and keeps its input's shape (leave strided or widening blocks shared)"
            )
        self.checked = True

    def restore(self) -> None:
        """The module's own forward again (hist's own blocks: on, unscaled)."""
        if self.native:
            self.active, self.scale = True, 1.0
        elif self._own is not None:
            self.module.forward = self._own
        else:
            self.module.__dict__.pop("forward", None)


class _Params:
    """A block as hist's methods see it: the parameters of it that the optimizer trains."""

    def __init__(self, params: list[torch.Tensor]):
        self._params = params

    def parameters(self):
        return iter(self._params)


class Switchboard:
    """The model as hist's methods see it (`methods.Method`): the optimizer's parameters in the
    model's order, the blocks (`partitioned_blocks`), and the switches (`set_subnetwork`,
    `set_full`), the interface hist's own PreActResNet offers."""

    def __init__(self, model: nn.Module, switches: list[Switch], trained: list[torch.Tensor]):
        self.model, self.switches = model, switches
        ids = {id(p) for p in trained}
        self._params = [p for p in model.parameters() if id(p) in ids]
        self._blocks = [_Params([p for p in s.module.parameters() if id(p) in ids]) for s in switches]

    def parameters(self):
        return iter(self._params)

    def partitioned_blocks(self) -> list[_Params]:
        return self._blocks

    def set_subnetwork(self, active_blocks) -> None:
        chosen = set(active_blocks)
        for i, s in enumerate(self.switches):
            s.active = i in chosen
            s.scale = 1.0

    def set_full(self, scale: float = 1.0) -> None:
        for s in self.switches:
            s.active = True
            s.scale = scale

    def inactive_params(self) -> list[torch.Tensor]:
        return [p for s, b in zip(self.switches, self._blocks) if not s.active for p in b.parameters()]


def check_parameters(who: str, model: nn.Module, blocks: list[nn.Module], names, optimizer) -> list[torch.Tensor]:
    """The parameters the optimizer trains, all of them the model's; each block owns some, and
    no two blocks share one."""
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    in_model = {id(p) for p in model.parameters()}
    stray = next((p for p in trained if id(p) not in in_model), None)
    if stray is not None:
        raise BlockError(
            f"{who}: the optimizer holds a tensor of shape {tuple(stray.shape)} that is not a parameter of "
            f"the model; build the optimizer over model.parameters()"
        )
    ids = {id(p) for p in trained}
    owner: dict[int, int] = {}
    for i, b in enumerate(blocks):
        mine = [p for p in b.parameters() if id(p) in ids]
        if not mine:
            raise BlockError(f"{who}: blocks[{i}] ({_label(names, b)}) has no parameter the optimizer trains")
        for p in mine:
            if id(p) in owner:
                raise BlockError(
                    f"{who}: blocks[{i}] ({_label(names, b)}) shares a parameter with blocks[{owner[id(p)]}]; "
                    f"blocks trained apart cannot share weights"
                )
            owner[id(p)] = i
    return trained
