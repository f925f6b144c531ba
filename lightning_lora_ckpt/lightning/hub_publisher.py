"""``HubPublisher``: publishes sampler checkpoints to the Hugging Face Hub during fit."""

from __future__ import annotations

import logging
from typing import Any, Literal

from typing_extensions import override

from ..format.records import Checkpoint
from ..modeling.servable import check_servable
from ..storage.hub import HubPublishError, push_to_hub
from ..storage.store import CheckpointStore
from .sampler_follower import SamplerCheckpointFollower, save_key

log = logging.getLogger(__name__)

Strategy = Literal["final", "every_save", "best"]


class HubPublisher(SamplerCheckpointFollower):
    """Publishes the run's sampler checkpoints (saved through ``LoRACheckpointIO``) to the Hub during fit.

    - ``"final"``: the newest sampler checkpoint when fit ends (``PeriodicCheckpoint``'s ``final``);
    - ``"every_save"``: each new sampler checkpoint, looked for after every optimizer step and when
      training ends;
    - ``"best"``: a new sampler checkpoint only if the logged ``monitor`` then beats (per ``mode``) the
      value at the last publish.

    Only committed checkpoints are listed, so nothing half-written is published. Rank 0 publishes from one
    background thread, one checkpoint at a time: a checkpoint superseded while a publish runs is skipped,
    and the newest one is always considered when fit ends, after the pending writes have committed. Each
    checkpoint is tried once, after ``check_servable`` (an adapter vLLM could not serve is not published
    while ``servable_check="vllm"``). Failures are logged as warnings, or raised at the end of fit with
    ``fail_on_error``; local checkpoints are only ever read.
    """

    action = "publish"
    thread_name = "lora-hub-publisher"

    def __init__(
        self,
        repo_id: str,
        strategy: Strategy = "final",
        private: bool = True,
        token: str | None = None,
        monitor: str | None = None,
        fail_on_error: bool = False,
        mode: Literal["min", "max"] = "min",
        servable_check: Literal["vllm"] | None = "vllm",
    ) -> None:
        if strategy not in ("final", "every_save", "best"):
            raise ValueError(f"strategy must be 'final', 'every_save' or 'best', got {strategy!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if strategy == "best" and not monitor:
            raise ValueError("strategy='best' needs monitor=<name of a logged metric>")
        super().__init__(every_save=strategy != "final", fail_on_error=fail_on_error)
        self.repo_id, self.strategy, self.private, self.token = repo_id, strategy, private, token
        self.monitor, self.mode, self.servable_check = monitor, mode, servable_check
        self.published: frozenset[str] = frozenset()
        self.best: float | None = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"published": sorted(self.published), "best": self.best}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.published = frozenset(state_dict["published"])
        self.best = state_dict.get("best")

    @override
    def _done(self, checkpoint: Checkpoint) -> bool:
        return save_key(checkpoint) in self.published

    @override
    def _failure(self, error: Exception) -> Exception:
        return HubPublishError(f"HubPublisher could not publish to {self.repo_id}: {error}")

    @override
    def _act(self, checkpoint: Checkpoint, store: CheckpointStore, metrics: dict[str, float]) -> None:
        metric = metrics.get(self.monitor) if self.monitor else None
        if self.strategy == "best" and not self._improves(metric):
            return
        if self.servable_check is not None:
            check_servable(checkpoint.path, self.servable_check, storage_options=store.storage_options)
        url = push_to_hub(
            checkpoint.path,
            self.repo_id,
            private=self.private,
            token=self.token,
            metrics=metrics,
            storage_options=store.storage_options,
        )
        # A new set, not an in-place add: state_dict() may be iterating the old one on the training thread.
        self.published = self.published | {save_key(checkpoint)}
        self.best = metric if metric is not None else self.best
        log.info("HubPublisher: published %s to %s", checkpoint.path, url)

    def _improves(self, metric: float | None) -> bool:
        if metric is None:
            return False
        return self.best is None or (metric < self.best if self.mode == "min" else metric > self.best)
