"""The callback that makes ``LoRACheckpointIO`` work with any LightningModule and Lightning's ``ModelCheckpoint``.

Installed with the package, it is added to every Trainer through Lightning's
``lightning.pytorch.callbacks_factory`` entry point, and acts only on Trainers whose checkpoint plugin is a
:class:`LoRACheckpointIO`. At setup it binds the module's PEFT adapter (refusing a module without one, with
the fix), has the plugin record the Trainer's scalar ``callback_metrics`` in every checkpoint's manifest,
and points every ``ModelCheckpoint`` without a ``dirpath`` at the run's folders; at the start of
training it checks that the state can be stored without pickle; on resume it restores the RNG states
(and forgets the loaders' state of an epoch that had ended).
The plugin itself picks the bound adapter out of every checkpoint dict it saves.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import Strategy
from typing_extensions import override

from ..format import layout
from ..format.state_codec import StateEncodingError, encode_state
from .checkpoint_dict import AdapterBinding
from .checkpoint_io import LoRACheckpointIO
from .resume import forget_finished_epoch_loader_state


def lora_checkpoint_io(trainer: Trainer) -> LoRACheckpointIO | None:
    """The trainer's ``LoRACheckpointIO``, or None if it has another checkpoint plugin."""
    io = trainer.strategy.checkpoint_io
    return io if isinstance(io, LoRACheckpointIO) else None


class LoRAAdapterCheckpointing(Callback):
    """Binds the PEFT LoRA adapter of any LightningModule to the trainer's ``LoRACheckpointIO``.

    Nothing to configure: Lightning adds it to every Trainer (entry point), and it does nothing unless the
    Trainer has ``plugins=[LoRACheckpointIO(...)]``. Adding it by hand is allowed (one instance acts).
    """

    def __init__(self) -> None:
        self.binding: AdapterBinding | None = None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Bind the module's adapter and map ``ModelCheckpoint`` folders (see the module docstring).

        Raises:
            ValueError: the module holds no single PEFT LoRA adapter the plugin can save, with the fix.
        """
        io = lora_checkpoint_io(trainer)
        first = next(cb for cb in trainer.callbacks if isinstance(cb, LoRAAdapterCheckpointing))  # type: ignore[attr-defined]
        if io is None or first is not self:
            self.binding = None
            return
        existing = getattr(pl_module, "adapter_binding", None)
        self.binding = existing if isinstance(existing, AdapterBinding) else AdapterBinding.of_module(pl_module)
        io.adapter_binding = self.binding
        io.bound_module = pl_module
        io.metrics_source = functools.partial(logged_metrics, trainer)
        # Only the adapter is in a checkpoint's state_dict; the plugin checks keys and shapes itself.
        pl_module.strict_loading = False
        io.run_id = trainer.strategy.broadcast(io.ensure_run_id())
        use_bound_tensors(trainer, pl_module, self.binding)
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                kind = "sampler_weights" if callback.save_weights_only else "weights"
                callback.dirpath = layout.join(io.root, io.run_id, kind)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Refuse, before the first step, state that a training checkpoint could not store without pickle.

        Raises:
            StateEncodingError: naming the key and the fix.
        """
        if self.binding is None:
            return
        parts: dict[str, Any] = {
            "hyper_parameters": dict(getattr(pl_module, "hparams", {}) or {}),
            "optimizer_states": [opt.state_dict().get("param_groups", []) for opt in trainer.optimizers],
            "lr_schedulers": [config.scheduler.state_dict() for config in trainer.lr_scheduler_configs],
            "callbacks": {type(cb).__name__: cb.state_dict() for cb in trainer.callbacks},  # type: ignore[attr-defined]
            "loops": {"fit_loop": trainer.fit_loop.state_dict()},
        }
        if trainer.datamodule is not None:  # type: ignore[attr-defined]
            parts["datamodule"] = trainer.datamodule.state_dict()  # type: ignore[attr-defined]
        try:
            encode_state(parts)
        except StateEncodingError as err:
            raise StateEncodingError(
                f"{err}. LoRACheckpointIO checks this before the first training step, so no training is lost"
            ) from None

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        io = lora_checkpoint_io(trainer)
        if self.binding is not None and io is not None:
            io.fitting = True  # saves may run in the background from now on

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        io = lora_checkpoint_io(trainer)
        if io is not None:
            io.fitting = False  # saves after fit commit before they return

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        io = lora_checkpoint_io(trainer)
        if io is not None:
            io.fitting = False

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """After the run the plugin's ``load_checkpoint`` returns adapters under PEFT's key names again (saves
        still pick the bound adapter: ``trainer.save_checkpoint`` after fit works)."""
        io = lora_checkpoint_io(trainer)
        if self.binding is not None and io is not None and io.adapter_binding is self.binding:
            io.bound_module = None

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.binding is not None:
            self.binding.restore_rng(checkpoint)
            forget_finished_epoch_loader_state(checkpoint)  # before Lightning restores the loops


def use_bound_tensors(trainer: Trainer, pl_module: LightningModule, binding: AdapterBinding) -> None:
    """Make the trainer's strategy hand checkpoints only the bound tensors, looked up by name, instead of
    ``pl_module.state_dict()``, and restore them the same way instead of ``pl_module.load_state_dict()``: each
    is a walk over every module of the frozen base (about 30 ms of a 0.6B model's save, all of it on the training
    loop, and 20 ms of its resume) for tensors the plugin drops or does not have.

    Only strategies with Lightning's default (single device, DDP) are changed; sharded ones gather and scatter in
    their own way (``strategies.py``). A restore of other keys than the bound ones takes Lightning's way.
    """
    strategy = trainer.strategy
    # The owning submodules are looked up once; the tensors at each save (a strategy may move or replace them).
    owners = {
        name: (pl_module.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2])
        for name in binding.keys.values()
    }

    def ours() -> bool:  # the plugin may be swapped for another later (e.g. plain Lightning saves after fit)
        io = lora_checkpoint_io(trainer)
        return io is not None and io.adapter_binding is binding

    if type(strategy).lightning_module_state_dict is Strategy.lightning_module_state_dict:

        def bound_tensors() -> dict[str, Any]:
            if not ours():
                return Strategy.lightning_module_state_dict(strategy)
            return {name: getattr(owner, leaf).detach() for name, (owner, leaf) in owners.items()}

        strategy.lightning_module_state_dict = bound_tensors  # type: ignore[method-assign]
    if type(strategy).load_model_state_dict is Strategy.load_model_state_dict:
        lightning_load = strategy.load_model_state_dict

        def load_bound_tensors(checkpoint: Mapping[str, Any], strict: bool = True) -> None:
            state = checkpoint["state_dict"]
            if not ours() or not owners.keys() >= state.keys():
                lightning_load(checkpoint, strict=strict)
                return
            with torch.no_grad():
                for name, tensor in state.items():
                    owner, leaf = owners[name]
                    getattr(owner, leaf).copy_(tensor)

        strategy.load_model_state_dict = load_bound_tensors  # type: ignore[method-assign]


def logged_metrics(trainer: Trainer) -> dict[str, float]:
    """The Trainer's scalar ``callback_metrics`` now, as a manifest records them (:func:`scalar_metrics`)."""
    return scalar_metrics(trainer.callback_metrics)


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The scalar metrics a manifest records: finite numbers and one-element tensors, as floats, by name.

    Other values (tensors of several elements, strings, booleans, NaN or infinite numbers), names of more than
    200 characters and any beyond the first 1,000 are left out (the manifest's limits).

    Args:
        metrics: e.g. the Trainer's ``callback_metrics``.

    Returns:
        The metrics, in their order.
    """
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if len(out) >= 1000:
            break
        if isinstance(value, torch.Tensor):
            if value.numel() != 1 or value.is_complex():
                continue
            value = value.detach().item()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not isinstance(name, str):
            continue
        if len(name) <= 200 and math.isfinite(value):
            out[name] = float(value)
    return out


def callbacks() -> list[Callback]:
    """The ``lightning.pytorch.callbacks_factory`` entry point: one inactive-unless-needed callback."""
    return [LoRAAdapterCheckpointing()]
