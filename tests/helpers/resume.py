"""The shuffled 16-step training run the resume tests repeat, straight and stopped + resumed in a new process."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from helpers.training import MODULE_KWARGS, make_trainer, token_batches
from lightning_lora_ckpt import LoRACheckpointIO, LoRAModule

RESUME_KWARGS = {**MODULE_KWARGS, "dropout": 0.1, "warmup_steps": 3, "lr_schedule": "linear"}
#: The same run training every parameter (``rank=0``), its weights sharded into two files.
FULL_RESUME_KWARGS = {
    "base_model": "tiny-qwen3",
    "rank": 0,
    "learning_rate": 1e-3,
    "warmup_steps": 3,
    "lr_schedule": "linear",
    "max_shard_size": "300KB",
}


class LossRecorder(L.Callback):
    """Records the training loss of every step."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(outputs["loss"].item())


def shuffled_loader(stateful: bool = False) -> DataLoader:
    """8 batches an epoch in an order that depends only on (seed, epoch), as JSONLDataModule does."""
    batches = token_batches(8)
    sampler_class = StatefulDistributedSampler if stateful else DistributedSampler
    sampler = sampler_class(batches, 1, 0, shuffle=True, seed=0)
    # batch_size=1 wraps the sampler in a (lazy) BatchSampler, as in JSONLDataModule: Lightning creates the
    # iterator on resume before it calls set_epoch, so an eagerly iterated sampler would replay epoch 0's order.
    loader_class = StatefulDataLoader if stateful else DataLoader
    # A generator of its own keeps iterator creation from drawing on the global RNG that dropout uses.
    generator = torch.Generator().manual_seed(0)
    return loader_class(batches, batch_size=1, sampler=sampler, collate_fn=lambda items: items[0], generator=generator)


class StopAt(L.Callback):
    """Stops fit after ``step`` steps, as a preempted job would (the schedule still spans ``max_steps``)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        trainer.should_stop = trainer.should_stop or trainer.global_step == self.step


def train(
    io: LoRACheckpointIO,
    stop_at: int | None = None,
    ckpt_path: str | None = None,
    callbacks: list[Any] = (),
    stateful: bool = False,
    module_kwargs: dict[str, Any] | None = None,
) -> tuple[LoRAModule, list[float]]:
    """16 seeded steps (dropout, warmup, linear schedule) on the shuffled batches; returns the module and losses.

    ``module_kwargs`` replaces :data:`RESUME_KWARGS` (e.g. a full-parameter module's, :data:`FULL_RESUME_KWARGS`).
    """
    L.seed_everything(0)
    module, recorder = LoRAModule(**(module_kwargs or RESUME_KWARGS)), LossRecorder()
    callbacks = [recorder, *callbacks, *([StopAt(stop_at)] if stop_at else [])]
    make_trainer(io, max_steps=16, callbacks=callbacks).fit(module, shuffled_loader(stateful), ckpt_path=ckpt_path)
    return module, recorder.losses


def adapter(module: LoRAModule) -> dict[str, torch.Tensor]:
    """A copy of the module's adapter tensors."""
    return {k: v.clone() for k, v in module.adapter_state_dict().items()}
