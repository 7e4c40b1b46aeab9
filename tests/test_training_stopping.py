"""phivision.training.stopping: signals wait for the step's end while training, and stop at once otherwise."""

import os
import signal
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerControl

from phivision.training.stopping import RunInterrupted, StopAtStepEnd, StopSignals


def test_outside_training_a_signal_stops_at_once():
    signals = StopSignals()
    with signals.installed(), pytest.raises(RunInterrupted) as info:
        os.kill(os.getpid(), signal.SIGTERM)
    assert info.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored


def test_while_training_signals_wait_for_the_step_end_and_a_second_ctrl_c_does_not():
    signals = StopSignals()
    with signals.installed(), signals.deferring():
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # the scheduler repeating itself: still waits
        assert signals.received == signal.SIGTERM
    signals = StopSignals()
    with signals.installed(), signals.deferring():
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(RunInterrupted):
            os.kill(os.getpid(), signal.SIGINT)


def step_end(callback):
    control = TrainerControl()
    callback.on_step_end(SimpleNamespace(device=torch.device("cpu")), None, control)
    return control


def test_the_step_end_saves_and_stops_on_a_signal_or_too_many_bad_samples():
    signals, bad = StopSignals(), []
    callback = StopAtStepEnd(signals, bad, max_bad_samples=1)
    control = step_end(callback)
    assert not control.should_save and not control.should_training_stop and callback.reason is None
    bad.append("data.jsonl:3: OSError: truncated")
    assert not step_end(callback).should_training_stop  # one is within the budget
    bad.append("data.jsonl:9: OSError: truncated")
    control = step_end(callback)
    assert control.should_save and control.should_training_stop and callback.reason == "bad samples"
    signals.received = signal.SIGINT
    callback = StopAtStepEnd(signals, [], max_bad_samples=1)
    control = step_end(callback)
    assert control.should_save and control.should_training_stop
    assert (callback.reason, callback.signum) == ("signal", signal.SIGINT)
