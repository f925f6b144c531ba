"""One training job of the multi-process tests: `python tests/support/distributed_job.py STRATEGY DEVICES ROOT RUN STEPS [CKPT]`.

STRATEGY is single, ddp or fsdp2 (LoRAModelParallelStrategy, FSDP2 on CPU with gloo); `lightning-ddp` and
`lightning-fsdp2` save Lightning's default way instead (TorchCheckpointIO; ModelParallelStrategy's
distributed checkpoint) to ROOT/RUN/default, for benchmarks/distributed_bytes.py. Each step sees the
same 4 examples whatever the world size (4 per process alone, 2 per process with two), so every
strategy computes the same updates. Saves training checkpoint `step<N>` at the end. With USER_MODULE=1 the
module is a user's own LightningModule (tests/helpers/user_module.py), saved with `trainer.save_checkpoint`; with
LORA_RANK=0 a full-parameter LoRAModule (every weight trained; its checkpoints are whole model directories), which
also saves a sampler snapshot `snap<step>` after every step (a base, then deltas: a snapshot chain).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader, DistributedSampler

from lightning_lora_ckpt import LoRACheckpointIO, LoRAFSDPStrategy, LoRAModelParallelStrategy, LoRAModule


def examples(n: int = 32) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1024, (n, 17), generator=g)
    return [{"input_ids": i[:-1], "target_tokens": i[1:], "weights": torch.ones(16)} for i in ids]


class Examples(L.LightningDataModule):
    """Rank r of w takes examples r, r+w, ... in order (Lightning's own sampler would shuffle)."""

    def train_dataloader(self) -> DataLoader:
        data = examples()
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(data, batch_size=4 // world, sampler=sampler)


class SnapshotEachStep(L.Callback):
    """A sampler checkpoint after every step, on every rank (FSDP2 gathers the shards collectively)."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        pl_module.save_weights_for_sampler(f"snap{trainer.global_step}")  # type: ignore[operator]


def main() -> None:
    strategy_name, devices, root, run_id, steps = (
        sys.argv[1],
        int(sys.argv[2]),
        sys.argv[3],
        sys.argv[4],
        int(sys.argv[5]),
    )
    ckpt_path = sys.argv[6] if len(sys.argv) > 6 else None
    strategy: object = {
        "single": "auto",
        "ddp": "ddp",
        "fsdp2": LoRAModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1),
        "fsdp1": LoRAFSDPStrategy(),
        "lightning-ddp": "ddp",
        "lightning-fsdp2": ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1),
    }[strategy_name]
    default = strategy_name.startswith("lightning-")
    L.seed_everything(0)
    user_module = os.environ.get("USER_MODULE") == "1"
    if user_module:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers
        from helpers.user_module import UserLoRAModule

        module: L.LightningModule = UserLoRAModule(dropout=0.0)
    else:
        rank = int(os.environ.get("LORA_RANK", "4"))
        module = LoRAModule(
            os.environ.get("BASE_MODEL", "tiny-qwen3"), rank=rank, alpha=8, learning_rate=1e-2 if rank else 1e-3
        )
    io = None if default else LoRACheckpointIO(root=root, run_id=run_id, async_save=False)
    trainer = L.Trainer(
        accelerator=os.environ.get("ACCELERATOR", "cpu"),
        devices=devices,
        strategy=strategy,
        max_steps=steps,
        plugins=[io] if io else None,
        callbacks=[SnapshotEachStep()] if io and not user_module and os.environ.get("LORA_RANK") == "0" else None,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=Examples(), ckpt_path=ckpt_path)
    if default:
        trainer.save_checkpoint(os.path.join(root, run_id, "default"))
    elif user_module:
        trainer.save_checkpoint(f"step{steps}")
    else:
        module.save_state(f"step{steps}")
    if torch.distributed.is_initialized():
        # Leave the gloo group cleanly: its threads still running at interpreter exit abort the process
        # ("terminate called without an active exception", seen under load).
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
