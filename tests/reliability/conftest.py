"""Options of the reliability suite.

    pytest tests/reliability -q                 # short form (CI): a few kill trials
    pytest tests/reliability -q --long          # long form: 40 kill trials (about 15-20 minutes)
    RELIABILITY_LONG=1 pytest tests -q          # the same, when this folder is not on the command line

`--long` is registered only when pytest starts in (or is pointed at) this folder; from the
repository root use the environment variable. `--reliability-seed` (or RELIABILITY_SEED) changes
the seed of the kill moments; the statistics record which seed ran.
"""

from __future__ import annotations

import os

import pytest

DEFAULT_SEED = 20250607


def pytest_addoption(parser):
    group = parser.getgroup("reliability")
    group.addoption("--long", action="store_true", default=False,
                    help="run the long form of the reliability suite (40 kill trials)")
    group.addoption("--reliability-seed", type=int, default=None,
                    help=f"seed of the kill moments (default {DEFAULT_SEED}, or $RELIABILITY_SEED)")


@pytest.fixture(scope="session")
def long_form(pytestconfig) -> bool:
    """True for the long form: `--long` or RELIABILITY_LONG=1."""
    return bool(pytestconfig.getoption("--long", default=False)) or \
        os.environ.get("RELIABILITY_LONG", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def reliability_seed(pytestconfig) -> int:
    seed = pytestconfig.getoption("--reliability-seed", default=None)
    if seed is None:
        seed = int(os.environ.get("RELIABILITY_SEED", DEFAULT_SEED))
    return int(seed)
