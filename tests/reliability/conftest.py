"""Options of the reliability suite.

    pytest tests/reliability -q                 # short form (CI): a few kill trials
    pytest tests/reliability -q --long          # long form: 40 kill trials (about 15-20 minutes)
    TRAINER_ENGINE_LONG=1 pytest tests -q       # the same, with every other suite's long form

`--long` is registered in tests/conftest.py. `--reliability-seed` (or RELIABILITY_SEED) changes
the seed of the kill moments; the statistics record which seed ran.
"""

from __future__ import annotations

import os

import pytest

from helpers import long_form as long_form_requested

DEFAULT_SEED = 20250607


def pytest_addoption(parser):
    group = parser.getgroup("reliability")
    group.addoption("--reliability-seed", type=int, default=None,
                    help=f"seed of the kill moments (default {DEFAULT_SEED}, or $RELIABILITY_SEED)")


@pytest.fixture(scope="session")
def long_form() -> bool:
    """True for the long form: `--long` or TRAINER_ENGINE_LONG=1."""
    return long_form_requested()


@pytest.fixture(scope="session")
def reliability_seed(pytestconfig) -> int:
    seed = pytestconfig.getoption("--reliability-seed", default=None)
    if seed is None:
        seed = int(os.environ.get("RELIABILITY_SEED", DEFAULT_SEED))
    return int(seed)
