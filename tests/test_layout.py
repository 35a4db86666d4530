"""The architecture, checked: lower floors never import higher ones, and only the
communication floor knows Horovod and MPI."""

import ast

from helpers import ROOT

HIST = ROOT / "hist"
# What each part of hist may import from hist (besides itself).
ALLOWED = {
    "errors": set(),
    "choices": set(),
    "world": {"errors"},
    "config": {"errors", "choices"},
    "presets": {"errors"},
    "models": set(),
    "data": {"choices", "errors"},
    "io": {"errors"},
    "comm": {"errors", "world", "models"},
    "methods": {"choices", "comm", "config", "errors", "models"},
    # the round loop drives hist-train through hist.IST's session (`api`)
    "engine": {"api", "comm", "config", "data", "errors", "methods", "models"},
    "analysis": {
        "choices",
        "comm",
        "config",
        "data",
        "engine",
        "errors",
        "io",
        "methods",
        "models",
        "presets",
        "world",
    },
    "launch": {
        "api",
        "choices",
        "comm",
        "config",
        "data",
        "engine",
        "errors",
        "io",
        "methods",
        "models",
        "world",
        "__init__",
    },
    "cli": {"analysis", "choices", "comm", "config", "errors", "launch", "presets", "world"},
    # hist.IST and hist.LocalSGD: hist's methods and synchronisers in the user's own loop
    "api": {"choices", "comm", "config", "errors", "methods", "models", "world"},
    "__init__": {"api"},  # imported on first use of hist.IST, so `import hist` stays cheap
}


def part_of(path):
    rel = path.relative_to(HIST)
    return rel.parts[0].removesuffix(".py")


def hist_imports(path):
    """(part imported, line) for every import of hist from `path`, relative or absolute."""
    tree = ast.parse(path.read_text())
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]  # ("hist", "engine") for hist/engine/loop.py
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = (*base, *(node.module.split(".") if node.module else ()))
                names = [target] if node.module else [(*base, a.name) for a in node.names]
            else:
                names = [tuple(node.module.split("."))] if node.module else []
            for t in names:
                if t[:1] == ("hist",):  # hist.__version__ and the like belong to hist/__init__.py
                    yield (t[1] if len(t) > 1 and not t[1].startswith("__") else "__init__"), node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                t = a.name.split(".")
                if t[0] == "hist":
                    yield (t[1] if len(t) > 1 else "__init__"), node.lineno


def test_lower_floors_never_import_higher_ones():
    wrong = []
    for path in sorted(HIST.rglob("*.py")):
        part = part_of(path)
        for target, line in hist_imports(path):
            if target != part and target not in ALLOWED[part]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports hist.{target}")
    assert not wrong, wrong


def test_only_the_communication_floor_imports_horovod_mpi4py_or_torch_distributed():
    wrong = []
    for path in sorted(HIST.rglob("*.py")):
        if part_of(path) == "comm":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            mods = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else (
                    [f"{node.module}.{a.name}" for a in node.names]  # from torch import distributed
                    if isinstance(node, ast.ImportFrom) and node.module and not node.level
                    else []
                )
            )
            wrong += [
                f"{path.relative_to(ROOT)}:{node.lineno} {m}"
                for m in mods
                if m.split(".")[0] in ("horovod", "mpi4py") or m.startswith("torch.distributed")
            ]
    assert not wrong, wrong


def test_every_part_of_hist_is_placed():
    assert {part_of(p) for p in HIST.rglob("*.py")} == set(ALLOWED)


def test_a_test_that_launches_ranks_unmarked_is_stopped():
    """`make test` runs the tests of one process two at a time: one that starts ranks must be
    marked (helpers.check_marked), or it would share the cores it was written to have."""
    import pytest

    import helpers

    saved = helpers.MARKS
    try:
        helpers.MARKS = set()
        with pytest.raises(AssertionError, match="launches ranks .*mark it multiprocess"):
            helpers.check_marked(["/usr/bin/mpirun", "-np", "2"])
        helpers.check_marked(["hist-report", "x.h5"])  # one process: no marker needed
        helpers.MARKS = {"multiprocess"}
        helpers.check_marked(["torchrun", "--nproc-per-node", "2"])
    finally:
        helpers.MARKS = saved
