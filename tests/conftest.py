"""Fixtures and markers shared by the tests (helpers live in helpers.py)."""

import os
from pathlib import Path

import pytest

import helpers
from helpers import sample_dir


@pytest.fixture(autouse=True)
def _markers(request):
    """The running test's markers, for helpers.check_marked."""
    helpers.MARKS = {m.name for m in request.node.iter_markers()}


@pytest.fixture
def cifar_sample():
    path = sample_dir()
    if path is None:
        pytest.skip("HIST_TEST_DATA does not point at the CIFAR-10 sample (make test sets it)")
    return path


@pytest.fixture
def image_sample():
    """The real Imagewoof sample (800 ImageNet JPEGs in class folders) named by HIST_TEST_IMAGES."""
    path = os.environ.get("HIST_TEST_IMAGES")
    if not path or not (Path(path) / "train").is_dir():
        pytest.skip("HIST_TEST_IMAGES does not point at the Imagewoof sample (make test sets it)")
    return Path(path)


def pytest_collection_modifyitems(items):
    """Tests on the private Slurm are slow by nature; mark them so `-m "not slow"` skips them."""
    for item in items:
        if "slurm" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slurm)
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """finished_run(*ARGS): the timing file of `hist-train ARGS` at 2 ranks, run once a session,
    for the tests that compare their own runs with the same plain one (test_noise, test_train)."""
    from helpers import BIN, mpirun

    made = {}

    def get(*args):
        key = tuple(str(a) for a in args)
        if key not in made:
            out = tmp_path_factory.mktemp("finished") / "run.h5"
            mpirun(2, BIN / "hist-train", *key, "--out", out)
            made[key] = out
        return made[key]

    return get
