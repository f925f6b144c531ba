"""Asynchronous saving, as a wrapper around the synchronous :class:`LoRACheckpointIO` operations.

Like Lightning's ``AsyncCheckpointIO`` around a ``CheckpointIO``, :class:`AsyncSaves` runs the wrapped
IO's commits and deletions in one background thread, in order. Before that, a save's state must be encoded
and its tensors copied off the live training state: a second thread does both while the next training step's
forward and backward run, and every optimizer update waits for it (a global torch optimizer step
pre-hook owned by this wrapper, wrapping the step's closure), so the copy never sees a later update.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from ..format.layout import CheckpointType
from ..format.payload import CheckpointPayload

log = logging.getLogger(__name__)


def snapshot_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy that later in-place updates of ``tensor`` cannot change."""
    return tensor.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)


class AsyncSaves:
    """Background commits of a checkpoint IO: copies staged during the next step, writes in submission order.

    Args:
        run: runs one job of the wrapped IO (a save of a checkpoint type, or a deletion: None) with its
            error bookkeeping.
    """

    def __init__(self, run: Callable[[Callable[[], Any], CheckpointType | None], Any]) -> None:
        self._run = run
        self._writer: ThreadPoolExecutor | None = None
        self._stager: ThreadPoolExecutor | None = None
        self._staging: list[Future[None]] = []
        self._pending: list[Future[Any]] = []
        self._hook: RemovableHandle | None = None

    def save(self, payload: CheckpointPayload, commit: Callable[[], Any]) -> None:
        """Copy ``payload``'s tensors in the background, then run ``commit`` in the writer thread."""
        if self._stager is None:
            self._stager = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-ckpt-stager")
        if self._hook is None:
            self._hook = register_optimizer_step_pre_hook(self._wait_before_update)
        staged = self._stager.submit(payload.stage, snapshot_tensor)
        self._staging.append(staged)

        def write() -> Any:
            staged.result()
            return commit()

        self.submit(write, payload.checkpoint_type)

    def submit(self, job: Callable[[], Any], saving: CheckpointType | None) -> None:
        """Run ``job`` in the writer thread after every job submitted before it."""
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-ckpt-writer")
        self._pending.append(self._writer.submit(self._run, job, saving))

    @property
    def snapshots_pending(self) -> bool:
        """Whether a save may still be reading the live adapter and optimizer tensors."""
        return bool(self._staging)

    def wait_for_snapshots(self) -> None:
        """Block until every save queued so far has copied its tensors."""
        staging, self._staging = self._staging, []
        for staged in staging:
            staged.exception()  # a failed copy is raised by its save, at the next save or the end of fit

    def wait(self) -> None:
        """Block until every queued job has finished; raise the first error."""
        pending, self._pending = self._pending, []
        errors = [f.exception() for f in pending]
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first

    def raise_failed(self) -> None:
        """Raise the error of a job that has already failed (checked before each new save)."""
        failed = [f for f in self._pending if f.done() and f.exception() is not None]
        self._pending = [f for f in self._pending if not f.done()]
        if failed:
            raise RuntimeError(f"An earlier asynchronous checkpoint write failed: {failed[0].exception()}") from (
                failed[0].exception()
            )

    def close(self) -> None:
        """Wait for every queued job (raising the first error), then stop the threads and the hook."""
        try:
            self.wait()
        finally:
            for executor in (self._writer, self._stager):
                if executor is not None:
                    executor.shutdown()
            self._writer = self._stager = None
            if self._hook is not None:
                self._hook.remove()
                self._hook = None

    def _wait_before_update(self, optimizer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Optimizer step pre-hook: the update waits for pending copies, after the step's closure ran."""
        if not self._staging:
            return None
        # ``args`` starts with the optimizer itself: a positional closure is args[1].
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self.wait_for_snapshots()
            return None

        def closure_then_wait() -> Any:
            loss = closure()
            self.wait_for_snapshots()
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_wait}
        return (args[0], closure_then_wait, *args[2:]), kwargs
