"""Adapter hotload (``SamplingClient.load_adapter``) versus building a new client, in one process.

    python benchmarks/hotload.py [--base-model qwen3-0.6b-shape] [--rank 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from lightning_lora_ckpt import LoRACheckpointIO, LoRAModule, SamplingClient


def save_sampler(module: LoRAModule, io: LoRACheckpointIO, name: str) -> str:
    """A sampler checkpoint of the module's current adapter, written the way Lightning would."""
    checkpoint = {"state_dict": module.state_dict(), "global_step": 0}
    module.on_save_checkpoint(checkpoint)
    io.save_checkpoint(checkpoint, name)
    return io.resolve(name, "sampler")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default="qwen3-0.6b-shape")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    module = LoRAModule(args.base_model, rank=args.rank, alpha=2 * args.rank)
    with tempfile.TemporaryDirectory() as root:
        io = LoRACheckpointIO(root=root, run_id="bench", async_save=False)
        uris = []
        for i in range(2):
            with torch.no_grad():
                for name, p in module.model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(std=0.01, generator=torch.Generator().manual_seed(i))
            uris.append(save_sampler(module, io, f"adapter{i}"))
        fresh, swap = [], []
        for i in range(args.repeats):
            start = time.perf_counter()
            client = SamplingClient.from_checkpoint(uris[0])
            fresh.append(time.perf_counter() - start)
            start = time.perf_counter()
            client.load_adapter(uris[(i % 2) ^ 1])
            swap.append(time.perf_counter() - start)
    result = {
        "base_model": args.base_model,
        "rank": args.rank,
        "new_client_seconds": statistics.median(fresh),
        "hotload_seconds": statistics.median(swap),
    }
    result["hotload_fraction_of_new_client"] = result["hotload_seconds"] / result["new_client_seconds"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
