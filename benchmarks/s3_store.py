"""CheckpointStore on S3: listing cost with many checkpoints, and download throughput versus ``fs.get``.

The save figures (upload versus a plain ``put``) are in ``suite.py``. Runs a moto S3 server on loopback
(no network, no AWS account):

    python benchmarks/s3_store.py [--checkpoints 200] [--download-mib 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import s3fs
import torch
from _common import BUCKET, RequestCounter, moto_s3, quiet, timed

from lightning_lora_ckpt import CheckpointStore, LoRACheckpointIO


def fake_checkpoint(step: int, training: bool, numel: int = 64) -> dict[str, Any]:
    weight = torch.randn(numel)
    checkpoint: dict[str, Any] = {
        "state_dict": {"base_model.model.x.lora_A.weight": weight},
        "lora_ckpt": {"adapter_config": {"r": 16}, "base_model": {"name_or_path": "bench", "fingerprint": "0" * 64}},
        "global_step": step,
    }
    if training:
        checkpoint["optimizer_states"] = [{"state": {0: {"exp_avg": weight.clone()}}, "param_groups": []}]
    return checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=int, default=200)
    parser.add_argument("--download-mib", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    quiet()
    with moto_s3() as options:
        results = measure(args, options)
    json.dump(results, sys.stdout, indent=2)
    print()


def measure(args: argparse.Namespace, options: dict[str, Any]) -> dict[str, Any]:
    root = f"s3://{BUCKET}/root"
    results: dict[str, Any] = {"checkpoints": args.checkpoints}

    io = LoRACheckpointIO(root=root, run_id="run", async_save=False, storage_options=options)
    start = time.perf_counter()
    for i in range(args.checkpoints):
        io.save_checkpoint(fake_checkpoint(i, training=i % 2 == 0), f"{i:06d}")
    results["save_seconds_each"] = (time.perf_counter() - start) / args.checkpoints

    store = CheckpointStore(root, options)
    counter = RequestCounter(store.fs)
    before = counter.total
    results["list_checkpoints_seconds"], listed = timed(lambda: store.list_checkpoints("run"), args.repeats)
    results["list_checkpoints_requests"] = (counter.total - before) // args.repeats
    assert len(listed) == args.checkpoints
    before = counter.total
    results["get_seconds"], _ = timed(lambda: store.get("lora://run/weights/000000"), args.repeats)
    results["get_requests"] = (counter.total - before) // args.repeats
    results["last_checkpoint_seconds"], _ = timed(lambda: store.last_checkpoint("run"), args.repeats)

    numel = args.download_mib * (1 << 20) // 4 // 2  # adapter + optimizer moment, float32
    io.save_checkpoint(fake_checkpoint(10**6, training=True, numel=numel), "big")
    big = store.resolve("lora://run/weights/big")
    size = store.get(big).size_bytes
    fs = s3fs.S3FileSystem(**options)
    with tempfile.TemporaryDirectory() as tmp:

        def ours() -> None:
            shutil.rmtree(f"{tmp}/ours", ignore_errors=True)
            store.download(big, f"{tmp}/ours")

        def plain() -> None:
            shutil.rmtree(f"{tmp}/plain", ignore_errors=True)
            fs.get(big.removeprefix("s3://") + "/", f"{tmp}/plain/", recursive=True)

        results["download_seconds"], _ = timed(ours, args.repeats)
        results["fs_get_seconds"], _ = timed(plain, args.repeats)
        assert sorted(p.name for p in Path(f"{tmp}/plain").iterdir()) == sorted(
            p.name for p in Path(f"{tmp}/ours").iterdir()
        )
    results["download_bytes"] = size
    results["download_mib_per_s"] = size / results["download_seconds"] / (1 << 20)
    results["fs_get_mib_per_s"] = size / results["fs_get_seconds"] / (1 << 20)
    results["download_vs_fs_get_time_ratio"] = results["download_seconds"] / results["fs_get_seconds"]
    return results


if __name__ == "__main__":
    main()
