"""Fabric: ``fabric.save(path, state)`` / ``fabric.load(path, state)`` through ``LoRACheckpointIO``.

Fabric hands the plugin ``{"model": model.state_dict(), "optimizer": optimizer.state_dict(), ...}`` with
no module in sight, so the module is bound once (``checkpoint_io.bind(model)``). A save then keeps only
the adapter of the bound module's entry (the frozen base is never written) and stores every other entry
as training state; a load gives that entry back as the module's full state dict with the adapter's
tensors in it, so Fabric's strict ``load_state_dict`` works.
"""

from __future__ import annotations

from typing import Any

import torch

from ..format.layout import CheckpointType
from .checkpoint_dict import LORA_KEY, AdapterBinding

#: Lightning's own entries of a checkpoint dict rebuilt by ``checkpoint_from_opened``, not Fabric's.
_LIGHTNING_ENTRIES = ("epoch", "global_step", "pytorch-lightning_version", "rng_states")


def is_fabric_state(checkpoint: dict[str, Any]) -> bool:
    """Whether a dict handed to ``save_checkpoint`` is a Fabric state (not a Lightning checkpoint dict)."""
    return LORA_KEY not in checkpoint and "state_dict" not in checkpoint


def from_fabric(checkpoint: dict[str, Any], binding: AdapterBinding, key: str) -> dict[str, Any]:
    """The Lightning-style checkpoint dict of a Fabric state: entry ``key`` (the bound module) becomes the adapter.

    A state holding an optimizer state dict makes a training checkpoint, one without a sampler checkpoint.

    Raises:
        ValueError: entry ``key`` is missing or is not the bound module's state dict.
    """
    names = set(binding.keys.values())
    if not isinstance(checkpoint.get(key), dict) or not names <= set(checkpoint[key]):
        raise ValueError(
            f"Entry {key!r} of the Fabric state (entries {sorted(checkpoint)[:10]}) is not the state of the module "
            f"bound with checkpoint_io.bind(model, key={key!r}): save it as fabric.save(path, {{{key!r}: model, ...}})"
        )
    rest = {k: v for k, v in checkpoint.items() if k != key}
    training = any(isinstance(v, dict) and {"state", "param_groups"} <= set(v) for v in rest.values())
    checkpoint_type: CheckpointType = "training" if training else "sampler"
    converted = {**rest, "state_dict": checkpoint[key]}
    binding.to_checkpoint(converted, checkpoint_type)
    return converted


def to_fabric(checkpoint: dict[str, Any], binding: AdapterBinding, module: torch.nn.Module, key: str) -> dict[str, Any]:
    """The Fabric state of a checkpoint (entry ``key``: the bound module's full state dict with the adapter's
    tensors in it); restores the RNG states it recorded.

    Raises:
        ValueError: the adapter belongs to another base, LoRA config or tensor set.
    """
    lora = checkpoint.pop(LORA_KEY)
    adapter = checkpoint.pop("state_dict")
    binding.check(adapter, lora)
    binding.restore_rng(checkpoint)
    state = {k: v for k, v in checkpoint.items() if k not in _LIGHTNING_ENTRIES}
    state[key] = {**module.state_dict(), **binding.module_state(adapter)}
    return state
