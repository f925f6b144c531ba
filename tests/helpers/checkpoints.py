"""Checkpoint dicts of the shape LoRAModule produces, built without a model; a small populated store."""

from __future__ import annotations

import time
from typing import Any

import torch

from lightning_lora_ckpt import LoRACheckpointIO


def fake_checkpoint(step: int, training: bool = True, base: str = "tiny-qwen3") -> dict[str, Any]:
    """A small checkpoint dict of the shape LoRAModule produces, without building a model."""
    weight = torch.full((4, 8), float(step))
    checkpoint: dict[str, Any] = {
        "state_dict": {
            "base_model.model.layer.lora_A.weight": weight,
            "base_model.model.layer.lora_B.weight": weight.T,
        },
        "lora_ckpt": {
            "adapter_config": {"r": 4, "lora_alpha": 8, "target_modules": ["layer"], "peft_type": "LORA"},
            "base_model": {"name_or_path": base, "fingerprint": "f" * 64},
        },
        "global_step": step,
        "epoch": 0,
    }
    if training:
        checkpoint["optimizer_states"] = [
            {"state": {0: {"exp_avg": weight * 2}}, "param_groups": [{"lr": 1e-3, "params": [0]}]}
        ]
    return checkpoint


def populate(root: str, options: dict[str, Any]) -> LoRACheckpointIO:
    """Run r1: t1, s1 (TTL 1h), t2 (TTL 60s, user metadata); then run r2: s5. Returns r1's plugin."""
    io = LoRACheckpointIO(root=root, run_id="r1", async_save=False, storage_options=options)
    io.save_checkpoint(fake_checkpoint(1), "t1")
    io.save_checkpoint(fake_checkpoint(1, training=False), "s1", {"ttl_seconds": 3600})
    io.save_checkpoint(fake_checkpoint(2), "t2", {"ttl_seconds": 60, "user_metadata": {"note": "x"}})
    other = LoRACheckpointIO(root=root, run_id="r2", async_save=False, storage_options=options)
    time.sleep(0.01)
    other.save_checkpoint(fake_checkpoint(5, training=False), "s5")
    return io
