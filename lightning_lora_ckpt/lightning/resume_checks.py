"""Checks of a training state against the live optimizers and schedulers, before anything of it is restored."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.core.optimizer import LightningOptimizer, _MockOptimizer
from lightning.pytorch.trainer.states import TrainerFn
from torch.distributed.fsdp import FullyShardedDataParallel

from ..format.strict_json import CheckpointFormatError
from .checkpoint_dict import LORA_KEY

#: torch.optim's optimizers whose per-parameter state entries named in :data:`_MOMENTS` have the parameter's shape.
_TORCH_OPTIMIZERS = (
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adamax,
    torch.optim.SGD,
    torch.optim.RMSprop,
)
_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


def check_resume_state(checkpoint: dict[str, Any], trainer: Any, module: torch.nn.Module) -> None:
    """While a Trainer fits, refuse a training state its live optimizers cannot take, before anything is restored.

    The plugin loads the checkpoint after the strategy's setup (``resume.install_restore_after_setup``), when
    the optimizers exist and nothing has been restored yet. Does nothing outside fit, before the optimizers
    exist (a strategy restoring before its setup) or where the strategy restores them itself (DeepSpeed).

    Args:
        checkpoint: the Lightning checkpoint dict the plugin rebuilt.
        trainer: the Trainer about to restore it.
        module: the bound LightningModule (its parameter names go into the messages).

    Raises:
        ValueError: as :func:`check_optimizer_states`, or the checkpoint has no optimizer state (sampler).
        CheckpointFormatError: as :func:`check_optimizer_states`.
    """
    strategy = trainer.strategy
    if trainer.state.fn != TrainerFn.FITTING or not strategy.optimizers or not strategy.lightning_restore_optimizer:
        return
    if any(isinstance(optimizer, _MockOptimizer) for optimizer in strategy.optimizers):
        return  # configure_optimizers returned None: Lightning's stand-in saves and loads nothing
    source = checkpoint.get(LORA_KEY, {}).get("source", "the checkpoint")
    if "optimizer_states" not in checkpoint:
        raise ValueError(
            f"Checkpoint {source} holds no optimizer state (a sampler checkpoint) and cannot resume training; resume "
            "from a training checkpoint, or start from its weights only (LoRAModule.from_checkpoint(uri))"
        )
    flat = isinstance(strategy.model, FullyShardedDataParallel)  # FSDP1 flattens parameters into shards
    schedulers = len(trainer.lr_scheduler_configs)
    check_optimizer_states(checkpoint, strategy.optimizers, schedulers, module, source, shapes=not flat)


def check_optimizer_states(
    checkpoint: dict[str, Any],
    optimizers: Sequence[torch.optim.Optimizer],
    schedulers: int,
    module: torch.nn.Module,
    source: str,
    shapes: bool = True,
) -> None:
    """Refuse optimizer and scheduler states that do not fit the live optimizers (nothing is changed).

    Saved groups and their parameter ids are paired in order with the live groups' parameters, as torch's
    ``Optimizer.load_state_dict`` does. Beyond its checks of the group counts and sizes: every id in
    ``state`` belongs to a group; for torch.optim's own optimizers (Adam, AdamW, SGD, ...) each ``exp_avg``,
    ``exp_avg_sq``, ``max_exp_avg_sq`` and ``momentum_buffer`` is a floating tensor (torch casts it to the
    parameter's dtype) of its parameter's shape, and ``step`` one finite number >= 0. Other optimizers'
    entries (bitsandbytes' quantized ``state1``, ``absmax1``, ...) are left to them.

    Args:
        checkpoint: the checkpoint dict (``optimizer_states``, ``lr_schedulers``).
        optimizers: the live optimizers, in the order they are configured.
        schedulers: how many LR schedulers are configured.
        module: the module holding the parameters (their names go into the messages).
        source: the checkpoint's URI, for the messages.
        shapes: compare moment shapes with the parameters' (not for FSDP1's flattened shards; a DTensor's
            shape is its full shape, as in the saved full state).

    Raises:
        CheckpointFormatError: a state is malformed (not a state dict, an id no group lists or listed twice, a
            moment that is not a floating tensor, a ``step`` that is not a count), naming the key.
        ValueError: the states do not fit the live optimizers or schedulers (their number, groups, group sizes,
            moment shapes), naming the key and the fix.
    """

    def refuse(what: str, malformed: bool = False) -> ValueError:
        if malformed:
            return CheckpointFormatError(f"Checkpoint {source}: {what}; the state is damaged, resume from another one")
        return ValueError(
            f"Checkpoint {source}: {what}; configure the optimizers, their parameter groups (in the same order) and "
            "LR schedulers as in the run that wrote it, or resume from another checkpoint"
        )

    saved, saved_schedulers = checkpoint.get("optimizer_states"), checkpoint.get("lr_schedulers")
    if not isinstance(saved, list) or not isinstance(saved_schedulers, list):
        raise refuse("optimizer_states and lr_schedulers must be lists", malformed=True)
    if len(saved) != len(optimizers):
        raise refuse(f"optimizer_states holds {len(saved)} optimizer states, the module configures {len(optimizers)}")
    names = {id(p): name for name, p in module.named_parameters()}
    for i, (state, optimizer) in enumerate(zip(saved, optimizers, strict=True)):
        optimizer = optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        key, live = f"optimizer_states[{i}]", optimizer.param_groups
        groups = state.get("param_groups") if isinstance(state, dict) else None
        if not isinstance(groups, list) or not isinstance(state.get("state"), dict):
            raise refuse(f"{key} is not an optimizer state_dict (with 'state' and 'param_groups')", malformed=True)
        if len(groups) != len(live):
            raise refuse(
                f"{key}.param_groups has {len(groups)} groups, the live {type(optimizer).__name__} has {len(live)}"
            )
        params: dict[int, tuple[str, torch.Tensor]] = {}  # saved id -> the live parameter and its name
        for g, (group, live_group) in enumerate(zip(groups, live, strict=True)):
            ids = group.get("params") if isinstance(group, dict) else None
            if (
                not isinstance(ids, list)
                or any(type(x) is not int or x in params for x in ids)
                or len(set(ids)) < len(ids)
            ):
                raise refuse(f"{key}.param_groups[{g}].params is not a list of new parameter ids", malformed=True)
            if len(ids) != len(live_group["params"]):
                raise refuse(
                    f"{key}.param_groups[{g}] lists {len(ids)} parameters, the live group has {len(live_group['params'])}"
                )
            params.update(
                (pid, (names.get(id(p), f"#{n} of group {g}"), p))
                for n, (pid, p) in enumerate(zip(ids, live_group["params"], strict=True))
            )
        for pid, entry in state["state"].items():
            where = f"{key}.state[{pid}]"
            if pid not in params or not isinstance(entry, dict):
                raise refuse(f"{where} is not the state of a parameter {key}.param_groups lists", malformed=True)
            if isinstance(optimizer, _TORCH_OPTIMIZERS):
                problem = _moment_problem(entry, *params[pid], shapes)
                if problem:
                    raise refuse(f"{where}.{problem[0]}", malformed=problem[1])
    if len(saved_schedulers) != schedulers:
        raise refuse(
            f"lr_schedulers holds {len(saved_schedulers)} scheduler states, the module configures {schedulers}"
        )


def _moment_problem(entry: dict[str, Any], name: str, param: torch.Tensor, shapes: bool) -> tuple[str, bool] | None:
    """What is wrong with a torch.optim state entry of ``param`` (the key and what, whether malformed), or None."""
    for moment in _MOMENTS:
        value = entry.get(moment)
        if value is None:  # absent, or SGD's buffer before its first step
            continue
        if not isinstance(value, torch.Tensor) or not (value.is_floating_point() or value.is_complex()):
            return f"{moment} is {_describe(value)}, not a floating tensor", True
        if shapes and value.shape != param.shape:
            return f"{moment} has shape {tuple(value.shape)}, the live parameter {name} has {tuple(param.shape)}", False
    step = entry.get("step", 0)
    if isinstance(step, torch.Tensor) and step.numel() == 1 and (step.is_floating_point() or step.dtype.is_signed):
        step = step.item()
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step) or step < 0:
        return f"step is {_describe(step)}, not a count of steps", True
    return None


def _describe(value: Any) -> str:
    """A short description of a value of the state, for messages."""
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    return repr(value) if isinstance(value, (int, float)) else f"a {type(value).__name__}"
