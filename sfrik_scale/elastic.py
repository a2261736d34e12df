"""Elastic resume: a checkpoint written by one number of ranks resumed on another.

A requeued job often comes back with a different number of nodes. `sfrik_scale.checkpoint`
records in each ``COMPLETE`` marker the world size, ZeRO stage, precision and global batch
that wrote it (`run_facts`); on resume `refusal` says, in one line, what cannot be resumed,
and `load_resharded` loads a checkpoint written by another world size. What a checkpoint
holds, and what a world-size change does to each part:

* model weights, LR-schedule state, DeepSpeed's step counters and our client state (the
  TrainState with its epoch tally, the sampler position, counted in global samples): written
  once, by rank 0, whatever the world size; loaded as they are. The global batch must not
  change (refused), so the sampler's position and the step count keep their meaning, and the
  loader of each rank takes its share of the same global batches from that position on.
* ZeRO 0: the optimizer state is whole in the same file; DeepSpeed loads it on any world size.
* ZeRO 1 and 2 (``DeepSpeedZeroOptimizer``; bf16 at stage 1: ``BF16_Optimizer``): the fp32
  master weights and the optimizer state are flat partitions, one file per rank, and
  DeepSpeed 0.19.8 refuses a different data-parallel size (``runtime/engine.py``,
  ``_load_zero_checkpoint``: "Automatic adjustment of ZeRO's optimizer state partitioning
  with a new world size is not currently supported"). We load everything else with
  ``load_optimizer_states=False`` and reshard here (`reshard_flat_partitions`).
* ZeRO 3: refused (parameters are partitioned too; not implemented).
* ``rng_rank{r}.pt``: a rank that has its own file restores it; a rank that has none (the job
  grew) seeds torch, numpy and random from (train.seed, step, rank) (`seed_fresh_rng`), so
  that its stream is reproducible and differs from every other rank's. Training itself draws
  nothing from these streams (augmentations are seeded per sample, parameters by
  ``train.seed``).

Why not DeepSpeed's own routes (0.19.8): the universal checkpoint converter
(``checkpoint/ds_to_universal.py``, ``extract_zero_shards``) reads the Adam state keys
``exp_avg`` and ``exp_avg_sq`` only, so LARS (state ``mu``, our default) fails with a
KeyError, and it writes a second copy of the state that ``checkpoint.load_universal`` must
be set for before ``deepspeed.initialize``; ZeRO's ``elastic_checkpoint`` changes the saved
format and is never reached, since the engine raises the error above before calling the
optimizer's load. Resharding in memory needs neither a conversion step nor extra files, so
the checksum manifest still covers everything that is read.
"""
from __future__ import annotations

import copy
import hashlib
import json
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .errors import RaisedOnEveryRank


def ranks(n: int) -> str:
    """"1 rank", "3 ranks"."""
    return f"{n} rank{'s' if n != 1 else ''}"


class ElasticResumeError(RaisedOnEveryRank, ValueError):
    """The newest checkpoint cannot be resumed by this run (a changed global batch, ZeRO stage or
    precision; a world-size change under ZeRO 3). Raised alike on every rank: each reads the
    same marker, so no collective is needed to agree."""


def precision_of(engine: Any) -> Optional[str]:
    if not hasattr(engine, "bfloat16_enabled"):
        return None
    return "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"


def run_facts(engine: Any, world_size: int) -> dict:
    """What a checkpoint written by this run depends on: recorded in its COMPLETE marker, and
    compared with the marker's on resume. Engines without DeepSpeed's accessors (test doubles)
    give the world size only."""
    facts: dict = {"world_size": int(world_size)}
    if hasattr(engine, "zero_optimization_stage"):
        facts["zero_stage"] = int(engine.zero_optimization_stage())
    precision = precision_of(engine)
    if precision is not None:
        facts["precision"] = precision
    if hasattr(engine, "train_batch_size"):
        facts["global_batch_size"] = int(engine.train_batch_size())
    return facts


def saved_facts(marker_path: Path) -> Optional[dict]:
    """The facts a checkpoint's COMPLETE marker records; None when it is unreadable (the checksum
    verification reports that). Markers written before the world size was recorded give the
    number of per-rank RNG files beside them as the world size (every rank writes one), or none."""
    try:
        marker = json.loads(Path(marker_path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict):
        return None
    facts = {k: marker[k] for k in ("world_size", "zero_stage", "precision", "global_batch_size") if k in marker}
    folder = Path(marker_path).parent
    if "world_size" not in facts:
        count = len(list(folder.glob("rng_rank*.pt")))
        if count:
            facts["world_size"] = count
    if "zero_stage" not in facts and (folder / "zero_pp_rank_0_mp_rank_00_model_states.pt").is_file():
        facts["zero_stage"] = 3  # only stage 3 writes model states per rank
    return facts


def refusal(saved: dict, now: dict, tag: str) -> Optional[str]:
    """Why checkpoint ``tag`` (``saved``: its marker's facts) cannot be resumed by a run with the
    facts ``now``, in one line; None when it can. Facts a marker lacks are not compared."""
    def differs(key: str) -> bool:
        return key in saved and key in now and saved[key] != now[key]

    if differs("global_batch_size"):
        return (f"checkpoint {tag} was written with train.global_batch_size={saved['global_batch_size']} and this run "
                f"has {now['global_batch_size']}: the sampler position, the step count and the LR schedule are "
                f"counted in its global batches; resume with train.global_batch_size={saved['global_batch_size']}")
    if differs("zero_stage"):
        return (f"checkpoint {tag} was written under ZeRO {saved['zero_stage']} and this run uses ZeRO "
                f"{now['zero_stage']}: DeepSpeed cannot load one layout into the other; resume with "
                f"deepspeed.zero_stage={saved['zero_stage']}")
    if differs("precision"):
        return (f"checkpoint {tag} was written in {saved['precision']} and this run uses {now['precision']}: "
                f"the optimizer wrappers differ; resume with deepspeed.precision={saved['precision']}")
    if differs("world_size") and 3 in (saved.get("zero_stage"), now.get("zero_stage")):
        return (f"resuming a checkpoint written by {ranks(saved['world_size'])} on {ranks(now['world_size'])} is not "
                f"supported under ZeRO 3 (checkpoint {tag}: parameters and optimizer state are partitioned per "
                f"rank); resume on {ranks(saved['world_size'])}, or train with deepspeed.zero_stage 0, 1 or 2")
    return None


# ----------------------------------------------------------------------------------------
# Loading on another world size
# ----------------------------------------------------------------------------------------
def load_resharded(engine: Any, root: Path, tag: str, saved_world: int) -> tuple[Any, Optional[dict]]:
    """``engine.load_checkpoint`` for a checkpoint written by ``saved_world`` ranks (not this
    world size): ZeRO 0 as usual, ZeRO 1/2 without the optimizer partitions, which
    `reshard_flat_partitions` then rebuilds. Returns DeepSpeed's (load path, client state)."""
    stage = engine.zero_optimization_stage()
    if stage == 0:
        return engine.load_checkpoint(str(root), tag=tag)
    if stage not in (1, 2):
        raise ValueError(f"cannot reshard a ZeRO {stage} checkpoint")  # refusal() stops this before
    # module weights, LR schedule, counters and client state; DeepSpeed then refreshes the fp32
    # master partitions from the (bf16 or fp32) module weights, overwritten below by the saved ones
    load_path, client_state = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=False)
    if load_path is not None:
        reshard_flat_partitions(engine, Path(root) / tag, saved_world)
    return load_path, client_state


def _partition_file(folder: Path, rank: int) -> Path:
    found = sorted(folder.glob(f"*zero_pp_rank_{rank}_mp_rank_*_optim_states.pt"))  # bf16_ prefix: BF16_Optimizer
    if len(found) != 1:
        raise FileNotFoundError(f"expected one ZeRO optimizer partition file of rank {rank} in {folder}, "
                                f"found {len(found)}")
    return found[0]


def _copy_range(pieces: list, start: int, out: torch.Tensor) -> None:
    """Copy elements [start, start + out.numel()) of the concatenation of ``pieces`` into ``out``
    (without building the concatenation: a parameter may be large, its piece here small)."""
    offset, end = 0, start + out.numel()
    for piece in pieces:
        lo, hi = max(start, offset), min(end, offset + piece.numel())
        if lo < hi:
            out.narrow(0, lo - start, hi - lo).copy_(piece.narrow(0, lo - offset, hi - lo))
        offset += piece.numel()


def reshard_flat_partitions(engine: Any, folder: Path, saved_world: int) -> None:
    """Install this rank's partitions of the fp32 master weights and optimizer state of a ZeRO 1/2
    checkpoint written by ``saved_world`` ranks into ``engine`` (a fresh engine, before any step).

    Every rank reads the ``saved_world`` partition files (memory-mapped: only what is touched is
    read). A saved file lists, per parameter group, the fragment of each parameter its flat
    partition holds (``param_slice_mappings``: name -> start, numel); the fragments of a
    parameter over the ranks, in rank order, are the whole parameter (partitions are
    consecutive slices of the group's flat buffer). This rank's engine maps each parameter's
    piece in its own partition the same way (``param._hp_mapping``: ``lp_fragment_address``
    in the parameter, ``hp_fragment_address`` in the partition; DeepSpeed's tensor_fragment
    API), so any optimizer state is resharded, not only Adam's. State entries that are 1-D
    tensors are partitions; the others (step counts) are the same on every rank and taken
    from rank 0's file, like the wrapper's loss scaler and clip_grad. The parameter groups'
    hyperparameters are restored as well: the lr the schedule set for the next step lives
    there, and would otherwise stay at its initial value until the schedule's next step
    (the kind of stale lr after a resume of DeepSpeed issue #4344).

    No collective: each rank reads the files itself.
    """
    from deepspeed.checkpoint.constants import (BASE_OPTIMIZER_STATE, CLIP_GRAD, OPTIMIZER_STATE_DICT,
                                                PARAM_SLICE_MAPPINGS, SINGLE_PARTITION_OF_FP32_GROUPS)

    wrapper = engine.optimizer
    base = wrapper.optimizer
    # DeepSpeed's own files pickle more than tensors (fragment addresses, its config objects)
    saved = [torch.load(_partition_file(folder, r), map_location="cpu", weights_only=False, mmap=True)
             [OPTIMIZER_STATE_DICT] for r in range(saved_world)]
    if len(saved[0][PARAM_SLICE_MAPPINGS]) != len(base.param_groups):
        raise ValueError(f"the checkpoint has {len(saved[0][PARAM_SLICE_MAPPINGS])} parameter groups, the "
                         f"optimizer {len(base.param_groups)}")
    local: dict[int, list] = {}  # group -> (name, parameter, its fragment in this rank's partition)
    for name, param in engine.module.named_parameters():
        fragment = getattr(param, "_hp_mapping", None)
        if fragment is not None:
            local.setdefault(fragment.param_group_index, []).append((name, param, fragment))
    for g, group in enumerate(base.param_groups):
        flat = group["params"][0]  # this rank's fp32 partition: the one tensor the optimizer steps
        states = [sd[BASE_OPTIMIZER_STATE]["state"].get(g, {}) for sd in saved]
        partitioned = [k for k, v in states[0].items() if torch.is_tensor(v) and v.dim() == 1]
        state = {k: torch.zeros_like(flat) if k in partitioned else copy.deepcopy(v) for k, v in states[0].items()}
        sources = {None: [sd[SINGLE_PARTITION_OF_FP32_GROUPS][g] for sd in saved],
                   **{k: [s[k] for s in states] for k in partitioned}}
        targets = {None: flat.data, **{k: state[k] for k in partitioned}}
        for name, param, fragment in local.get(g, []):
            pieces = [(r, sd[PARAM_SLICE_MAPPINGS][g][name]) for r, sd in enumerate(saved)
                      if name in sd[PARAM_SLICE_MAPPINGS][g]]
            lp, hp = fragment.lp_fragment_address, fragment.hp_fragment_address
            if sum(a.numel for _, a in pieces) != param.numel():
                raise ValueError(f"{name}: the checkpoint's fragments hold {sum(a.numel for _, a in pieces)} "
                                 f"elements, the parameter {param.numel()}")
            for key, per_rank in sources.items():
                _copy_range([per_rank[r].reshape(-1).narrow(0, a.start, a.numel) for r, a in pieces],
                            lp.start, targets[key].narrow(0, hp.start, hp.numel))
        if state:
            base.state[flat] = state
        saved_group = saved[0][BASE_OPTIMIZER_STATE]["param_groups"][g]
        group.update({k: copy.deepcopy(v) for k, v in saved_group.items() if k != "params"})
    # what DeepSpeed's own load restores besides the partitions, the same on every rank: the loss
    # scaler and overflow flag (ZeRO 1/2; BF16_Optimizer's method does nothing) and clip_grad
    if hasattr(wrapper, "_load_global_state"):
        wrapper._load_global_state(saved[0])
    if CLIP_GRAD in saved[0]:
        wrapper.clip_grad = saved[0][CLIP_GRAD]
    if hasattr(wrapper, "_hp_optimizer_states_linked"):
        wrapper._hp_optimizer_states_linked = False  # link the new state tensors at the next step


def seed_fresh_rng(seed: int, step: int, rank: int) -> None:
    """Seed torch, numpy and random of a rank that has no RNG file of its own in the checkpoint."""
    digest = hashlib.sha256(f"sfrik-scale elastic rng {seed} {step} {rank}".encode()).digest()
    value = int.from_bytes(digest[:8], "little") >> 1
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)


def describe_change(saved_world: int, world: int, engine: Any, client_state: dict) -> str:
    """The one console line announcing a resume on another world size."""
    stage = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else None
    if stage in (1, 2):
        optimizer = f"ZeRO {stage} optimizer state resharded from {saved_world} partitions into {world}"
    else:
        optimizer = f"ZeRO {stage} optimizer state loaded whole" if stage is not None else "loaded"
    parts = [optimizer]
    if hasattr(engine, "train_batch_size"):
        parts.append(f"global batch {engine.train_batch_size()} unchanged ({engine.train_micro_batch_size_per_gpu()} "
                     f"a rank x accumulation {engine.gradient_accumulation_steps()} x {ranks(world)})")
    train_state = client_state.get("train_state", {})
    if "epoch" in train_state:
        parts.append(f"epoch {train_state['epoch']} continues after global sample "
                     f"{train_state.get('samples_in_epoch', 0)}")
    if world > saved_world:
        new = ", ".join(str(r) for r in range(saved_world, world))
        parts.append(f"rank{'s' if world - saved_world > 1 else ''} {new} without an RNG file of "
                     f"{'their' if world - saved_world > 1 else 'its'} own seeded from (train.seed, step, rank)")
    return f"resuming a checkpoint written by {ranks(saved_world)} on {ranks(world)}: " + "; ".join(parts)
