"""Checkpoints in the run directory: save on every rank, mark complete, resume, keep the last K.

Layout: ``RUN_DIR/checkpoints/step000001234/`` holds DeepSpeed's files (model states,
ZeRO partitions, optimizer and LR-schedule state, our client state), one
``rng_rank{r}.pt`` per rank, and, once every rank has finished writing, a ``COMPLETE``
marker. ``RUN_DIR/checkpoints/latest_complete`` names the newest complete tag. Both are
written to a temporary name, fsynced and renamed, so a crash at any moment leaves either
the old pointer or the new one, never a torn file; a tag without its marker is never
resumed from.

The marker records the size and SHA-256 of every file of its checkpoint (hashed by the ranks
in turn). Resuming verifies them first: a checkpoint with a truncated, altered or missing
file, or one that DeepSpeed cannot load, is renamed ``damaged-stepN`` (kept for inspection,
never resumed from or pruned), named in a one-line warning, and the newest checkpoint that
verifies is loaded instead (``train.on_damaged_checkpoint=stop``: a one-line error).

The marker also records the world size, ZeRO stage, precision and global batch that wrote the
checkpoint. A checkpoint written by another world size is resumed (``sfrik_scale.elastic``:
ZeRO 0-2, the global batch unchanged) and announced in one line; what cannot be resumed (a
changed global batch, ZeRO stage or precision; ZeRO 3 on another world size) stops every
rank with one line (ElasticResumeError), the checkpoint left as it is.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from . import comm, elastic
from .errors import RaisedOnEveryRank
from .storage import atomic_write_text

CHECKPOINT_DIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
LATEST_POINTER = "latest_complete"
DAMAGED_PREFIX = "damaged-"
_HASH_BLOCK = 8 << 20


def tag_for(step: int) -> str:
    return f"step{step:09d}"


def step_of(tag: str) -> int:
    return int(tag[len("step"):])


def checkpoint_root(run_dir: Union[str, Path]) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def complete_tags(run_dir: Union[str, Path]) -> list[str]:
    """Tags holding a COMPLETE marker, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step")
            and (p / COMPLETE_MARKER).is_file()]
    return sorted(tags, key=step_of)


def latest_complete(run_dir: Union[str, Path]) -> Optional[str]:
    """The newest complete checkpoint tag, or None."""
    tags = complete_tags(run_dir)
    return tags[-1] if tags else None


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class DamagedCheckpointError(RaisedOnEveryRank, ValueError):
    """No checkpoint can be resumed from (every complete one is damaged), or one is damaged
    and ``train.on_damaged_checkpoint=stop``; raised on every rank."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _checkpoint_files(folder: Path) -> list[str]:
    """The files of a checkpoint folder (relative POSIX paths, sorted), its marker excluded."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.name != COMPLETE_MARKER and not p.name.startswith(".probe"))


def file_manifest(folder: Path, rank: int = 0, world: int = 1) -> dict:
    """{relative path: {"bytes", "sha256"}} of every file in ``folder``. Collective when world > 1:
    each rank hashes every world-th file (a rank that cannot see one leaves it to rank 0), and
    every rank returns the whole manifest."""
    names = _checkpoint_files(folder)
    mine = {}
    for i, name in enumerate(names):
        path = folder / name
        if i % world == rank and path.is_file():
            mine[name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    merged: dict = {}
    for part in comm.all_gather_objects(mine) if world > 1 else [mine]:
        merged.update(part)
    for name in names:  # files only rank 0 lists (no shared file system for them)
        if name not in merged and (folder / name).is_file():
            merged[name] = {"bytes": (folder / name).stat().st_size, "sha256": _sha256(folder / name)}
    return dict(sorted(merged.items()))


def verify_problem(folder: Path, rank: int = 0, world: int = 1) -> Optional[str]:
    """Why the files of a complete checkpoint differ from its marker's manifest, in one phrase,
    or None when they match (or the marker predates manifests). Collective when world > 1:
    the ranks hash in turn and agree on the answer."""
    try:
        recorded = json.loads((folder / COMPLETE_MARKER).read_text()).get("files")
    except (OSError, ValueError) as err:
        return f"its {COMPLETE_MARKER} marker is unreadable ({one_line_error(err)})"
    if recorded is None:
        return None
    names = sorted(recorded)
    problems = []
    for i, name in enumerate(names):
        if i % world != rank:
            continue
        path, want = folder / name, recorded[name]
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != want["bytes"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, {want['bytes']} were written")
        elif _sha256(path) != want["sha256"]:
            problems.append(f"{name} differs from its checksum (same size, altered bytes)")
    if world > 1:
        problems = [p for part in comm.all_gather_objects(problems) for p in part]
    return "; ".join(sorted(problems)) or None


def one_line_error(err: BaseException) -> str:
    text = " ".join(str(err).split())
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, unwritable directory...); raised on every
    rank. The previous complete checkpoint is untouched."""


def _estimate_bytes(run_dir: Union[str, Path], engine: Any) -> int:
    """Bytes the next checkpoint will take: the last complete one's size, else 16 bytes per
    parameter (fp32 weights + fp32 master copy + two optimizer moments, an upper bound)."""
    last = latest_complete(run_dir)
    if last is not None:
        return sum(f.stat().st_size for f in (checkpoint_root(run_dir) / last).rglob("*") if f.is_file())
    return 16 * sum(p.numel() for p in engine.module.parameters()) + (1 << 20)


def save_checkpoint(engine: Any, run_dir: Union[str, Path], step: int, client_state: dict,
                    rank: int, keep_last: int) -> str:
    """Save on EVERY rank (DeepSpeed's requirement), then mark complete and prune on rank 0.

    Collective: all ranks must call it at the same step. A pre-flight check on every rank
    (the folder is writable, the file system has room for one more checkpoint) turns the
    common storage faults into a CheckpointWriteError on all ranks before DeepSpeed writes
    anything; a failure while writing is agreed the same way. In both cases no marker is
    written, so the previous complete checkpoint stays the one resumed from.
    """
    root = checkpoint_root(run_dir)
    tag = tag_for(step)
    folder = root / tag
    previous = latest_complete(run_dir)
    intact = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"

    def agree(problem: Optional[str], what: str) -> None:
        try:
            comm.agree_across_ranks(problem, what=what)
        except ValueError as err:
            if rank == 0:
                shutil.rmtree(folder, ignore_errors=True)  # partial files, never marked complete
            raise CheckpointWriteError(f"checkpoint at step {step} was not written: {err}; {intact}") from None

    problem = None
    try:  # pre-flight: writable, and room for one more checkpoint
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe_rank{rank}"
        probe.write_bytes(b"ok")
        probe.unlink()
        need, free = _estimate_bytes(run_dir, engine), shutil.disk_usage(folder).free
        if rank == 0 and free < need:
            problem = f"only {free / 2**30:.2f} GiB free in {root}, the checkpoint needs about {need / 2**30:.2f} GiB"
    except OSError as err:
        problem = f"cannot write to {folder}: {err}"
    agree(problem, "checkpoint pre-flight")

    problem = None
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
        rng_path = folder / f"rng_rank{rank}.pt"
        tmp = rng_path.with_name(rng_path.name + ".tmp")
        torch.save(_rng_state(), tmp)
        os.replace(tmp, rng_path)
    except OSError as err:
        problem = f"writing {folder} failed: {err}"
    agree(problem, "checkpoint write")  # every rank's files are written before the marker

    problem = None
    try:
        manifest = file_manifest(folder, *comm.rank_and_world())
    except OSError as err:
        problem, manifest = f"reading back {folder} failed: {err}", {}
    agree(problem, "checkpoint checksums")

    problem = None
    if rank == 0:
        try:
            marker = {"step": step, **elastic.run_facts(engine, comm.rank_and_world()[1]), "files": manifest}
            atomic_write_text(folder / COMPLETE_MARKER, json.dumps(marker, indent=1) + "\n")
            atomic_write_text(root / LATEST_POINTER, tag + "\n")
        except OSError as err:
            (folder / COMPLETE_MARKER).unlink(missing_ok=True)
            problem = f"marking {folder} complete failed: {err}"
        else:
            prune(run_dir, keep_last)
    agree(problem, "checkpoint marker")
    return tag


def prune(run_dir: Union[str, Path], keep_last: int) -> None:
    """Delete all but the ``keep_last`` newest complete checkpoints, and incomplete ones older
    than the newest complete one (left by a crash mid-save)."""
    root = checkpoint_root(run_dir)
    tags = complete_tags(run_dir)
    if not tags:
        return
    newest = step_of(tags[-1])
    keep = set(tags[-max(keep_last, 1):])
    for path in root.iterdir():
        if path.is_dir() and path.name.startswith("step") and path.name not in keep:
            if (path / COMPLETE_MARKER).is_file() or step_of(path.name) < newest:
                shutil.rmtree(path, ignore_errors=True)


def _agreed_text(problem: Optional[str], world: int) -> Optional[str]:
    """Every rank's problem (None: fine) as one phrase on every rank: said once when all ranks
    share it, else per rank; None when no rank has one. Collective when world > 1."""
    problems = comm.all_gather_objects(problem) if world > 1 else [problem]
    if not any(problems):
        return None
    if len(set(problems)) == 1:
        return problems[0]
    return "; ".join(f"rank {r}: {p}" for r, p in enumerate(problems) if p)


def _set_aside(run_dir: Union[str, Path], tag: str) -> str:
    """Rename a damaged checkpoint out of the resume and prune paths; returns its new name."""
    root = checkpoint_root(run_dir)
    name = DAMAGED_PREFIX + tag
    n = 1
    while (root / name).exists():
        n += 1
        name = f"{DAMAGED_PREFIX}{tag}.{n}"
    os.replace(root / tag, root / name)
    return name


def load_checkpoint(engine: Any, run_dir: Union[str, Path], rank: int, on_damaged: str = "fall_back",
                    warn: Any = None, announce: Any = None) -> Optional[dict]:
    """Resume from the newest complete checkpoint that verifies; returns its client state, or
    None when there is no complete checkpoint.

    A checkpoint written by another world size is loaded by `elastic.load_resharded` and
    announced through ``announce`` (one line, rank 0; ``warn`` when None); a rank without an
    RNG file of its own is seeded from (train.seed, step, rank). One that this run cannot
    resume (`elastic.refusal`) raises `elastic.ElasticResumeError` on every rank.

    Rank 0 lists the tags and every rank tries the same ones, newest first, so ranks cannot
    disagree even if a save finished between their directory listings. A tag is tried by
    checking its files against the marker's checksums and then loading it; a failure of
    either on any rank is agreed by all, the tag is renamed ``damaged-<tag>`` and reported
    through ``warn`` (one line, rank 0) and the next older tag is tried; with
    ``on_damaged="stop"``, or when no tag is left, DamagedCheckpointError on every rank.
    """
    tags = comm.all_gather_objects(complete_tags(run_dir))[0]
    if not tags:
        return None
    rank, world = comm.rank_and_world()
    root = checkpoint_root(run_dir)
    damaged: list[str] = []
    now = elastic.run_facts(engine, world)
    for tag in reversed(tags):
        saved = elastic.saved_facts(root / tag / COMPLETE_MARKER) or {}  # the same file on every rank
        refused = elastic.refusal(saved, now, tag)
        if refused is not None:
            raise elastic.ElasticResumeError(refused)
        saved_world = saved.get("world_size", world)
        text = verify_problem(root / tag, rank, world)  # the same answer on every rank
        if text is None:
            problem = None
            try:
                if saved_world != world:
                    load_path, client_state = elastic.load_resharded(engine, root, tag, saved_world)
                else:
                    load_path, client_state = engine.load_checkpoint(str(root), tag=tag)
                if load_path is None:
                    problem = "DeepSpeed found nothing to load"
            except Exception as err:  # noqa: BLE001 - any load failure: agreed, reported, fallen back from
                problem = f"DeepSpeed could not load it ({one_line_error(err)})"
            text = _agreed_text(problem, world)
        if text is not None:
            if on_damaged == "stop":
                raise DamagedCheckpointError(
                    f"checkpoint {root / tag} is damaged: {text}; train.on_damaged_checkpoint=stop, so "
                    f"nothing was loaded (set it to fall_back to resume from an older checkpoint)") from None
            comm.barrier()
            if rank == 0:
                kept = _set_aside(run_dir, tag)
                damaged.append(tag)
                if warn is not None:
                    older = [t for t in tags if step_of(t) < step_of(tag)]
                    then = f"trying {older[-1]}" if older else "no older checkpoint is left"
                    warn(f"checkpoint {tag} is damaged ({text}); kept as {root / kept} for inspection, {then}")
            comm.barrier()
            continue
        if damaged and rank == 0:
            atomic_write_text(root / LATEST_POINTER, tag + "\n")
        client_state = dict(client_state or {})
        rng_path = root / tag / f"rng_rank{rank}.pt"
        if rng_path.is_file():
            _set_rng_state(torch.load(rng_path, weights_only=True))
        elif saved_world != world:  # the job grew: this rank has no stream of its own to continue
            seed = client_state.get("config", {}).get("train", {}).get("seed", 0)
            elastic.seed_fresh_rng(seed, step_of(tag), rank)
        if saved_world != world and rank == 0 and (announce or warn) is not None:
            (announce or warn)(elastic.describe_change(saved_world, world, engine, client_state))
        client_state["tag"] = tag
        return client_state
    raise DamagedCheckpointError(
        f"no checkpoint in {root} can be resumed from: {', '.join(reversed(tags))} are damaged (kept as "
        f"{DAMAGED_PREFIX}<tag>); set train.resume=false or use a new train.run_dir to start afresh")


# ----------------------------------------------------------------------------------------
# Export: fp32 backbone and projector weights from any ZeRO stage.
# ----------------------------------------------------------------------------------------
def consolidated_state_dict(run_dir: Union[str, Path], tag: Optional[str] = None) -> tuple[dict, str]:
    """The full fp32 model state dict of a checkpoint, whatever the ZeRO stage (shards merged).

    Uses DeepSpeed's own consolidation (``zero_to_fp32``: parameters merged from every rank's
    partition, buffers from the module states) when the checkpoint holds ZeRO partitions or
    fp32 master weights, else the module states saved at stage 0 fp32.
    """
    tag = tag or latest_complete(run_dir)
    if tag is None:
        raise FileNotFoundError(f"no complete checkpoint in {checkpoint_root(run_dir)}")
    folder = checkpoint_root(run_dir) / tag
    if not (folder / COMPLETE_MARKER).is_file():
        raise FileNotFoundError(f"checkpoint {folder} is incomplete (no {COMPLETE_MARKER} marker)")
    problem = verify_problem(folder)
    if problem is not None:
        raise DamagedCheckpointError(f"checkpoint {folder} is damaged: {problem}")
    if any(folder.glob("*optim_states.pt")):  # ZeRO partitions / fp32 master weights on disk
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:  # params merged from every rank's partition, plus buffers
            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_root(run_dir)), tag=tag)
            return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, tag
        except (ValueError, KeyError):
            pass  # stage 0: the module states below are the weights
    model_files = sorted(folder.glob("mp_rank_*_model_states.pt"))
    if not model_files:
        raise FileNotFoundError(f"no DeepSpeed model states in {folder}")
    # DeepSpeed's own files pickle more than tensors (its config objects): weights_only=False,
    # see the README's note on loading checkpoints from untrusted sources.
    module_states = torch.load(model_files[0], map_location="cpu", weights_only=False)
    state = {k: v.float() if v.is_floating_point() else v for k, v in module_states["module"].items()}
    return state, tag
