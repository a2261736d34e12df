"""Rank health: heartbeats, failure records and a watchdog, so that no rank waits forever.

Every rank keeps a small JSON record in ``RUN_DIR/.ranks/SESSION/rank{r}.json`` (pid, host,
step, last heartbeat, status), refreshed by a daemon thread. The same thread watches the
other ranks' records: when a peer has recorded a failure, or its heartbeat is older than
``peer_timeout_s`` (a SIGKILL, a lost node), it prints which rank failed and why, and ends
this process with ``os._exit(1)``: that works even while the main thread is blocked in a
collective that would otherwise hang until the backend's timeout. A rank that raises
records the error first, so its peers name it within one heartbeat interval.

The run directory is on a file system all nodes share (checkpoints need that anyway).
SESSION is agreed through the process group at start, so records of earlier attempts in
the same run directory are never mistaken for live ones.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

from . import comm
from .errors import RaisedOnEveryRank
from .topology import node_identity

HEALTH_DIR = ".ranks"
#: a rank's record is rewritten when its step changes, at most this often (besides the heartbeats)
STEP_RECORD_INTERVAL_S = 1.0
FAILED_EXIT_CODE = 1


class RankHealth:
    """This rank's heartbeat and the watchdog over its peers.

    Args:
        run_dir: the run directory.
        rank, world_size: this process's place.
        peer_timeout_s: a peer whose heartbeat is older than this is taken as dead.
        interval_s: heartbeat and check period.
    """

    def __init__(self, run_dir: Path, rank: int, world_size: int, peer_timeout_s: float,
                 interval_s: Optional[float] = None) -> None:
        self.rank, self.world_size = rank, world_size
        self.peer_timeout_s = float(peer_timeout_s)
        self.interval_s = interval_s or max(0.5, min(5.0, self.peer_timeout_s / 6))
        session = comm.all_gather_objects(uuid.uuid4().hex[:12])[0]  # rank 0's id, agreed by all
        root = Path(run_dir) / HEALTH_DIR
        self.dir = root / session
        self.dir.mkdir(parents=True, exist_ok=True)
        if rank == 0:  # records of earlier attempts
            for old in root.iterdir():
                if old.is_dir() and old != self.dir:
                    shutil.rmtree(old, ignore_errors=True)
        self._lock = threading.Lock()
        node, node_rank = node_identity()
        self.record = {"rank": rank, "pid": os.getpid(), "host": socket.gethostname(), "node": node,
                       "node_rank": node_rank, "local_rank": int(os.environ.get("LOCAL_RANK", "0") or 0),
                       "step": 0, "status": "running", "time": time.time(), "error": None}
        self._write()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sfrik-rank-health", daemon=True)
        self._started = time.time()
        if world_size > 1:
            self._thread.start()

    # -- own record -------------------------------------------------------------------
    def _path(self, rank: int) -> Path:
        return self.dir / f"rank{rank}.json"

    def _write(self) -> None:
        with self._lock:  # the heartbeat thread and set_step share the temporary file
            self._write_locked()

    def _write_locked(self) -> None:
        self.record["time"] = time.time()
        path = self._path(self.rank)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(json.dumps(self.record))
            os.replace(tmp, path)
        except OSError:  # a full or read-only disk must not kill training; the checkpoint code reports it
            pass

    def set_step(self, step: int) -> None:
        """The step this rank reached; written at most once per `STEP_RECORD_INTERVAL_S` (besides
        the heartbeats), so that a peer's failure message names a step less than a second old."""
        self.record["step"] = int(step)
        if self.world_size > 1 and time.time() - self.record["time"] >= STEP_RECORD_INTERVAL_S:
            self._write()

    def mark(self, status: str, error: Optional[str] = None) -> None:
        """Record this rank's end: "finished", "preempted" or "failed" (with the error)."""
        self.record["status"], self.record["error"] = status, error
        self._write()

    # -- peers ------------------------------------------------------------------------
    def _read(self, rank: int) -> Optional[dict]:
        try:
            return json.loads(self._path(rank).read_text())
        except (OSError, ValueError):
            return None

    def failed_peers(self) -> list[tuple[int, str]]:
        """(rank, reason) for each peer that recorded a failure or stopped beating."""
        now, out = time.time(), []
        for r in range(self.world_size):
            if r == self.rank:
                continue
            rec = self._read(r)
            if rec is None:
                if now - self._started > self.peer_timeout_s:
                    out.append((r, f"no heartbeat since this rank started {now - self._started:.0f} s ago"))
                continue
            node, host = rec.get("node") or rec.get("host"), rec.get("host")
            also = f"host {host}, " if host and host != node else ""  # a hostfile alias: name both
            where = f"pid {rec.get('pid')} on {node} ({also}node rank {rec.get('node_rank', 0)})"
            if rec.get("status") == "failed":  # recorded as it raised: the step is exact
                out.append((r, f"raised: {rec.get('error')} ({where}, at step {rec.get('step')})"))
                continue
            where += f", last heard at step {rec.get('step')} {now - rec.get('time', now):.0f} s ago"
            if rec.get("status") == "running" and rec.get("host") == self.record["host"] \
                    and not _pid_alive(rec.get("pid")):
                out.append((r, f"process gone without a word, killed? ({where})"))
            elif rec.get("status") == "running" and now - rec.get("time", now) > self.peer_timeout_s:
                out.append((r, f"no heartbeat for {now - rec['time']:.0f} s, killed or hung? ({where})"))
        return out

    def describe(self) -> str:
        """A sentence naming the failed peers, or '' when all look alive."""
        bad = self.failed_peers()
        return "; ".join(f"rank {r} failed: {why}" for r, why in bad)

    def wait_for_culprit(self) -> str:
        """After a collective failed: name the failed peer, waiting at most one peer timeout
        for its record to say so (a raising rank records its error at once; a killed one
        goes stale). Returns '' if every peer still looks alive."""
        deadline = time.time() + self.peer_timeout_s + 2 * self.interval_s
        while True:
            text = self.describe()
            if text or time.time() > deadline:
                return text
            time.sleep(min(self.interval_s, 1.0))

    def peers_to_blame(self, err: BaseException) -> str:
        """After this rank raised ``err``: a sentence naming the peers that failed first, or ''.

        One process, or an error every rank raises alike: nobody else to blame. A broken
        collective (`comm.is_communication_error`): wait for the peer that left to be named. Any
        other error of this rank: the peers that have already failed, if any.
        """
        if self.world_size == 1 or isinstance(err, RaisedOnEveryRank):
            return ""  # every rank says the same: no peer to blame
        if comm.is_communication_error(err):
            return self.wait_for_culprit()  # our collective broke: who left?
        return self.describe()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._write()
            bad = self.failed_peers()
            if bad and self.record["status"] == "running":
                text = "; ".join(f"rank {r} failed: {why}" for r, why in bad)
                print(f"sfrik-scale: rank {self.rank}: stopping because {text}", file=sys.stderr, flush=True)
                self.mark("aborted", text)
                os._exit(FAILED_EXIT_CODE)  # the main thread may be stuck in a collective

    def close(self, status: str = "finished") -> None:
        self._stop.set()
        if self.record["status"] == "running":
            self.mark(status)


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, TypeError, ValueError):
        return False
    return True
