"""Training-loop blocking time per save, asynchronous versus synchronous, in one process.

With ``async_save=True`` the training thread only snapshots the adapter and optimizer tensors to CPU
memory; serialisation, sha256 and the write happen in a background thread.

    python benchmarks/async_save.py [--base-model qwen3-0.6b-shape] [--rank 16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_lora_ckpt import LoRACheckpointIO, LoRAModule


def one_batch(vocab: int) -> DataLoader:
    ids = torch.randint(0, min(vocab, 1024), (1, 17), generator=torch.Generator().manual_seed(0))
    return DataLoader(
        [{"input_ids": ids[:, :-1], "target_tokens": ids[:, 1:], "weights": torch.ones(1, 16)}], batch_size=None
    )


def measure(module: LoRAModule, root: str, async_save: bool, repeats: int) -> dict[str, Any]:
    io = LoRACheckpointIO(root=root, run_id="async" if async_save else "sync", async_save=async_save)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        plugins=[io],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, one_batch(module.model.config.vocab_size))  # optimizer moments exist from here on
    blocking, total = [], []
    for i in range(repeats):
        start = time.perf_counter()
        trainer.save_checkpoint(f"save{i}")
        blocking.append(time.perf_counter() - start)
        io.wait()
        total.append(time.perf_counter() - start)
    return {"blocking_seconds": statistics.median(blocking), "until_committed_seconds": statistics.median(total)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default="qwen3-0.6b-shape")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    module = LoRAModule(args.base_model, rank=args.rank, alpha=2 * args.rank)
    with tempfile.TemporaryDirectory() as root:
        result = {
            "base_model": args.base_model,
            "rank": args.rank,
            "sync": measure(module, root, False, args.repeats),
            "async": measure(module, root, True, args.repeats),
        }
    result["async_blocking_fraction_of_sync"] = result["async"]["blocking_seconds"] / result["sync"]["blocking_seconds"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
