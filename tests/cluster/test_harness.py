"""The harness itself: both SLURM nodes answer under srun, both sshd under ssh, and `up` is idempotent."""
from __future__ import annotations

import json
import subprocess

import pytest

from . import harness

pytestmark = pytest.mark.cluster


def test_up_is_idempotent_and_both_nodes_answer(cluster):
    before = json.loads((cluster / "pids.json").read_text())
    assert harness.up() == cluster and json.loads((cluster / "pids.json").read_text()) == before
    proc = subprocess.run(["srun", "-N2", "-n2", "-l", "bash", "-c", "echo $SLURMD_NODENAME $SLURM_JOB_NODELIST"],
                          env=harness.env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.split("\n")[:2]) == ["0: node1 node[1-2]", "1: node2 node[1-2]"], proc.stdout
    for node, addr in harness.NODES.items():
        proc = subprocess.run(["ssh", node, "echo $SSH_CONNECTION"], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0 and proc.stdout.split()[2] == addr, proc.stderr
