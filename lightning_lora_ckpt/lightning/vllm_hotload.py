"""``VLLMHotload``: loads each committed sampler checkpoint into a running vLLM server during fit."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from typing_extensions import override

from ..format.records import Checkpoint
from ..modeling.hotload import ServedAdapter, hotload
from ..modeling.vllm_client import DEFAULT_TIMEOUT_S, VLLMServerError
from ..storage.store import CheckpointStore
from .sampler_follower import SamplerCheckpointFollower

log = logging.getLogger(__name__)


class VLLMHotload(SamplerCheckpointFollower):
    """After each committed sampler checkpoint of the run, loads it into the vLLM server at ``base_url``.

    Each adapter is loaded under a name carrying its content digest (``hotload``), checked to be listed by
    ``/v1/models``, and the ones this callback loaded beyond the newest ``keep`` are unloaded. Rank 0 does it in
    one background thread after the checkpoint is committed (never before it is durable); a checkpoint
    superseded while a load runs is skipped, the newest one is always loaded when training ends. A server that
    is down or refuses is logged (or raised at the end of fit with ``fail_on_error``); training goes on and the
    checkpoint stays. Sample the newest one with ``DeploymentSampler(base_url, callback.served[-1])``.

    Args:
        base_url: the server, e.g. ``http://127.0.0.1:8000`` (started with ``--enable-lora`` and
            ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``).
        keep: how many of the adapters it loaded stay loaded (the newest ones).
        fail_on_error: raise the first failure when fit ends.
        max_lora_rank: the server's ``--max-lora-rank``, checked before each load; None leaves it to vLLM.
        cache_dir: where checkpoints of a remote root are downloaded for the server (``hotload``'s default if
            None).
        api_key: the server's ``--api-key``, if any.
        timeout_s: the most seconds each request may take.

    Attributes:
        served: what it loaded and still serves, oldest first.
        latencies: seconds from each checkpoint's save (its manifest's time) to the server listing it, oldest first.

    Raises:
        ValueError: ``keep`` is below 1.
    """

    action = "hotload"
    thread_name = "lora-vllm-hotload"

    def __init__(
        self,
        base_url: str,
        keep: int = 2,
        fail_on_error: bool = False,
        *,
        max_lora_rank: int | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        api_key: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        super().__init__(every_save=True, fail_on_error=fail_on_error)
        self.base_url, self.keep, self.max_lora_rank = base_url, keep, max_lora_rank
        self.cache_dir, self.api_key, self.timeout_s = cache_dir, api_key, timeout_s
        self.served: list[ServedAdapter] = []
        self.latencies: list[float] = []
        self._inherited: list[str] = []  # loaded by the run this one resumes

    @property
    def identity(self) -> ServedAdapter | None:
        """The newest adapter it loaded, or None."""
        return self.served[-1] if self.served else None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"served": [adapter.vllm_name for adapter in self.served]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A resumed run unloads, beyond ``keep``, what the interrupted one loaded too.
        self._inherited = list(state_dict.get("served", []))

    @override
    def _failure(self, error: Exception) -> Exception:
        return VLLMServerError(f"VLLMHotload could not hotload into {self.base_url}: {error}")

    @override
    def _act(self, checkpoint: Checkpoint, store: CheckpointStore, metrics: dict[str, float]) -> None:
        names = [*self._inherited, *(adapter.vllm_name for adapter in self.served)]
        older = names[: max(len(names) - (self.keep - 1), 0)]
        adapter = hotload(
            checkpoint.path,
            self.base_url,
            unload=older,
            max_lora_rank=self.max_lora_rank,
            cache_dir=self.cache_dir,
            storage_options=store.storage_options,
            api_key=self.api_key,
            timeout_s=self.timeout_s,
        )
        self.latencies = [*self.latencies, time.time() - checkpoint.time.timestamp()]
        self._inherited = [name for name in self._inherited if name not in older]
        # New lists, not in-place edits: the training thread may be reading them.
        self.served = [
            *(a for a in self.served if a.vllm_name not in older and a.vllm_name != adapter.vllm_name),
            adapter,
        ]
        log.info("VLLMHotload: %s serves %s as %s", self.base_url, checkpoint.path, adapter.vllm_name)
