"""Fixtures and markers shared by the tests (helpers live in helpers.py)."""

import pytest

from helpers import sample_dir


@pytest.fixture
def cifar_sample():
    path = sample_dir()
    if path is None:
        pytest.skip("HIST_TEST_DATA does not point at the CIFAR-10 sample (make test sets it)")
    return path


def pytest_collection_modifyitems(items):
    """Tests on the private Slurm are slow by nature; mark them so `-m "not slow"` skips them."""
    for item in items:
        if "slurm" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slurm)
            item.add_marker(pytest.mark.slow)
