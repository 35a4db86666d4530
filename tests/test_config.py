"""Each option is declared once, in `Config`: hist-train's options, validation, a checkpoint's
identity and hist-report's grouping all read that declaration."""

import dataclasses

import pytest

from hist.analysis.report import BOOKKEEPING_OPTIONS
from hist.cli import train
from hist.config import Config, bookkeeping_keys, flag, identity_keys
from hist.errors import HistError

FIELDS = dataclasses.fields(Config)


def test_every_option_says_what_it_is():
    assert all(f.metadata["help"].strip() for f in FIELDS)


def test_hist_train_offers_each_declared_option_with_its_default_and_help():
    offered = {p.name: p for p in train.params if p.name not in ("preset", "debug", "dataset")}
    assert set(offered) == {f.name for f in FIELDS if f.metadata["cli"]}
    for f in FIELDS:
        if not f.metadata["cli"]:
            continue
        p = offered[f.name]
        assert p.help == f.metadata["help"] and flag(f.name) in p.opts
        assert p.default == (None if f.name == "arch" else f.default), f.name  # arch: the dataset's
        if f.metadata["choices"]:
            assert tuple(p.type.choices) == f.metadata["choices"]


@pytest.mark.parametrize("field", [f for f in FIELDS if f.metadata["choices"]], ids=lambda f: f.name)
def test_validate_refuses_a_value_outside_each_declared_choice(field):
    cfg = dataclasses.replace(Config(), **{field.name: "nonsense"})
    with pytest.raises(
        HistError, match=f"^{flag(field.name)} 'nonsense': choose one of {field.metadata['choices'][0]}"
    ):
        cfg.validate()


def test_identity_and_bookkeeping_come_from_the_declaration():
    keys = identity_keys()
    assert {"method", "subnets", "local_iters", "data_split", "seed", "shared_precision"} <= set(keys)
    assert "epochs" not in keys and "out" not in keys  # a longer run, or a moved file, may resume
    assert (
        BOOKKEEPING_OPTIONS == bookkeeping_keys() and "out" in BOOKKEEPING_OPTIONS and "lr" not in BOOKKEEPING_OPTIONS
    )
