"""``ckpt_path="last"`` for ``LoRACheckpointIO``: the run's newest committed training checkpoint.

Lightning resolves ``"last"`` from the ``last*.ckpt`` files its ``ModelCheckpoint`` callbacks find in their
folders, and warns and starts fresh when there are none. A run written through the plugin has its
checkpoints in the store instead, whichever callback (or call) wrote them, so for a Trainer whose
checkpoint plugin is a ``LoRACheckpointIO`` with a ``run_id``, ``"last"`` is looked up there. Lightning has
no hook for this choice; the lookup wraps its ``_CheckpointConnector._parse_ckpt_path`` once and leaves
every other Trainer and value to Lightning.

Resuming a fit is checked before it changes anything. Lightning restores the module, datamodule and
callbacks from a checkpoint before its strategy's ``setup`` creates the optimizers (unless the strategy's
``restore_checkpoint_after_setup`` says otherwise, as FSDP's and DeepSpeed's do), and the optimizers only
afterwards, so optimizer state that does not fit would surface once the module has changed, or only at the
first optimizer step. For fits through a ``LoRACheckpointIO`` the plugin therefore makes every strategy
restore after its setup, so that the plugin's ``load_checkpoint`` (the first step of every restore) sees the
live optimizers and checks the whole state against them before Lightning restores any of it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from lightning.pytorch.strategies import Strategy
from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector
from lightning.pytorch.trainer.states import TrainerFn
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


def install_restore_after_setup(io_type: type[Any]) -> None:
    """Make fits whose checkpoint plugin is an ``io_type`` restore checkpoints after the strategy's setup.

    Wraps ``Strategy.restore_checkpoint_after_setup`` once (idempotent): strategies that override it (FSDP,
    ``ModelParallelStrategy``, DeepSpeed) keep their own answer; every other Trainer, and every stage but
    fit, keeps Lightning's order.
    """
    original: Callable[[Strategy], bool] = vars(Strategy)["restore_checkpoint_after_setup"].fget
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def restore_after_setup(self: Strategy) -> bool:
        if original(self):
            return True
        module = self._lightning_module
        trainer = getattr(module, "_trainer", None) if module is not None else None
        fitting = trainer is not None and trainer.state.fn == TrainerFn.FITTING
        return fitting and isinstance(self._checkpoint_io, io_type)

    setattr(restore_after_setup, _MARK, True)
    Strategy.restore_checkpoint_after_setup = property(restore_after_setup)  # type: ignore[assignment,method-assign]
