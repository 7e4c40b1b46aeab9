"""Stopping a run without losing work: on SIGTERM / SIGINT (preemption, Ctrl-C), or when too many samples
turn out unreadable, every process stops at the same optimizer step and a checkpoint is written there.

Signals arrive at each process at its own moment, so the processes agree at each step's end (one
all-reduce of two numbers) before any of them stops. Outside training (loading, evaluation) a signal
stops the run at once: there is no step to finish and nothing new to save.

DataLoader workers ignore both signals (`WorkersIgnoreStopSignals`): torchrun signals each worker's whole
process group, and a data worker that died of it would end the run with a RuntimeError before its step.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from transformers import TrainerCallback

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunInterrupted(Exception):
    """A stop signal outside training, or a second Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """Catches SIGTERM and SIGINT: noted while training runs (`deferred`), raised as RunInterrupted otherwise."""

    def __init__(self):
        self.received: int | None = None
        self.deferred = False

    def handle(self, signum, frame) -> None:
        if self.deferred and not (signum == signal.SIGINT and self.received == signal.SIGINT):
            self.received = self.received or signum  # a second Ctrl-C (only) stops at once
            return
        raise RunInterrupted(signum)

    @contextmanager
    def installed(self) -> Iterator[StopSignals]:
        previous = {s: signal.signal(s, self.handle) for s in STOP_SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    @contextmanager
    def deferring(self) -> Iterator[None]:
        """While training: signals wait for the end of the current step."""
        self.deferred = True
        try:
            yield
        finally:
            self.deferred = False


class WorkersIgnoreStopSignals:
    """A DataLoader `worker_init_fn` that makes the worker ignore SIGTERM and SIGINT, then calls `then`.

    The main process decides when to stop and stops its workers itself. torch installs its own SIGTERM handler
    in each worker (it exits at once), and a terminal's Ctrl-C or torchrun's SIGTERM reaches every process of
    the group: a worker gone before the step ends makes the main process raise "DataLoader worker ... killed
    by signal". A class, not a closure: under the spawn start method it is pickled to the worker.
    """

    def __init__(self, then: Callable[[int], None] | None = None):
        self.then = then

    def __call__(self, worker_id: int) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        if self.then is not None:
            self.then(worker_id)


class StopAtStepEnd(TrainerCallback):
    """Ends training at the first step boundary after a stop signal, or once the unreadable samples pass
    `max_bad_samples`, with a checkpoint at that step on every process."""

    def __init__(self, signals: StopSignals, bad_samples: list[str], max_bad_samples: int):
        self.signals, self.bad_samples, self.max_bad_samples = signals, bad_samples, max_bad_samples
        self.reason: str | None = None  # "signal" or "bad samples" once stopped
        self.signum: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        status = torch.tensor([float(self.signals.received is not None), float(len(self.bad_samples))],
                              device=args.device)
        if dist.is_initialized():
            dist.all_reduce(status)  # processes that got a signal, bad samples of all processes
        stopped, bad_count = status.tolist()
        if stopped or bad_count > self.max_bad_samples:
            self.reason = "signal" if stopped else "bad samples"
            self.signum = self.signals.received or signal.SIGTERM  # a process that got none stops with the others
            control.should_save = True
            control.should_training_stop = True
        return control
