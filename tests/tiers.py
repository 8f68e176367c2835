"""The ``slow`` tier as data: which parametrized cases the quick loop (``pytest -m "not slow"``) leaves out."""
import pytest

SLOW = pytest.mark.slow
QUICK_RANKS = 2   # this machine has 2 cores: more ranks oversubscribe them (correct, but slow to start and run)


def by_ranks(cases, ranks=lambda case: case[0], ids=None):
    """``pytest.param`` of each case tuple; cases of more than QUICK_RANKS ranks are marked slow."""
    ids = ids or [None] * len(cases)
    return [pytest.param(*c, id=i, marks=() if ranks(c) <= QUICK_RANKS else SLOW) for c, i in zip(cases, ids)]
