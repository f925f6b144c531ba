"""``HubPublisher``: publishes sampler checkpoints to the Hugging Face Hub during fit."""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from ..format.records import Checkpoint
from ..format.strict_json import iso_time
from ..storage.hub import HubPublishError, push_to_hub
from ..storage.store import CheckpointStore
from .callbacks import checkpoint_io

log = logging.getLogger(__name__)

Strategy = Literal["final", "every_save", "best"]


class HubPublisher(Callback):
    """Publishes the run's sampler checkpoints (saved through ``LoRACheckpointIO``) to the Hub during fit.

    - ``"final"``: the newest sampler checkpoint when fit ends (``PeriodicCheckpoint``'s ``final``);
    - ``"every_save"``: each new sampler checkpoint, looked for after every optimizer step and when
      training ends;
    - ``"best"``: a new sampler checkpoint only if the logged ``monitor`` then beats (per ``mode``) the
      value at the last publish.

    Only committed checkpoints are listed, so nothing half-written is published. Rank 0 publishes from one
    background thread, one checkpoint at a time: a checkpoint superseded while a publish runs is skipped,
    and the newest one is always considered when fit ends, after the pending writes have committed. Each
    checkpoint is tried once. Failures are logged as warnings, or raised at the end of fit with
    ``fail_on_error``; local checkpoints are only ever read.
    """

    def __init__(
        self,
        repo_id: str,
        strategy: Strategy = "final",
        private: bool = True,
        token: str | None = None,
        monitor: str | None = None,
        fail_on_error: bool = False,
        mode: Literal["min", "max"] = "min",
    ) -> None:
        if strategy not in ("final", "every_save", "best"):
            raise ValueError(f"strategy must be 'final', 'every_save' or 'best', got {strategy!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if strategy == "best" and not monitor:
            raise ValueError("strategy='best' needs monitor=<name of a logged metric>")
        self.repo_id, self.strategy, self.private, self.token = repo_id, strategy, private, token
        self.monitor, self.fail_on_error, self.mode = monitor, fail_on_error, mode
        self.published: frozenset[str] = frozenset()
        self.best: float | None = None
        self._seen: str | None = None
        self._errors: list[Exception] = []
        self._executor: ThreadPoolExecutor | None = None
        self._running: Future[None] | None = None
        self._last_step = -1

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        checkpoint_io(trainer)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.strategy == "final" or not trainer.is_global_zero or trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        if self._running is None or self._running.done():
            self._submit(trainer)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The last periodic save, before a ``final`` saved at this same step can supersede it.
        if self.strategy != "final" and trainer.is_global_zero:
            self._publish_after_writes(trainer)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self._publish_after_writes(trainer)
        self.wait()
        errors, self._errors = self._errors, []
        if errors and self.fail_on_error:
            raise HubPublishError(f"HubPublisher could not publish to {self.repo_id}: {errors[0]}") from errors[0]

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._shutdown()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._shutdown()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"published": sorted(self.published), "best": self.best}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.published = frozenset(state_dict["published"])
        self.best = state_dict.get("best")

    def wait(self) -> None:
        """Block until the running publish, if any, has finished."""
        if self._running is not None:
            self._running.result()
            self._running = None

    # -- publishing ---------------------------------------------------------------------------------
    def _publish_after_writes(self, trainer: Trainer) -> None:
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
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-hub-publisher")
        self._running = self._executor.submit(self._publish_newest, store, io.run_id, metrics)

    def _publish_newest(self, store: CheckpointStore, run_id: str, metrics: dict[str, float]) -> None:
        try:
            newest = store.last_checkpoint(run_id, "sampler")
            if newest is None or _key(newest) in self.published or _key(newest) == self._seen:
                return
            self._seen = _key(newest)
            metric = metrics.get(self.monitor) if self.monitor else None
            if self.strategy == "best" and not self._improves(metric):
                return
            url = push_to_hub(
                newest.path,
                self.repo_id,
                private=self.private,
                token=self.token,
                metrics=metrics,
                storage_options=store.storage_options,
            )
            # A new set, not an in-place add: state_dict() may be iterating the old one on the training thread.
            self.published = self.published | {_key(newest)}
            self.best = metric if metric is not None else self.best
            log.info("HubPublisher: published %s to %s", newest.path, url)
        except Exception as err:
            log.warning("HubPublisher could not publish to %s: %s", self.repo_id, err)
            self._errors.append(err)

    def _improves(self, metric: float | None) -> bool:
        if metric is None:
            return False
        return self.best is None or (metric < self.best if self.mode == "min" else metric > self.best)

    def _shutdown(self) -> None:
        self.wait()
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None


def _key(checkpoint: Checkpoint) -> str:
    """Identity of one save: a name saved again (``final`` of a later fit) is a new checkpoint."""
    return f"{checkpoint.run_id}/{checkpoint.checkpoint_id}@{iso_time(checkpoint.time)}"
