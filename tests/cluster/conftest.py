"""Session fixtures of the `cluster` tests: the two-node SLURM + ssh cluster of harness.py, brought
up once (installing Debian's packages when missing) and stopped at the end if this session
started it; skipped with one line when that is impossible here (not root, no apt-get, a
daemon that does not start)."""
from __future__ import annotations

import pytest

from . import harness
from ._common import reference_run


@pytest.fixture(scope="session")
def cluster():
    was_up = harness.is_up()
    try:
        state = harness.up()
    except (harness.Unavailable, OSError) as err:
        pytest.skip(f"cluster tests skipped: {err}")
    yield state
    if not was_up:
        harness.down()


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """The loss trajectory of the shared configuration on 2 ranks of one node (the deepspeed
    launcher on this machine): what every cluster launch must reproduce."""
    return reference_run(tmp_path_factory.mktemp("reference"))
