"""sfrik_scale.preemption alone: real signals to this process set the stop request, nothing else."""
from __future__ import annotations

import os
import signal

import pytest

from sfrik_scale.preemption import PREEMPTED_EXIT_CODE, STOP_SIGNALS, StopRequest


@pytest.mark.parametrize("sig", STOP_SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_a_stop_signal_sets_the_request_and_the_process_lives_on(sig):
    stop = StopRequest().install()
    try:
        assert not stop.requested
        os.kill(os.getpid(), sig)  # delivered to the main thread before kill returns to Python code
        assert stop.requested
    finally:
        stop.restore()


def test_restore_gives_back_the_previous_handlers():
    seen = []
    previous = {sig: signal.signal(sig, lambda signum, frame: seen.append(signum)) for sig in STOP_SIGNALS}
    try:
        stop = StopRequest().install()
        stop.restore()
        for sig in STOP_SIGNALS:
            os.kill(os.getpid(), sig)
        assert seen == list(STOP_SIGNALS) and not stop.requested
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_no_request_without_a_signal_and_the_requeue_status_is_ex_tempfail():
    assert not StopRequest().requested
    assert PREEMPTED_EXIT_CODE == 75  # launchers/slurm.sbatch requeues on it
    assert set(STOP_SIGNALS) == {signal.SIGTERM, signal.SIGUSR1}
