"""launchers/multi_node.sh for real: DeepSpeed's pdsh runner over ssh onto two "nodes"
(loopback aliases with their own sshd), and the hostfile inputs it must refuse."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from ._common import CONFIG, LAUNCHERS, STEPS, env, probed, rank_records, summary
from . import harness
from .harness import NODES, UNREACHABLE

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.distributed]
LAUNCH = str(LAUNCHERS / "multi_node.sh")


def launch(cwd: Path, hostfile: str, *args: str, extra_env: dict | None = None, timeout: float = 300,
           probe: Path | None = None) -> subprocess.CompletedProcess:
    (cwd / "hosts").write_text(hostfile)
    e = env(probe)
    e.update(extra_env or {})
    return subprocess.run([LAUNCH, "hosts", *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)


def test_two_nodes_over_ssh_reproduce_the_single_node_launch(cluster, reference, tmp_path):
    """World 2, one rank per node through ssh, ZeRO 2, bf16: the same losses as 2 ranks on one node."""
    probe = tmp_path / "probe"
    # what reaches the remote ranks: the .deepspeed_env lines (blank and comment lines skipped)
    (tmp_path / ".deepspeed_env").write_text(f"# forwarded\n\nSFRIK_ENV_PROBE={probe / 'records'}\n")
    start = time.time()
    proc = launch(tmp_path, "node1 slots=1\nnode2 slots=1\n", *CONFIG, "train.run_dir=run",
                  extra_env={"FORWARD_ENV": "SFRIK_TEST_MARK", "SFRIK_TEST_MARK": "forwarded by name"}, probe=probe)
    elapsed = time.time() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    run = tmp_path / "run"  # relative: the remote processes cd to the launch directory
    assert summary(run)["final_step"] == STEPS
    assert summary(run)["loss_history"] == reference  # bit for bit
    assert "2 (torch)" in out
    # each rank ran in a process started through its node's sshd, with the forwarded environment
    ranks = {int(r["env"]["RANK"]): r for r in probed(probe) if "RANK" in r["env"]}  # not the launchers
    assert sorted(ranks) == [0, 1], [r["argv"] for r in probed(probe)]
    for rank, node in enumerate(NODES):
        e = ranks[rank]["env"]
        assert e["SSH_CONNECTION"].split()[2] == NODES[node], e.get("SSH_CONNECTION")
        assert (e["CROSS_RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"], e["MASTER_ADDR"]) == (str(rank), "0", "2", "node1")
        assert e["SFRIK_TEST_MARK"] == "forwarded by name"
        assert e.get("VIRTUAL_ENV") == env().get("VIRTUAL_ENV")
        assert e["PATH"].split(":")[0] == env()["PATH"].split(":")[0]  # the launcher's PATH, not the ssh default
        assert str(tmp_path) in e["PYTHONPATH"].split(":")
    records = rank_records(run)
    assert [(records[r]["rank"], records[r]["node_rank"]) for r in (0, 1)] == [(0, 0), (1, 1)]
    print(f"2 nodes over ssh, {STEPS} steps: {elapsed:.1f} s")


# ------------------------------------------------------------------ bad input: one line, status 2, bounded time
BAD_HOSTFILES = [
    ("node1 slots=1\nnode2\n", "line 2: expected '<host> slots=<N>', got 'node2'"),
    ("node1 slots=1\nnode2 slots=two\n", "line 2: expected '<host> slots=<N>'"),
    ("node1 slots=0\nnode2 slots=1\n", "line 1: slots must be >= 1, got slots=0 for node1"),
    ("node1 slots=1\nnode1 slots=1\n", "line 2: host node1 is listed twice"),
    ("# only comments\n\n", "no host found in hosts"),
    ("node1 slots=20\nnode2 slots=20\n", "train.global_batch_size: 32 is smaller than the world size 40"),
    ("node1 slots=1\nnode2 slots=2\n", "train.global_batch_size: 32 is not divisible by the world size 3"),
]


@pytest.mark.parametrize("hostfile, message", BAD_HOSTFILES)
def test_a_bad_hostfile_is_one_line(cluster, tmp_path, hostfile, message):
    proc = launch(tmp_path, hostfile, *CONFIG, "train.run_dir=run", timeout=60)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()


def test_an_unreachable_host_is_one_line_in_bounded_time(cluster, tmp_path):
    name = next(iter(UNREACHABLE))  # resolves to a loopback alias where no sshd listens
    start = time.time()
    proc = launch(tmp_path, f"node1 slots=1\n{name} slots=1\n", *CONFIG, "train.run_dir=run", timeout=60)
    elapsed = time.time() - start
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot reach {name} over ssh" in lines[0] and "refused" in lines[0], proc.stderr
    assert elapsed < 15, elapsed
    assert not (tmp_path / "run").exists()


def test_a_host_that_never_answers_is_one_line_within_the_ssh_timeout(cluster, tmp_path):
    """A listener that accepts and says nothing (a hung machine): bounded by SSH_TIMEOUT, never a hang."""
    addr = next(iter(UNREACHABLE.values()))
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((addr, 22))
    server.listen(8)
    held = []

    def hold() -> None:  # accept and say nothing, until the test closes the listener
        try:
            for _ in range(8):
                held.append(server.accept())
        except OSError:
            pass

    threading.Thread(target=hold, daemon=True).start()
    try:
        start = time.time()
        proc = launch(tmp_path, f"node1 slots=1\n{next(iter(UNREACHABLE))} slots=1\n", *CONFIG, "train.run_dir=run",
                      extra_env={"SSH_TIMEOUT": "2"}, timeout=60)
        elapsed = time.time() - start
    finally:
        server.close()
        for conn, _ in held:
            conn.close()
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach node3 over ssh" in lines[0], proc.stderr
    assert elapsed < 2 + 5 + 8, elapsed  # SSH_TIMEOUT + the hard bound's margin + the config check


# ------------------------------------------------------------------ a node lost mid-run
def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            kids = []
        out += kids
        todo += kids
    return out


def _node_tree(probe: Path, addr: str) -> list[int]:
    """Every process a node runs for the job: the processes under the sshd session that the
    launcher's ssh opened on `addr` (the session itself, the shell, DeepSpeed's per-node
    launcher, the ranks), found from the probe records of the Python processes started there."""
    daemons = {v["pid"] for v in harness._pids().values()}
    tops = set()
    for rec in probed(probe):
        conn = rec["env"].get("SSH_CONNECTION", "").split()
        if len(conn) < 3 or conn[2] != addr or not _alive(rec["pid"]):
            continue
        top = rec["pid"]
        while _ppid(top) not in daemons and _ppid(top) > 1:  # up to the child of node2's sshd listener
            top = _ppid(top)
        assert _ppid(top) in daemons, f"no sshd listener above {rec['pid']}"
        tops.add(top)
    return sorted({p for t in tops for p in (t, *_descendants(t))})


def test_a_node_killed_mid_run_stops_the_job_and_the_same_command_resumes(cluster, tmp_path):
    """SIGKILL of every process of node 2 (rank 1) after a complete checkpoint: rank 0 stops
    within train.peer_timeout_s with one line naming rank 1, its pid and node; the launcher
    exits non-zero with nothing left running; the same command resumes from the last complete
    checkpoint and finishes."""
    from sfrik_scale.checkpoint import latest_complete

    peer_timeout = 10
    probe = tmp_path / "probe"
    (tmp_path / ".deepspeed_env").write_text(f"SFRIK_ENV_PROBE={probe / 'records'}\n")
    (tmp_path / "hosts").write_text("node1 slots=1\nnode2 slots=1\n")
    args = [LAUNCH, "hosts", *CONFIG, "train.run_dir=run", f"train.peer_timeout_s={peer_timeout}",
            "train.checkpoint_every_steps=10"]
    run = tmp_path / "run"
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(args, cwd=tmp_path, env=env(probe), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while latest_complete(run) is None:
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "no complete checkpoint within 120 s"
            time.sleep(0.1)
        ranks = {int(r["env"]["RANK"]): r["pid"] for r in probed(probe) if "RANK" in r["env"]}
        node2 = _node_tree(probe, NODES["node2"])
        assert ranks[1] in node2 and ranks[0] not in node2, (ranks, node2)
        records = rank_records(run)
        killed = time.time()
        for pid in node2:
            os.kill(pid, signal.SIGKILL)
        while _alive(ranks[0]) and time.time() < killed + peer_timeout + 10:
            time.sleep(0.1)
        rank0_s = time.time() - killed
        code = proc.wait(timeout=peer_timeout + 30)
        launcher_s = time.time() - killed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    out = (tmp_path / "first.log").read_text()
    assert rank0_s < peer_timeout + 3, (rank0_s, out[-3000:])
    assert code != 0, out[-3000:]
    assert launcher_s < peer_timeout + 20, (launcher_s, out[-3000:])
    named = [line for line in out.splitlines() if "rank 1 failed" in line]
    assert named, out[-3000:]
    assert records[1]["node"] == "node2"  # the hostfile's name (both "nodes" share one host name here)
    where = f"pid {ranks[1]} on node2 (host {records[1]['host']}, node rank 1)"
    assert where in named[0], named[0]
    left = [r["pid"] for r in probed(probe) if _alive(r["pid"])]
    assert not left, f"still running after the launcher exited: {left}"
    tag = latest_complete(run)

    start = time.time()
    again = subprocess.run(args, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    resumed = [line for line in (again.stdout + again.stderr).splitlines() if "resumed" in line]
    assert resumed and f"from {tag} " in resumed[0], resumed
    assert summary(run)["final_step"] == STEPS
    print(f"node 2 killed after {tag}: rank 0 out in {rank0_s:.1f} s, launcher (exit {code}) in "
          f"{launcher_s:.1f} s; resumed run {time.time() - start:.1f} s; rank 0 said: {named[0].strip()}")
