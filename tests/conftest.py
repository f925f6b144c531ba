"""Shared fixtures: tiny offline models, synthetic token batches, quiet trainers."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_lora_ckpt import LoRACheckpointIO, LoRAModule

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
    return DataLoader(token_batches(n), batch_size=None, shuffle=shuffle)


def make_trainer(io: LoRACheckpointIO | None = None, **kwargs: Any) -> L.Trainer:
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
    return L.Trainer(plugins=[io] if io else None, **{**defaults, **kwargs})


@pytest.fixture
def trainer_factory() -> Callable[..., L.Trainer]:
    return make_trainer


@pytest.fixture
def trained(tmp_path: Any) -> tuple[LoRAModule, LoRACheckpointIO, L.Trainer]:
    """A tiny module trained for 4 steps with a synchronous LoRACheckpointIO under tmp_path."""
    io = LoRACheckpointIO(root=str(tmp_path / "ckpts"), run_id="run", async_save=False)
    module = LoRAModule(**MODULE_KWARGS)
    trainer = make_trainer(io, max_steps=4)
    trainer.fit(module, batch_loader())
    return module, io, trainer
