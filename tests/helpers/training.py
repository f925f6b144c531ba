"""The tiny module's settings, synthetic token batches and quiet CPU trainers."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_lora_ckpt import LoRACheckpointIO

MODULE_KWARGS: dict[str, Any] = {"base_model": "tiny-qwen3", "rank": 4, "alpha": 8, "learning_rate": 1e-2}


def token_batches(n: int = 8, batch_size: int = 2, length: int = 16, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Random next-token batches in the LoRAModule batch format, with some zero weights."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, 1024, (batch_size, length + 1), generator=g)
        weights = (torch.rand(batch_size, length, generator=g) > 0.2).float()
        batches.append({"input_ids": ids[:, :-1], "target_tokens": ids[:, 1:], "weights": weights})
    return batches


def batch_loader(n: int = 8, shuffle: bool = False) -> DataLoader:
    """A DataLoader over ``n`` of those batches, already batched."""
    return DataLoader(token_batches(n), batch_size=None, shuffle=shuffle)


def make_trainer(io: LoRACheckpointIO | None = None, **kwargs: Any) -> L.Trainer:
    """A deterministic CPU Trainer without logger, progress bar or summary; ``kwargs`` override the defaults."""
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "deterministic": True,
    }
    # Lightning refuses a ModelCheckpoint when checkpointing is disabled; without one, no default ModelCheckpoint.
    defaults["enable_checkpointing"] = any(isinstance(c, ModelCheckpoint) for c in kwargs.get("callbacks", []))
    return L.Trainer(plugins=[io] if io else None, **{**defaults, **kwargs})
