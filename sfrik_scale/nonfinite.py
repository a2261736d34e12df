"""Non-finite training: the agreed checks and the diagnostic a person reads afterwards.

A NaN or Inf in the loss, the gradients or the parameters is detected on every rank
together (each check ends in one small all-reduce), so that all ranks take the same branch
of ``train.on_nonfinite``: "stop" raises `NonFiniteLossError` after writing
``RUN_DIR/nonfinite.json``; "skip" drops the update and appends the same report to
``RUN_DIR/nonfinite.jsonl``. Parameters are checked before every checkpoint, so a
non-finite state is never written over the last good one (`NonFiniteStateError`).

Distributed: `parameters_finite`, `gradients_finite` (all-reduce of one flag) and
`nonfinite_report` (all-gather of a small dict per rank) are collectives: every rank calls
them at the same point. Without a process group they act on this process alone.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Tuple

import torch

from . import comm
from .storage import atomic_write_text


class NonFiniteLossError(RuntimeError):
    """The loss became non-finite and ``train.on_nonfinite`` is "stop"."""


class NonFiniteStateError(RuntimeError):
    """The parameters became non-finite; nothing was checkpointed over the last good state."""


def embedding_stats(z: torch.Tensor) -> dict:
    """What a (batch, q) embedding looked like: non-finite values and rows, row norms, per-dimension std."""
    z = z.detach().float()
    finite = torch.isfinite(z)
    norms = torch.where(finite, z, torch.zeros_like(z)).norm(dim=1)
    return {"nonfinite_values": int((~finite).sum()), "rows_with_nonfinite": int((~finite).any(1).sum()),
            "row_norm_mean": float(norms.mean()), "row_norm_max": float(norms.max()),
            "per_dim_std_mean": float(torch.nan_to_num(z).std(0).mean())}


def nonfinite_report(result: dict, *, rank: int, step: int, epoch: int, policy: str) -> dict:
    """Which rank, which loss term, what the embeddings looked like (collective).

    ``result``: the trainer's micro-step result (``local_loss``, ``out``: the loss outputs or
    None when the loss refused its inputs, ``z1``, ``z2``, ``nonfinite_gradient``); ``step``:
    the optimiser step being taken (1-based).
    """
    local_loss = result["local_loss"]
    local = {"rank": rank, "loss": float("nan") if local_loss is None else float(local_loss.detach()),
             "what": "gradient" if result.get("nonfinite_gradient") else "loss",
             "nonfinite_terms": sorted(k for k, v in (result["out"] or {}).items()
                                       if not math.isfinite(float(v.detach()))) if result["out"] is not None
             else ["(input embeddings)"],
             "z1": embedding_stats(result["z1"]), "z2": embedding_stats(result["z2"])}
    per_rank = comm.all_gather_objects(local)
    bad = [r["rank"] for r in per_rank if not math.isfinite(r["loss"]) or r["nonfinite_terms"]]
    return {"step": step, "epoch": epoch, "policy": policy,
            "ranks": bad or [r["rank"] for r in per_rank], "per_rank": per_rank}


def write_diagnostic(run_dir: Path, name: str, info: dict, append: bool = False) -> None:
    """``RUN_DIR/name``: one JSON document (written atomically), or one line appended to a JSON-lines file."""
    path = Path(run_dir) / name
    if append:
        with open(path, "a") as f:
            f.write(json.dumps(info, default=str) + "\n")
    else:
        atomic_write_text(path, json.dumps(info, indent=2, default=str) + "\n")


def parameters_finite(module: torch.nn.Module, device: torch.device) -> bool:
    """All ranks agree whether every parameter is finite (ZeRO-3: each rank's partition; collective)."""
    ok = True
    with torch.no_grad():
        for p in module.parameters():
            data = getattr(p, "ds_tensor", p.data)
            if data.numel() and not bool(torch.isfinite(data.sum(dtype=torch.float64))):
                ok = False
                break
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    comm.all_reduce_(flag)
    return float(flag) == 0.0  # host sync: before checkpoints only


def gradients_finite(module: torch.nn.Module, device: torch.device) -> Tuple[bool, torch.Tensor]:
    """Whether the full (already averaged) gradients every rank holds are finite, agreed on all
    ranks (collective), and their global norm (zero without gradients).

    For ZeRO 0 in fp32/bf16, where DeepSpeed would apply non-finite gradients: one fused pass
    gives the global norm (logged: DeepSpeed only computes it at ZeRO 0 when clipping) and the
    finiteness check, since a NaN/Inf anywhere makes the norm non-finite.
    """
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float()) if grads else \
        torch.zeros((), device=device)
    flag = (~torch.isfinite(norm)).float().reshape(1)
    comm.all_reduce_(flag)
    return float(flag) == 0.0, norm  # host sync: once per step at ZeRO 0


__all__ = ["NonFiniteLossError", "NonFiniteStateError", "embedding_stats", "gradients_finite",
           "nonfinite_report", "parameters_finite", "write_diagnostic"]
