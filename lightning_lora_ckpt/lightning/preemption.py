"""Preemption: a training checkpoint of the current step committed before a terminated process exits.

On SIGTERM Lightning's signal connector sets ``trainer.received_sigterm``; the fit loop finishes the
current step, raises ``SIGTERMException`` (a ``SystemExit``) at the batch boundary and calls every
callback's ``on_exception`` before it tears down and exits. :class:`PreemptionSaver` (driven by
``PeriodicCheckpoint(save_on_preemption=True)``) saves at the first of: the end of the step the signal
arrived in (``on_train_batch_end``: the same state as a periodic checkpoint of that step), the end of the
epoch, or ``on_exception`` (a signal that arrived after those hooks, e.g. during validation). It waits for
the pending asynchronous saves, then writes a training checkpoint ``preempted-<step>`` synchronously, so it
has committed when the hook returns; a step that already has a training checkpoint gets none. Under SLURM
with Lightning's auto-requeue, the requeue signal (``SIGUSR1`` by default, sent ahead of the time limit)
also asks for one, at the end of the step, while training goes on until the SIGTERM after the requeue.

The signal handlers are wrapped (never replaced): Lightning's still run. They only record the time and
set a flag; all saving happens in the training loop's own thread, between steps.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType
from typing import Any

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .checkpoint_io import LoRACheckpointIO

log = logging.getLogger(__name__)

#: The name prefix of preemption checkpoints: ``preempted-000123`` (training checkpoints of the run).
PREEMPTED_PREFIX = "preempted-"


class PreemptionSaver:
    """Commits a training checkpoint of the current step when the process is told to stop (see the module doc).

    Attributes:
        signalled_at: ``time.monotonic()`` of the first SIGTERM or requeue signal not yet answered by a save.
        last_commit_seconds: seconds from that signal to the commit of the last preemption checkpoint.
    """

    def __init__(self) -> None:
        self.signalled_at: float | None = None
        self.last_commit_seconds: float | None = None
        self._requested = False  # a requeue signal asks for a save at the next batch boundary
        self._saved_step: int | None = None  # the newest step with a training checkpoint (None: not fitting)
        self._wrapped: dict[int, tuple[Any, Any]] = {}  # signal -> (our handler, the one it wraps)
        self._requeue_signal: int | None = None  # the requeue signal, where its handler is wrapped

    # -- signals ------------------------------------------------------------------------------------
    def start(self, trainer: Trainer) -> None:
        """At the start of training (Lightning has registered its handlers): wrap the SIGTERM handler, and the
        requeue signal's under SLURM auto-requeue. A resumed run has a checkpoint of its first step already."""
        self.signalled_at, self.last_commit_seconds, self._requested = None, None, False
        self._saved_step = trainer.global_step
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (Lightning sets none either)
        self._wrap(signal.SIGTERM, request=False)
        environment = trainer._accelerator_connector.cluster_environment
        requeue = None
        if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
            requeue = environment.requeue_signal
        if requeue is not None and self._wrap(requeue, request=True):
            self._requeue_signal = requeue

    def _wrap(self, signum: int, request: bool) -> bool:
        previous = signal.getsignal(signum)
        if not callable(previous):  # Lightning did not register one: the default action is left as it is
            return False

        def handler(received: int, frame: FrameType | None) -> None:
            if self.signalled_at is None:
                self.signalled_at = time.monotonic()
            self._requested = self._requested or request
            previous(received, frame)

        signal.signal(signum, handler)
        self._wrapped[signum] = (handler, previous)
        return True

    def stop(self) -> None:
        """Put back the handlers this wrapped (only where ours is still the one set)."""
        for signum, (handler, previous) in self._wrapped.items():
            if threading.current_thread() is threading.main_thread() and signal.getsignal(signum) is handler:
                signal.signal(signum, previous)
        self._wrapped, self._requeue_signal = {}, None

    # -- saving -------------------------------------------------------------------------------------
    def saved(self, step: int) -> None:
        """Record that a training checkpoint of ``step`` was just saved (queued) by the owning callback."""
        if self._saved_step is not None:
            self._saved_step = max(self._saved_step, step)

    def on_batch_end(self, trainer: Trainer, io: LoRACheckpointIO) -> None:
        """After a step: save now if SIGTERM or a requeue signal has arrived.

        With several processes a save is collective, so only agreed signals count here: the requeue signal as
        rank 0 saw it (broadcast, only under SLURM auto-requeue); SIGTERM is left to ``on_exception``, where
        Lightning (which broadcasts rank 0's SIGTERM at every step) stops every rank at the same step.
        """
        if trainer.world_size > 1:
            if self._requeue_signal is not None and trainer.strategy.broadcast(self._requested):
                self._requested = False
                self._save(trainer, io, "the SLURM requeue signal")
        elif trainer.received_sigterm:
            self._save(trainer, io, "SIGTERM")
        elif self._requested:
            self._requested = False
            self._save(trainer, io, "the SLURM requeue signal")

    def on_epoch_end(self, trainer: Trainer, io: LoRACheckpointIO) -> None:
        """At the end of an epoch (before Lightning counts it complete): save if SIGTERM has arrived (one process)."""
        if trainer.world_size == 1 and trainer.received_sigterm:
            self._save(trainer, io, "SIGTERM")

    def on_exception(self, trainer: Trainer, io: LoRACheckpointIO, exception: BaseException) -> None:
        """On Lightning's ``SIGTERMException`` during fit: save, then let Lightning exit."""
        self.stop()
        if isinstance(exception, SIGTERMException) and trainer.state.fn == TrainerFn.FITTING:
            self._save(trainer, io, "SIGTERM")  # a signal after this step's hooks; else it has its checkpoint
        self._saved_step = None

    def _save(self, trainer: Trainer, io: LoRACheckpointIO, why: str) -> None:
        """Flush the pending saves, then commit ``preempted-<step>`` unless a training checkpoint of this step
        exists. Errors are logged, not raised: the process is stopping and Lightning's exit must go on."""
        step, started = trainer.global_step, time.monotonic()
        if self._saved_step is None or (step == self._saved_step and self.signalled_at is None):
            return  # training never started in this fit, or this signal was answered already at this step
        try:
            io.wait()
        except Exception as err:  # a failed earlier save; this one is written all the same
            log.error("PeriodicCheckpoint: an earlier asynchronous save failed: %s", err)
        name = f"{PREEMPTED_PREFIX}{step:06d}"
        try:
            if step > self._saved_step:
                trainer.save_checkpoint(name, storage_options={"overwrite": True})
                io.wait()
                self._saved_step = step
            else:
                name = f"the training checkpoint of step {step} saved before it"
        except Exception:
            log.exception("PeriodicCheckpoint: the preemption checkpoint %s (on %s) could not be saved", name, why)
            return
        now = time.monotonic()
        self.last_commit_seconds = now - (self.signalled_at if self.signalled_at is not None else started)
        self.signalled_at = None  # the next signal is timed from its own arrival
        if trainer.is_global_zero:
            uri = io.resolve(name, "training") if name.startswith(PREEMPTED_PREFIX) else name
            log.warning(
                "PeriodicCheckpoint: on %s, committed %s at step %d, %.2f s after the signal (saving took %.2f s)",
                why,
                uri,
                step,
                self.last_commit_seconds,
                now - started,
            )
