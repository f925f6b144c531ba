"""``ckpt_path="last"`` for ``LoRACheckpointIO``: the run's newest committed training checkpoint.

Lightning resolves ``"last"`` from the ``last*.ckpt`` files its ``ModelCheckpoint`` callbacks find in their
folders, and warns and starts fresh when there are none. A run written through the plugin has its
checkpoints in the store instead, whichever callback (or call) wrote them, so for a Trainer whose
checkpoint plugin is a ``LoRACheckpointIO`` with a ``run_id``, ``"last"`` is looked up there. Lightning has
no hook for this choice; the lookup wraps its ``_CheckpointConnector._parse_ckpt_path`` once and leaves
every other Trainer and value to Lightning.
"""

from __future__ import annotations

import functools
from typing import Any

from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector
from lightning.pytorch.utilities import rank_zero_warn

from ..storage.store import CheckpointStore

_MARK = "_lora_ckpt_last_lookup"


def install_last_checkpoint_lookup(io_type: type[Any]) -> None:
    """Make ``ckpt_path="last"`` resolve through the store for Trainers whose checkpoint plugin is an
    ``io_type`` (``LoRACheckpointIO``: it has ``root``, ``run_id`` and ``storage_options``); idempotent."""
    original = _CheckpointConnector._parse_ckpt_path
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def parse_ckpt_path(self: _CheckpointConnector, state_fn: Any, ckpt_path: Any, *args: Any, **kwargs: Any) -> Any:
        io = self.trainer.strategy.checkpoint_io
        if ckpt_path != "last" or not isinstance(io, io_type):
            return original(self, state_fn, ckpt_path, *args, **kwargs)
        if io.run_id is None:
            rank_zero_warn(
                'ckpt_path="last": LoRACheckpointIO has no run_id, so there is no run to resume; starting fresh. '
                "Pass LoRACheckpointIO(run_id=...) to resume a run"
            )
            return None
        last = CheckpointStore(io.root, io.storage_options).last_checkpoint(io.run_id, "training")
        if last is None:
            rank_zero_warn(
                f'ckpt_path="last": run {io.run_id!r} under {io.root} has no committed training checkpoint yet; '
                "starting fresh"
            )
            return None
        return last.path

    setattr(parse_ckpt_path, _MARK, True)
    _CheckpointConnector._parse_ckpt_path = parse_ckpt_path  # type: ignore[method-assign]
