"""Checkpoint bytes of one LoRA run written three ways, side by side in one process.

- Lightning default: a plain LightningModule around the same PEFT model, saved by ``TorchCheckpointIO``
  (pickled ``.ckpt`` with the whole ``state_dict``: frozen base included);
- LoRAModule + Lightning's ``TorchCheckpointIO`` (our module already drops the frozen base);
- LoRACheckpointIO sampler and training checkpoints.

    python benchmarks/checkpoint_size.py [--base-model tiny-qwen3] [--rank 16] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_lora_ckpt import LoRACheckpointIO, LoRAModule


class PlainPeftModule(L.LightningModule):
    """What a Lightning user writes without this package: the PEFT model as a submodule."""

    def __init__(self, lora: LoRAModule) -> None:
        super().__init__()
        self.model = lora.model
        self.lora = lora

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.lora.loss(batch)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)


def batches(vocab: int, n: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    items = []
    for _ in range(n):
        ids = torch.randint(0, min(vocab, 1024), (2, 33), generator=g)
        items.append({"input_ids": ids[:, :-1], "target_tokens": ids[:, 1:], "weights": torch.ones(2, 32)})
    return DataLoader(items, batch_size=None)


def dir_size(path: str) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def trainer(plugins: list[Any] | None, steps: int) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        plugins=plugins,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def measure(base_model: str, rank: int, steps: int) -> dict[str, Any]:
    out: dict[str, Any] = {"base_model": base_model, "rank": rank}
    with tempfile.TemporaryDirectory() as tmp:
        plain = PlainPeftModule(LoRAModule(base_model, rank=rank, alpha=2 * rank))
        t = trainer(None, steps)
        t.fit(plain, batches(plain.lora.model.config.vocab_size, steps))
        start = time.perf_counter()
        t.save_checkpoint(f"{tmp}/plain.ckpt")
        out["lightning_default_ckpt"] = {
            "bytes": os.path.getsize(f"{tmp}/plain.ckpt"),
            "seconds": time.perf_counter() - start,
        }

        module = LoRAModule(base_model, rank=rank, alpha=2 * rank)
        t = trainer(None, steps)
        t.fit(module, batches(module.model.config.vocab_size, steps))
        t.save_checkpoint(f"{tmp}/lora_module.ckpt")
        out["lora_module_torch_ckpt"] = {"bytes": os.path.getsize(f"{tmp}/lora_module.ckpt")}

        io = LoRACheckpointIO(root=f"{tmp}/ours", run_id="bench", async_save=False)
        module = LoRAModule(base_model, rank=rank, alpha=2 * rank)
        t = trainer([io], steps)
        t.fit(module, batches(module.model.config.vocab_size, steps))
        for kind, save in (("sampler", module.save_weights_for_sampler), ("training", module.save_state)):
            start = time.perf_counter()
            uri = save(kind)
            out[f"ours_{kind}"] = {"bytes": dir_size(uri), "seconds": time.perf_counter() - start}
    base = out["lightning_default_ckpt"]["bytes"]
    for key in ("lora_module_torch_ckpt", "ours_sampler", "ours_training"):
        out[key]["fraction_of_lightning_default"] = out[key]["bytes"] / base
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default="tiny-qwen3")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    result = measure(args.base_model, args.rank, args.steps)
    print(json.dumps(result, indent=2))
    print("\n| checkpoint | bytes | vs Lightning default |\n|---|---:|---:|")
    for key in ("lightning_default_ckpt", "lora_module_torch_ckpt", "ours_sampler", "ours_training"):
        print(
            f"| {key} | {result[key]['bytes']:,} | {result[key]['bytes'] / result['lightning_default_ckpt']['bytes']:.4f} |"
        )


if __name__ == "__main__":
    main()
