"""The base of the callbacks that act on each new committed sampler checkpoint of the run (Hub publishing, vLLM
hotloading): rank 0 only, one background thread, nothing queued twice, the newest one considered at the end."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from ..format.records import Checkpoint
from ..format.strict_json import iso_time
from ..storage.store import CheckpointStore
from .callbacks import checkpoint_io


class SamplerCheckpointFollower(Callback, ABC):
    """Calls :meth:`_act` on the run's newest committed sampler checkpoint, from rank 0, in one background thread.

    Only committed checkpoints are listed, so nothing half-written is acted on. With ``every_save`` the
    newest one is looked for after every optimizer step while no action runs (a checkpoint superseded while
    one runs is skipped); the newest one is always considered when training ends, after the pending writes have
    committed. Each checkpoint is acted on at most once. Failures are logged as warnings, or raised at the end
    of fit with ``fail_on_error``; checkpoints are only ever read.

    Args:
        every_save: act during training, not only at its end.
        fail_on_error: raise the first failure when fit ends.
    """

    #: What the subclass does, for log lines and the error raised with ``fail_on_error``.
    action = "act on"
    #: The thread's name prefix.
    thread_name = "lora-follower"

    def __init__(self, every_save: bool, fail_on_error: bool) -> None:
        self.every_save, self.fail_on_error = every_save, fail_on_error
        self._seen: str | None = None
        self._errors: list[Exception] = []
        self._executor: ThreadPoolExecutor | None = None
        self._running: Future[None] | None = None
        self._last_step = -1

    @abstractmethod
    def _act(self, checkpoint: Checkpoint, store: CheckpointStore, metrics: dict[str, float]) -> None:
        """Handle one new checkpoint (in the background thread); raise to report a failure."""

    def _done(self, checkpoint: Checkpoint) -> bool:
        """Whether ``checkpoint`` was handled already (e.g. by the run before a resume)."""
        return False

    def _failure(self, error: Exception) -> Exception:
        """The error ``fail_on_error`` raises at the end of fit, for the first failure ``error``."""
        return RuntimeError(f"{type(self).__name__} could not {self.action}: {error}")

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        checkpoint_io(trainer)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.every_save or not trainer.is_global_zero or trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        if self._running is None or self._running.done():
            self._submit(trainer)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The last periodic save, before a ``final`` saved at this same step can supersede it.
        if self.every_save and trainer.is_global_zero:
            self._after_writes(trainer)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self._after_writes(trainer)
        self.wait()
        errors, self._errors = self._errors, []
        if errors and self.fail_on_error:
            raise self._failure(errors[0]) from errors[0]

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._shutdown()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._shutdown()

    def wait(self) -> None:
        """Block until the running action, if any, has finished."""
        if self._running is not None:
            self._running.result()
            self._running = None

    def _after_writes(self, trainer: Trainer) -> None:
        self.wait()
        checkpoint_io(trainer).wait()
        self._submit(trainer)

    def _submit(self, trainer: Trainer) -> None:
        io = checkpoint_io(trainer)
        if io.run_id is None:  # nothing saved yet
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        store = CheckpointStore(io.root, io.storage_options)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.thread_name)
        self._running = self._executor.submit(self._act_on_newest, store, io.run_id, metrics)

    def _act_on_newest(self, store: CheckpointStore, run_id: str, metrics: dict[str, float]) -> None:
        try:
            newest = store.last_checkpoint(run_id, "sampler")
            if newest is None or save_key(newest) == self._seen or self._done(newest):
                return
            self._seen = save_key(newest)
            self._act(newest, store, metrics)
        except Exception as err:
            # Logged under the subclass's module, where users look for its messages.
            logging.getLogger(type(self).__module__).warning(
                "%s could not %s: %s", type(self).__name__, self.action, err
            )
            self._errors.append(err)

    def _shutdown(self) -> None:
        self.wait()
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None


def save_key(checkpoint: Checkpoint) -> str:
    """Identity of one save: a name saved again (``final`` of a later fit) is a new checkpoint.

    Args:
        checkpoint: a committed checkpoint.

    Returns:
        ``<run>/<checkpoint_id>@<save time>``.
    """
    return f"{checkpoint.run_id}/{checkpoint.checkpoint_id}@{iso_time(checkpoint.time)}"
