"""Preemption: SIGTERM / SIGUSR1 become a stop request that the trainer honours at a step boundary.

SLURM warns a job before preempting or cancelling it (``--signal=USR1@...``, ``scancel``'s
SIGTERM). A handler here only sets a flag: the trainer all-reduces it with every micro-step's
loss (one collective), so every rank sees the request at the same optimiser step, writes a
checkpoint there and exits with `PREEMPTED_EXIT_CODE`, on which ``launchers/slurm.sbatch``
requeues the job; the requeued run resumes from that checkpoint.

``sfrik-scale pretrain`` installs the handler first thing, before torch and DeepSpeed load: a
signal during start-up (imports, the rendezvous, building the data pipeline) is honoured at the
first step instead of killing the process (the default action of SIGUSR1), and once training
has ended the signals are ignored (`ignore_stop_signals`).
"""
from __future__ import annotations

import signal
from typing import Any, Callable, Dict, Union

#: exit status after a preemption checkpoint (EX_TEMPFAIL): launchers/slurm.sbatch requeues on it
PREEMPTED_EXIT_CODE = 75

#: the signals that ask for a checkpoint and an exit (SLURM's warning signal and scancel's)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """A flag set by `STOP_SIGNALS` once `install` ed (the main thread only, as Python requires).

    ``requested`` is this process's view; the trainer agrees on it across ranks.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Dict[int, Union[Callable[..., Any], int, None]] = {}

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> "StopRequest":
        """Route the stop signals here (the handlers they had are kept for `restore`); a second
        call changes nothing."""
        if not self.installed:
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def restore(self) -> None:
        """Give the stop signals back the handlers they had before `install`."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        self.requested = True  # nothing else is safe in a handler: the loop acts at the next step


def ignore_stop_signals() -> None:
    """Once the work is done: a stop signal has nothing left to stop. Without this, one that
    arrives while the process shuts down (SLURM's ``--signal`` timer fires late or early, a
    preemption) kills it and its job counts as failed, since Python gives handlers it
    installed back the default action (terminate) while it finalises; an ignored signal stays
    ignored."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


__all__ = ["PREEMPTED_EXIT_CODE", "STOP_SIGNALS", "StopRequest", "ignore_stop_signals"]
