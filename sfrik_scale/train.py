"""The DeepSpeed pretraining loop: build, train_step, train, checkpoint, close.

Reads top to bottom. The trainer builds its collaborators and delegates to them: the data
(`data.pretrain`), the loss (its spec), the engine (`engine`: DeepSpeed, the ZeRO layout),
the monitor, rank health (`health`) and the learning-health watch, the checkpoint policy
(`checkpoint_policy`), the stop request of a preemption signal (`preemption`), the epoch's
accounting (`epoch_tally`) and the non-finite checks (`nonfinite`). The engine owns backward
and step (and the LR schedule, which it steps after each optimiser step); precision is read
from the engine. Every host sync is marked with a comment: one small all-reduce per
micro-step carries the loss, the non-finite flag and the stop request, so all ranks take
every decision together.
"""
from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import comm
from .checkpoint import load_checkpoint
from .checkpoint_policy import CheckpointPolicy
from .config import Config
from .epoch_tally import EpochTally
from .errors import NonFiniteInputError, StorageError
from .health import RankHealth
from .hooks import HookFactory
from .learning_health import LearningHealthWatch, embedding_health
from .monitor import Monitor
from .nonfinite import (NonFiniteLossError, NonFiniteStateError, gradients_finite, nonfinite_report,
                        parameters_finite, write_diagnostic)
from .preemption import PREEMPTED_EXIT_CODE, StopRequest
from .profiling.phases import NullProfiler
from .profiling.step import build_profiler
from .storage import atomic_write_text, write_problem
from .topology import Topology


class RankFailureError(RuntimeError):
    """This rank stopped because of an error, possibly caused by a failed peer (named)."""


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint's client state."""

    epoch: int = 0
    step: int = 0                 # optimiser steps done
    samples_in_epoch: int = 0     # global samples consumed in the current epoch
    skipped_steps: int = 0        # non-finite steps skipped by policy
    history: list = field(default_factory=list)  # per-step mean loss (for resume checks)
    # the current epoch's running totals (loss sums, counted / skipped steps, images, seconds, and
    # the sample it was first counted from), so that an epoch interrupted and resumed is summarised whole
    epoch_tally: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "samples_in_epoch": self.samples_in_epoch,
                "skipped_steps": self.skipped_steps, "history": list(self.history),
                "epoch_tally": json.loads(json.dumps(self.epoch_tally))}


class Trainer:
    """SSL pretraining with a DeepSpeed engine. ``Trainer(cfg, topo).run()`` is the whole job."""

    def __init__(self, cfg: Config, topo: Topology, hooks: Sequence[HookFactory] = (),
                 stop: Optional[StopRequest] = None) -> None:
        """``hooks``: factories of the `sfrik_scale.hooks.TrainerHook` s the loop calls (the online
        evaluation, which ``sfrik_scale.pretrain`` passes); none by default. ``stop``: a stop
        request installed earlier (``sfrik_scale.pretrain`` installs one before anything heavy
        loads); else one of its own, installed by `run`."""
        self.cfg = cfg
        self.topo = topo
        self.hook_factories = tuple(hooks)
        self.hooks: list = []
        self.run_dir = Path(cfg.train.run_dir)
        self.state = TrainState()
        self.stop = stop if stop is not None else StopRequest()  # SIGTERM/SIGUSR1, installed by run()
        self.tally: Optional[EpochTally] = None  # the current epoch's accounting
        self.resumed_from: Optional[str] = None
        self.profiler = NullProfiler()

    # ------------------------------------------------------------------ build
    def build(self) -> "Trainer":
        cfg, topo = self.cfg, self.topo
        torch.manual_seed(cfg.train.seed)  # same initial parameters on every rank
        self.micro_batch = cfg.train.micro_batch_size_for(topo.world_size)
        self.grad_accum = cfg.train.gradient_accumulation_steps(topo.world_size)
        if cfg.train.on_nonfinite == "skip" and self.grad_accum > 1:
            raise ValueError("train.on_nonfinite=skip needs gradient accumulation 1 (set train.micro_batch_size "
                             "to global_batch_size / world_size) or use on_nonfinite=stop")
        self.build_data()
        self.build_model()
        self.build_engine()
        self.checkpoints = CheckpointPolicy(self.run_dir, topo.rank, cfg.train.checkpoint_every_steps,
                                            cfg.train.keep_last)
        self.monitor = Monitor(self.run_dir, topo.is_main, cfg.monitor.tensorboard, cfg.monitor.progress)
        # checks start after the warm-up and at least a tenth of the run: just after a short warm-up
        # healthy runs can still have positive pairs barely closer than random ones
        self.health_watch = LearningHealthWatch(
            warmup_steps=max(int(round(cfg.optim.warmup_epochs * self.steps_per_epoch)), self.total_steps // 10),
            warn=lambda text: self.monitor.print(f"[bold yellow]warning:[/] {text}"))
        self.profiler = build_profiler(cfg, self.run_dir, topo.device, topo.is_main, self.monitor)
        self.profiler.attach(self.engine.module)
        self.hooks = [make(cfg, topo, self.monitor, self.engine.module) for make in self.hook_factories]
        if topo.is_main:
            cfg.save(self.run_dir)
            atomic_write_text(self.run_dir / "ds_config.json", json.dumps(self.ds_config, indent=2) + "\n")
        if cfg.train.resume:
            self.resume()
        return self

    def build_data(self) -> None:
        from .data.pretrain import build_pretrain_loader

        t = self.cfg.train
        data = build_pretrain_loader(self.cfg.data, rank=self.topo.rank, world_size=self.topo.world_size,
                                     device=self.topo.device,
                                     micro_batch_size=t.micro_batch_size_for(self.topo.world_size),
                                     global_batch_size=t.global_batch_size, seed=t.seed,
                                     announce=print if self.topo.is_main else None)
        self.dataset, self.loader, self.data_backend = data.dataset, data.loader, data.backend
        self.steps_per_epoch = self.loader.sharded_sampler.epoch_length // t.global_batch_size
        self.total_steps = self.steps_per_epoch * t.epochs
        if t.max_steps is not None:
            self.total_steps = min(self.total_steps, t.max_steps)

    def build_model(self) -> None:
        from .losses import LOSS_SPECS, build_loss_from_config
        from .models import batchnorm_in_fp32, build_model, convert_sync_batchnorm

        m = self.cfg.model
        model = build_model(m.backbone, m.projector)
        # SyncBatchNorm is CUDA-only; it must be in place before deepspeed.initialize.
        if m.sync_bn and self.topo.world_size > 1 and self.topo.device.type == "cuda":
            model = convert_sync_batchnorm(model)
        if self.cfg.deepspeed.precision != "fp32":
            batchnorm_in_fp32(model)  # DeepSpeed casts BN weights to bf16/fp16; statistics stay fp32
        self.model = model
        self.loss_fn = build_loss_from_config(self.cfg.loss, q=model.q)
        self.regulariser_key = LOSS_SPECS[self.cfg.loss.name].regulariser  # the summary's "regulariser" column

    def build_engine(self) -> None:
        from .engine import build_engine

        parts = build_engine(self.cfg, self.topo, self.model, self.steps_per_epoch)
        self.engine, self.optimizer, self.scheduler = parts.engine, parts.optimizer, parts.scheduler
        self.ds_config, self.zero_layout, self.input_dtype = parts.ds_config, parts.zero_layout, parts.input_dtype

    def resume(self) -> None:
        client = load_checkpoint(self.engine, self.run_dir, self.topo.rank,
                                 on_damaged=self.cfg.train.on_damaged_checkpoint,
                                 warn=lambda text: self.monitor.print(f"[bold yellow]warning:[/] {text}"),
                                 announce=lambda text: self.monitor.print(text, soft_wrap=True))
        if client is None:
            return
        saved = client.get("train_state", {})
        self.state = TrainState(**{k: saved[k] for k in TrainState().to_dict() if k in saved})
        self.resumed_from = client["tag"]
        for hook in self.hooks:
            hook.load_state_dict(client.get(hook.key))

    # ------------------------------------------------------------------ one micro-step
    def train_step(self, view1: torch.Tensor, view2: torch.Tensor) -> dict:
        """Forward both views, the loss in fp32, and (unless a rank saw a non-finite loss)
        backward and step. Returns the detached loss outputs and the agreed flags."""
        dev = self.topo.device
        layout = torch.channels_last if self.cfg.model.channels_last else torch.preserve_format
        view1 = view1.to(dev, self.input_dtype, non_blocking=True, memory_format=layout)
        view2 = view2.to(dev, self.input_dtype, non_blocking=True, memory_format=layout)
        z1, z2 = self.engine(view1), self.engine(view2)  # forward phases: the profiler's module hooks
        try:
            with self.profiler.phase("loss"):
                out = self.loss_fn(z1.float(), z2.float())  # the Gram and polynomials stay in fp32
            loss = out["loss"]
            nonfinite = ~torch.isfinite(loss.detach())
        except NonFiniteInputError:  # raised on every rank alike
            out, loss, nonfinite = None, None, torch.ones((), dtype=torch.bool, device=dev)
        zero = torch.zeros((), dtype=torch.float64, device=dev)
        finite_loss = zero if loss is None else torch.where(nonfinite, zero, loss.detach().double())
        status = torch.stack([finite_loss, nonfinite.double(),
                              torch.tensor(float(self.stop.requested), dtype=torch.float64, device=dev)])
        comm.all_reduce_(status)
        status = status.tolist()  # host sync: once per micro-step, for the agreed decisions below
        result = {"loss": status[0] / self.topo.world_size, "nonfinite": status[1] > 0,
                  "stop": status[2] > 0, "out": out, "z1": z1, "z2": z2, "local_loss": loss}
        if result["nonfinite"]:
            return result
        with self.profiler.phase("backward"):
            self.engine.backward(loss)
        if not self.gradients_finite():  # agreed on all ranks; the update is not applied
            self.engine.zero_grad()
            result.update(nonfinite=True, nonfinite_gradient=True)
            return result
        skipped_before = getattr(self.engine, "skipped_steps", 0)
        with self.profiler.phase("optimizer_step"):
            self.engine.step()
        if not self.engine.fp16_enabled() and getattr(self.engine, "skipped_steps", 0) > skipped_before:
            # DeepSpeed found non-finite gradients and dropped the update (its check is
            # all-reduced, so every rank sees it); outside fp16 loss scaling that is divergence
            result.update(nonfinite=True, nonfinite_gradient=True)
        return result

    def gradients_finite(self) -> bool:
        """Whether this step's gradients are finite, agreed on all ranks (collective).

        DeepSpeed itself drops (and counts in ``engine.skipped_steps``) updates with
        non-finite gradients under fp16 and at ZeRO 1-3 in any precision; ZeRO 0 in
        fp32/bf16 would apply them, so that case is checked here, on the full (already
        averaged) gradients every rank holds.
        """
        if self.engine.fp16_enabled() or self.cfg.deepspeed.zero_stage != 0:
            return True
        finite, self._grad_norm = gradients_finite(self.engine.module, self.topo.device)  # host sync
        return finite

    # ------------------------------------------------------------------ the loop
    def train(self) -> int:
        """Run until the epochs (or train.max_steps) are done; returns the process exit status."""
        cfg, st = self.cfg, self.state
        t = cfg.train
        self.engine.train()
        self.print_header()
        if st.step >= self.total_steps:
            self.monitor.print(f"nothing to do: {st.step} steps already done")
            return 0
        while st.epoch < t.epochs and st.step < self.total_steps:
            exit_code = self.train_epoch()
            if exit_code is not None:
                return exit_code
        if self.checkpoints.due_at_end(st.step):
            self.checkpoint()
        self.monitor.print_summary_table()
        return 0

    def train_epoch(self) -> Optional[int]:
        cfg, st, mon = self.cfg, self.state, self.monitor
        t = cfg.train
        self.loader.set_epoch(st.epoch)
        if st.samples_in_epoch:
            self.loader.set_position(st.epoch, st.samples_in_epoch)
        done_steps = st.samples_in_epoch // t.global_batch_size
        epoch_steps = min(self.steps_per_epoch, self.total_steps - st.step + done_steps)
        mon.start_epoch(st.epoch, t.epochs, epoch_steps, completed=done_steps)
        tally = self.tally = EpochTally.resume_or_start(st.epoch_tally, st.samples_in_epoch)
        st.epoch_tally = tally.totals  # a resumed epoch carries its totals on, into every checkpoint
        step_start, data_wait, micro = time.perf_counter(), 0.0, 0
        batches = iter(self.loader)
        while st.step < self.total_steps:
            wait_start = time.perf_counter()
            with self.profiler.phase("data"):
                batch = next(batches, None)
            data_wait += time.perf_counter() - wait_start
            if batch is None:
                break
            view1, view2, labels = batch
            result = self.train_step(view1, view2)
            for hook in self.hooks:  # e.g. the online head on this batch's detached features
                hook.on_step(labels, skip=result["nonfinite"])
            micro += 1
            if result["nonfinite"]:  # every rank is here together: the flag was all-reduced
                self.skip_or_stop(result)
                tally.skip()
            else:
                tally.add(result["loss"], result["out"])
            if micro % self.grad_accum:
                continue
            # ---- an optimiser step is complete
            st.step += 1
            self.health.set_step(st.step)
            st.samples_in_epoch += t.global_batch_size
            tally.add_images(t.global_batch_size)
            if not result["nonfinite"]:
                st.history.append(result["loss"])
            step_time = time.perf_counter() - step_start
            mon.advance(result["loss"] if not result["nonfinite"] else None, t.global_batch_size / step_time)
            if st.step % t.log_every_steps == 0:
                self.log_step(result, step_time, data_wait)
            self.profiler.end_step(st.step)
            step_start, data_wait = time.perf_counter(), 0.0
            if result["stop"]:  # SIGTERM/SIGUSR1 on some rank: checkpoint and exit for requeue
                return self.preempt()
            if self.checkpoints.due(st.step):
                self.checkpoint()
        self.end_epoch()
        return None

    def skip_or_stop(self, result: dict) -> None:
        """A non-finite micro-step, on every rank at once: ``train.on_nonfinite=stop`` raises
        NonFiniteLossError with a diagnostic; ``skip`` records it and goes on (the update was
        not applied)."""
        st = self.state
        report = self.nonfinite_report(result)
        if self.cfg.train.on_nonfinite == "stop":
            self.write_diagnostic("nonfinite.json", report)
            what = "gradients" if result.get("nonfinite_gradient") else "loss"
            raise NonFiniteLossError(f"non-finite {what} at step {st.step + 1} (epoch {st.epoch}) on rank(s) "
                                     f"{report['ranks']}; diagnostic in {self.run_dir / 'nonfinite.json'}")
        self.write_diagnostic("nonfinite.jsonl", report, append=True)
        st.skipped_steps += 1

    def end_epoch(self) -> None:
        """The epoch's record (the hooks' figures joined at its end and the run's), and the next
        epoch when this one is done (else the loop stopped at train.max_steps)."""
        st, t = self.state, self.cfg.train
        finished = st.samples_in_epoch >= self.steps_per_epoch * t.global_batch_size
        record = self.epoch_record(partial=not finished or not self.tally.counted_from_start)
        if finished or st.step >= self.total_steps:  # every rank: the evaluation holds collectives
            for hook in self.hooks:
                record.update(hook.on_epoch_end(self.engine.module, st.epoch, st.step))
        self.monitor.end_epoch(record)
        self.monitor.report_bad_files(self.loader.bad_files.as_dict())
        if finished:
            st.epoch += 1
            st.samples_in_epoch = 0
            st.epoch_tally = {}

    # ------------------------------------------------------------------ logging
    def epoch_record(self, partial: bool) -> dict:
        """The current epoch's summary from its running totals (carried across a resume)."""
        return self.tally.record(self.state.epoch, self.state.step, partial, len(self.loader.bad_files),
                                 self.regulariser_key)

    def log_step(self, result: dict, step_time: float, data_wait: float) -> None:
        st, eng = self.state, self.engine
        values: dict[str, Optional[float]] = {"loss": result["loss"] if not result["nonfinite"] else None}
        if result["out"] is not None:
            names = [k for k in result["out"] if k != "loss"]
            comps = torch.stack([torch.as_tensor(result["out"][k], dtype=torch.float64) for k in names])
            comm.all_reduce_(comps.to(self.topo.device))  # detached metrics: plain collective
            values.update({k: float(v) / self.topo.world_size for k, v in zip(names, comps.tolist())})
            health = embedding_health(result["z1"].detach(), result["z2"].detach())
            values.update(health)
            self.health_watch.check(st.step, health, batch=result["z1"].shape[0])
        grad_norm = eng.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = getattr(self, "_grad_norm", None)
        values.update({
            "lr": eng.get_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "images_per_s": self.cfg.train.global_batch_size / step_time,
            "step_time_s": step_time,
            "data_wait_s": data_wait,
            "skipped_nonfinite_steps": st.skipped_steps,
            "overflow_skipped_steps": getattr(eng, "skipped_steps", 0),
            "bad_files": len(self.loader.bad_files),
            "peak_memory_mib": peak_memory_mib(self.topo.device),
        })
        if eng.fp16_enabled():
            values["loss_scale"] = float(getattr(eng.optimizer, "cur_scale", float("nan")))
        self.monitor.scalars(st.step, values)

    def nonfinite_report(self, result: dict) -> dict:
        """Which rank, which loss term, what the embeddings looked like (collective)."""
        return nonfinite_report(result, rank=self.topo.rank, step=self.state.step + 1, epoch=self.state.epoch,
                                policy=self.cfg.train.on_nonfinite)

    def write_diagnostic(self, name: str, info: dict, append: bool = False) -> None:
        if self.topo.is_main:
            write_diagnostic(self.run_dir, name, info, append=append)

    def params_finite(self) -> bool:
        """All ranks agree whether every parameter is finite (ZeRO-3: each rank's partition)."""
        return parameters_finite(self.engine.module, self.topo.device)  # host sync: before checkpoints only

    def schedule_text(self) -> str:
        """How long the run is: "10 epochs x 16 steps", or "48 steps (train.max_steps) of 10 epochs x 16"."""
        full = f"{self.cfg.train.epochs} epochs x {self.steps_per_epoch} steps"
        if self.total_steps < self.steps_per_epoch * self.cfg.train.epochs:
            return f"{self.total_steps} steps (train.max_steps) of {full}"
        return full

    def print_header(self) -> None:
        cfg, topo = self.cfg, self.topo
        n_params = sum(p.numel() for p in self.model.parameters())
        self.monitor.print_header([
            ("run dir", str(self.run_dir)),
            ("processes", f"{topo.world_size} ({topo.launcher}), device {topo.device}"),
            ("model", f"{cfg.model.backbone} + projector {cfg.model.projector} ({n_params / 1e6:.2f} M params)"),
            ("loss", f"{cfg.loss.name} (q = {self.model.q})"),
            ("batch", f"global {cfg.train.global_batch_size} = micro {self.micro_batch} x accum "
                      f"{self.grad_accum} x {topo.world_size} ranks"),
            ("schedule", f"{self.schedule_text()}, peak lr {cfg.peak_lr:.4g} ({cfg.optim.name})"),
            ("deepspeed", f"ZeRO {cfg.deepspeed.zero_stage}, {cfg.deepspeed.precision}, "
                          f"optimizer layout {self.zero_layout}"),
            ("data", f"{cfg.data.dataset}: {len(self.dataset)} images, {cfg.data.augmentations} views "
                     f"({'flips' if self.dataset.transform.desc1.flip_p > 0 else 'no flips'}), "
                     f"{self.data_backend} loader"),
            ("resumed", f"from {self.resumed_from} (step {self.state.step})" if self.resumed_from else "no"),
        ])

    # ------------------------------------------------------------------ checkpoints and preemption
    def checkpoint(self) -> str:
        """Save this step (when and how many to keep: `CheckpointPolicy`); collective."""
        if not self.params_finite():  # never write a non-finite state over a good checkpoint
            self.write_diagnostic("nonfinite.json", {"step": self.state.step, "epoch": self.state.epoch,
                                                     "what": "non-finite parameters before a checkpoint"})
            raise NonFiniteStateError(f"parameters are non-finite at step {self.state.step}; no checkpoint was "
                                      f"written, the last complete one in {self.run_dir / 'checkpoints'} is intact")
        if self.state.epoch_tally and self.tally is not None:
            self.tally.save_time()
        client = {"train_state": self.state.to_dict(), "config": self.cfg.to_dict(),
                  "sampler": self.loader.sharded_sampler.state_dict(self.state.samples_in_epoch),
                  **{hook.key: hook.state_dict() for hook in self.hooks}}
        return self.checkpoints.save(self.engine, self.state.step, client)

    def preempt(self) -> int:
        """Every rank saw a stop request at this step: checkpoint, close the epoch's record as
        partial, and return the exit status on which the launcher requeues the job."""
        self.checkpoint()
        self.monitor.end_epoch(self.epoch_record(partial=True))
        self.monitor.print(f"[yellow]preempted: checkpoint at step {self.state.step}; exiting with "
                           f"{PREEMPTED_EXIT_CODE} for requeue")
        return PREEMPTED_EXIT_CODE

    def close(self) -> None:
        monitor = getattr(self, "monitor", None)
        if monitor is not None:
            monitor.write_summary(final_step=self.state.step, skipped_steps=self.state.skipped_steps,
                                  loss_history=self.state.history,
                                  bad_files=self.loader.bad_files.as_dict() if hasattr(self, "loader") else {})
            monitor.close()
        self.profiler.close()
        for hook in self.hooks:
            hook.close()

    def check_run_dir(self) -> None:
        """Every rank checks that it can write the run directory, and all agree, before anything
        is written: StorageError (one line naming train.run_dir, the folder and the cause, exit 2)
        on every rank, never a traceback or a hang."""
        problems = comm.all_gather_objects(write_problem(self.run_dir))
        ranks_by_problem: dict = {}
        for rank, problem in enumerate(problems):
            if problem:
                ranks_by_problem.setdefault(problem, []).append(rank)
        if not ranks_by_problem:
            return
        if len(ranks_by_problem) == 1 and all(problems):  # the same cause everywhere: say it once
            raise StorageError(f"train.run_dir: {problems[0]}")
        raise StorageError("train.run_dir: " + "; ".join(
            f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: {problem}"
            for problem, ranks in ranks_by_problem.items()))

    def run(self) -> int:
        """The whole job. A failure on any rank is recorded for its peers (health.py), and an
        error here names a peer that failed first."""
        self.stop.install()  # SIGTERM/SIGUSR1 (SLURM preemption) -> checkpoint at the next step, then exit
        self.check_run_dir()
        self.health = RankHealth(self.run_dir, self.topo.rank, self.topo.world_size,
                                 self.cfg.train.peer_timeout_s)
        status = "failed"
        try:
            self.build()
            code = self.train()
            status = "preempted" if code == PREEMPTED_EXIT_CODE else "finished"
            return code
        except BaseException as err:
            text = f"{type(err).__name__}: {err}".strip()
            peers = self.health.peers_to_blame(err)
            self.health.mark("failed", text[:2000])
            if peers and comm.is_communication_error(err):  # the peer's failure broke our collective
                raise RankFailureError(f"rank {self.topo.rank} stopped because {peers} (then this rank's "
                                       f"collective failed: {comm.short_error(err)})") from err
            if peers:
                raise RankFailureError(f"rank {self.topo.rank} stopped ({text[:300]}); {peers}") from err
            raise
        finally:
            self.health.close(status)
            self.close()


# ---------------------------------------------------------------------------- metrics helpers
def peak_memory_mib(device: torch.device) -> float:
    """CUDA: the caching allocator's peak; CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
