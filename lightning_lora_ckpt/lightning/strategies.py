"""Sharded strategies whose checkpoints go through ``LoRACheckpointIO`` and hold only the adapter.

Lightning's ``ModelParallelStrategy`` (FSDP2) and ``FSDPStrategy`` (FSDP1) bypass or constrain
``CheckpointIO``: the first writes torch distributed checkpoints of the whole model (frozen base
included) to local paths and rejects ``storage_options``; the second gathers the whole model and
refuses a directory path. These subclasses gather only the trainable (adapter) parameters and their
optimizer state to rank 0 and hand the dict to the checkpoint plugin like any other strategy, so the
checkpoint is an ordinary PEFT adapter checkpoint that resumes at any world size and under any strategy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, Strategy
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.optim import Optimizer

# Wrapper prefixes FSDP1 puts in parameter names; torch's state-dict API reports names without them.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


class _AdapterCheckpoints:
    """Checkpoint behaviour shared by the sharded strategies (mixed in before the Lightning strategy)."""

    model: Any
    optimizers: list[Optimizer]
    checkpoint_io: Any
    is_global_zero: bool

    @property
    def lightning_restore_optimizer(self) -> bool:
        """Lightning restores optimizers through ``load_optimizer_state_dict`` (the parents load them themselves)."""
        return True

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The trainable parameters only, gathered in full to rank 0 on CPU (a collective)."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        return get_model_state_dict(self.model, options=options)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        # Strategy's implementation: rank 0 hands the gathered dict to the CheckpointIO plugin.
        Strategy.save_checkpoint(self, checkpoint, filepath, storage_options=storage_options)  # type: ignore[arg-type]

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        return self.checkpoint_io.load_checkpoint(checkpoint_path)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        """Scatter the adapter (full tensors under the module's parameter names, as ``LoRACheckpointIO`` gives
        them) into the sharded parameters; the frozen base is not in the checkpoint."""
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(self.model, checkpoint["state_dict"], options=options)

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """The full optimizer state on rank 0, keyed by parameter index as a plain ``optimizer.state_dict()``.

        (Lightning's re-keying numbers all module parameters, frozen ones included, so its indices would
        not match a checkpoint written by any other strategy.)
        """
        optimizer = optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        by_name: dict[str, Any] = get_optimizer_state_dict(self.model, optimizer, options=options)
        if not self.is_global_zero:
            return {}
        index = {name: i for i, name in enumerate(self._param_names(optimizer))}
        return {
            "state": {index[name]: value for name, value in by_name["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]],
        }

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Scatter full optimizer states (keyed by parameter index, as every strategy saves them) to the shards."""
        options = StateDictOptions(full_state_dict=True)
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"], strict=True):
            names = self._param_names(optimizer)
            by_name: dict[str, Any] = {
                "state": {names[i]: value for i, value in state["state"].items()},
                "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
            }
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=by_name, options=options)

    def _param_names(self, optimizer: Optimizer) -> list[str]:
        """Fully qualified names of the optimizer's parameters, in the optimizer's order."""
        names = {}
        for name, p in self.model.named_parameters():
            for prefix in _WRAPPER_PREFIXES:
                name = name.replace(prefix, "")
            names[id(p)] = name
        return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


class LoRAModelParallelStrategy(_AdapterCheckpoints, ModelParallelStrategy):
    """``ModelParallelStrategy`` (FSDP2 data parallel) for ``LoRAModule`` with ``LoRACheckpointIO`` checkpoints.

    ``LoRAModule.configure_model`` applies ``fully_shard`` to every decoder layer. Arguments are those of
    ``ModelParallelStrategy``; checkpoints are always full adapter checkpoints. Runs on CPU with gloo.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["save_distributed_checkpoint"] = False
        super().__init__(*args, **kwargs)


class LoRAFSDPStrategy(_AdapterCheckpoints, FSDPStrategy):
    """Lightning's ``FSDPStrategy`` (FSDP1, CUDA only) for ``LoRAModule`` with ``LoRACheckpointIO`` checkpoints.

    Arguments are those of ``FSDPStrategy``; ``use_orig_params`` defaults to True (the frozen base and
    the trainable adapter share FSDP units), and ``state_dict_type`` is always ``"full"``. Pass
    ``auto_wrap_policy={YourDecoderLayer}`` to shard per layer.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("use_orig_params", True)
        kwargs["state_dict_type"] = "full"
        super().__init__(*args, **kwargs)
