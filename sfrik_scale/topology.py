"""Who am I in the job: rank, world size, local rank, device. One object owns the topology.

Works with every way a run is started:
  * ``deepspeed [--hostfile H] --module sfrik_scale.pretrain`` and ``torchrun``: they set
    RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (the deepspeed launcher also
    passes ``--local_rank``, which the entry point accepts);
  * ``srun python -m sfrik_scale.pretrain`` alone: SLURM_PROCID, SLURM_NTASKS,
    SLURM_LOCALID and the first host of SLURM_JOB_NODELIST are mapped onto those;
  * plain ``sfrik-scale pretrain``: one process, a free loopback port.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, MutableMapping, Optional

import torch

DEFAULT_PORT = 29500


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[003-004,010],cpu1" -> "gpu003"."""
    depth, item = 0, ""
    for ch in nodelist.strip():
        if ch == "," and depth == 0:
            break
        depth += ch == "["
        depth -= ch == "]"
        item += ch
    match = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", item)
    if not match:
        if not item:
            raise ValueError(f"SLURM_JOB_NODELIST {nodelist!r} names no host")
        return item
    prefix, ranges, suffix = match.groups()
    first = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{first}{suffix}"


def node_identity(env: Mapping[str, str] = os.environ) -> tuple[str, int]:
    """(node name, node rank) of this process: SLURM's SLURMD_NODENAME / SLURM_NODEID, the deepspeed
    launcher's CROSS_RANK (the host's position in the hostfile), torchrun's GROUP_RANK; else the
    host name and 0. Under launchers/multi_node.sh the name is the host's name in the hostfile
    (SFRIK_HOSTFILE_HOSTS, the hosts in order, indexed by CROSS_RANK): the name the user gave
    the node, which may differ from its own host name. Named in the rank health records and in
    a failed peer's message."""
    name = env.get("SLURMD_NODENAME") or socket.gethostname()
    for key in ("SLURM_NODEID", "CROSS_RANK", "GROUP_RANK"):
        value = env.get(key, "")
        if value.isdigit():
            hosts = env.get("SFRIK_HOSTFILE_HOSTS", "").split()
            if key == "CROSS_RANK" and not env.get("SLURMD_NODENAME") and int(value) < len(hosts):
                name = hosts[int(value)]
            return name, int(value)
    return name, 0


def quiet_cpu_accelerator(env: MutableMapping[str, str] = os.environ) -> None:
    """Without a visible CUDA device, tell DeepSpeed to use the CPU (``DS_ACCELERATOR=cpu``)
    before it is imported, so that it does not warn on every command (and every rank) that it
    could not find an accelerator. A value the user set is kept; child processes inherit it."""
    if "DS_ACCELERATOR" not in env and not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a single-node rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_launch_env(env: MutableMapping[str, str], local_rank_arg: Optional[int] = None) -> str:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT in ``env`` from whatever started us.

    Returns the launcher's name ("torch" for deepspeed/torchrun, "slurm", or "single").
    """
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = env.get("SFRIK_LAUNCHER", "torch")  # set when we filled the variables ourselves
        env.setdefault("LOCAL_RANK", str(local_rank_arg if local_rank_arg is not None else 0))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        launcher = "slurm"
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        if "MASTER_ADDR" not in env:
            if "SLURM_JOB_NODELIST" not in env:
                raise ValueError("started by srun but SLURM_JOB_NODELIST is not set; set MASTER_ADDR")
            env["MASTER_ADDR"] = first_host(env["SLURM_JOB_NODELIST"])
        env.setdefault("MASTER_PORT", str(DEFAULT_PORT))
    else:
        launcher = "single"
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK=str(local_rank_arg or 0))
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(DEFAULT_PORT))
    if launcher in ("slurm", "single"):
        env["SFRIK_LAUNCHER"] = launcher
    return launcher


@dataclass
class Topology:
    """The process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    launcher: str

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that logs, writes TensorBoard and run-level files."""
        return self.rank == 0

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None, launcher: str = "torch") -> "Topology":
        env = os.environ if env is None else env
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
        return cls(rank, world, local, device, launcher)


def init_distributed(local_rank_arg: Optional[int] = None, timeout_s: float = 1800.0) -> Topology:
    """Resolve the launcher's environment, start DeepSpeed's communication backend, return the topology.

    NCCL on CUDA, gloo on CPU. ``timeout_s`` bounds every collective, so a dead rank
    cannot hang the others forever.
    """
    import deepspeed

    launcher = resolve_launch_env(os.environ, local_rank_arg)
    topo = Topology.from_env(os.environ, launcher)
    if topo.device.type == "cuda":
        torch.cuda.set_device(topo.device)
    backend = "nccl" if topo.device.type == "cuda" else "gloo"
    if topo.device.type == "cpu":
        _skip_cpu_shm_op()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                               timeout=timedelta(seconds=timeout_s))
    quiet_deepspeed(topo.rank)
    return topo


def quiet_deepspeed(rank: int) -> None:
    """DeepSpeed logs on every rank; keep its warnings on rank 0 and only errors elsewhere."""
    import logging

    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING if rank == 0 else logging.ERROR)


def _skip_cpu_shm_op() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory all-reduce op at start-up.

    On the cpu accelerator, DeepSpeed's torch backend builds ``deepspeed_shm_comm`` when it
    starts; the op only serves ``inference_all_reduce`` (training collectives go through
    gloo), but compiling it costs about a minute each time its cached build is invalidated,
    which launcher and plain starts do alternately. Marking it incompatible skips the build.
    """
    try:
        import deepspeed.ops as ops
    except ImportError:  # pragma: no cover
        return
    compatible = getattr(ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False
