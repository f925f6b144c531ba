"""The full-parameter tests' shared pieces: the tiny module's settings, the prompt its logits are compared on, and a
recorder of those logits after every step (what a checkpoint saved then must give)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from helpers.training import token_batches

FULL_KWARGS: dict[str, Any] = {"base_model": "tiny-qwen3", "rank": 0, "learning_rate": 1e-3, "max_shard_size": "300KB"}
IDS = token_batches(1, seed=1)[0]["input_ids"]
SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


class LogitsAfterEachStep(L.Callback):
    """The module's logits on :data:`IDS` at the start and after every step: what a checkpoint saved then must give."""

    def __init__(self) -> None:
        self.logits: dict[int, torch.Tensor] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.on_train_batch_end(trainer, pl_module, None, None, 0)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():
            self.logits[trainer.global_step] = pl_module(IDS).clone()


def logits_of(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits
