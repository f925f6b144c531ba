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

Which checkpoint a Trainer call restores is decided before the module's ``setup`` runs, but Lightning only
records it (``trainer.ckpt_path``) when it restores, after ``setup``; :func:`selected_ckpt_path` gives the
choice at ``setup`` already, so ``LoRAModule(init_from=...)`` knows whether a restore will replace its weights.

A checkpoint saved after the last batch of an epoch holds the data loaders' state at the end of that epoch; a
stateful loader (torchdata's ``StatefulDataLoader``) restored from it would start the next epoch as if it were
already over, and one saved after the epoch's last step (a preemption checkpoint) would make Lightning skip
the next epoch's batches. :func:`forget_finished_epoch_loader_state` resets both on resume, so the next epoch
starts at its first batch, as it does in an uninterrupted run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

_MARK = "_lora_ckpt_last_lookup"
_SELECTED = "_lora_ckpt_selected_path"


def install_last_checkpoint_lookup(io_type: type[Any]) -> None:
    """Make ``ckpt_path="last"`` resolve through the store for Trainers whose checkpoint plugin is an
    ``io_type`` (``LoRACheckpointIO``: it has ``root``, ``run_id`` and ``last_training_checkpoint()``); idempotent."""
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
                'ckpt_path="last": LoRACheckpointIO has no run_id, so there is no run to resume; not resuming. '
                "Pass LoRACheckpointIO(run_id=...) to resume a run"
            )
            return None
        last = io.last_training_checkpoint()  # of the durable root or the local tier, whichever is newer
        if last is None:
            rank_zero_warn(
                f'ckpt_path="last": run {io.run_id!r} under {io.root} has no committed training checkpoint yet; '
                "not resuming"
            )
            return None
        rank_zero_info(
            f'ckpt_path="last": the newest committed training checkpoint of run {io.run_id!r} is {last.path}'
        )
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


def install_ckpt_path_record() -> None:
    """Record, for every Trainer call, the checkpoint it will restore (see :func:`selected_ckpt_path`); idempotent.

    Wraps ``_CheckpointConnector._select_ckpt_path`` (which every ``fit``/``validate``/``test``/``predict`` calls
    once, before ``setup``) to keep its answer; the answer itself is Lightning's (or the ``"last"`` lookup's).
    """
    original = _CheckpointConnector._select_ckpt_path
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def select_ckpt_path(self: _CheckpointConnector, *args: Any, **kwargs: Any) -> Any:
        setattr(self, _SELECTED, None)
        selected = original(self, *args, **kwargs)
        setattr(self, _SELECTED, selected)
        return selected

    setattr(select_ckpt_path, _MARK, True)
    _CheckpointConnector._select_ckpt_path = select_ckpt_path  # type: ignore[method-assign]


def selected_ckpt_path(trainer: Trainer) -> Any:
    """The checkpoint the Trainer's current call restores (None: none), known from its start, before ``setup``.

    Args:
        trainer: a Trainer inside ``fit``/``validate``/``test``/``predict``.

    Returns:
        The path Lightning will load, as it will pass it to the checkpoint plugin, or None.
    """
    return getattr(trainer._checkpoint_connector, _SELECTED, None)


def forget_finished_epoch_loader_state(checkpoint: dict[str, Any]) -> None:
    """Make a checkpoint saved at the end of an epoch resume at the next epoch's first batch (see the module doc).

    Saved at the epoch's last batch: the data loaders' state (a ``StatefulDataLoader`` at the end of its epoch)
    is dropped. Saved after that batch's end-of-step hooks (at the end of the epoch, or in ``on_exception`` once
    the epoch was counted complete, as Lightning's own ``OnExceptionCheckpoint`` saves): the epoch loop's
    per-epoch counters are set to an epoch's start as well, as the next epoch sets them; Lightning would
    otherwise take the next epoch's batches as already run. A checkpoint of any other moment is left as it is.

    Args:
        checkpoint: the Lightning checkpoint dict being restored (changed in place).
    """
    fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
    progress = fit_loop.get("epoch_loop.batch_progress", {})
    if not isinstance(progress, dict) or not progress.get("is_last_batch"):
        return
    loop_state = fit_loop.get("state_dict", {})
    if isinstance(loop_state, dict) and loop_state.get("combined_loader"):
        loop_state["combined_loader"] = []
    batches = progress.get("current", {})
    if batches.get("completed") == batches.get("processed"):  # saved after the last batch's end-of-step hooks
        for key, value in fit_loop.items():
            if key.startswith("epoch_loop.") and isinstance(value, dict):
                _zero_current(value)
        progress["is_last_batch"] = False


def _zero_current(progress: dict[str, Any]) -> None:
    """Set every per-epoch (``current``) counter of a loop's progress state to 0."""
    for key, value in progress.items():
        if key == "current" and isinstance(value, dict):
            progress[key] = {k: 0 if isinstance(v, int) else v for k, v in value.items()}
        elif isinstance(value, dict):
            _zero_current(value)
