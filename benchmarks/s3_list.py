"""Listing one run of 10,000 checkpoints on S3 (moto on loopback): requests and seconds, with and without the
run's listing index (lightning_lora_ckpt/storage/index.py), side by side in one run.

The run is filled fast: one real sampler checkpoint is saved through ``LoRACheckpointIO``, then its objects are
copied under ``--checkpoints`` names, each with its own manifest (name, step, time), in concurrent PUTs. Then:

- ``list.scan_10k``: ``list_checkpoints`` of a run without an index (what every listing cost before the index:
  one flat listing, then every manifest);
- ``reindex_10k``: ``CheckpointStore.reindex`` writing the index from the manifests (once per run written by an
  older version);
- ``list.ours_10k``: ``list_checkpoints`` through the index; ``last_10k``: ``last_checkpoint`` (the resume point,
  confirmed by its manifest); ``page_10k``: ``list_user_checkpoints(limit=100)``;
- ``save_at_10k``: one more save into the 10,000-checkpoint run (its intent, commit and index update).

    python benchmarks/s3_list.py [--checkpoints 10000]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from datetime import timedelta
from typing import Any

import torch
from _common import BUCKET, RequestCounter, moto_s3, quiet

from lightning_lora_ckpt import CheckpointStore, LoRACheckpointIO
from lightning_lora_ckpt.format.manifest import MANIFEST
from lightning_lora_ckpt.storage.index import INDEX_FILE

RUN = "big"


def checkpoint(step: int) -> dict[str, Any]:
    """A small sampler checkpoint dict of the shape LoRAModule produces."""
    weight = torch.randn(64, 16, generator=torch.Generator().manual_seed(step))
    return {
        "state_dict": {"base_model.model.x.lora_A.weight": weight, "base_model.model.x.lora_B.weight": weight.T},
        "lora_ckpt": {"adapter_config": {"r": 16}, "base_model": {"name_or_path": "bench", "fingerprint": "0" * 64}},
        "global_step": step,
    }


def fill(store: CheckpointStore, options: dict[str, Any], n: int) -> None:
    """``n`` committed sampler checkpoints in run ``RUN``: one saved for real, copied with their own manifests."""
    io = LoRACheckpointIO(root=store.root, run_id=RUN, async_save=False, storage_options=options)
    io.save_checkpoint(checkpoint(0), "000000")
    fs, run_path = store.fs, f"{store._root_path}/{RUN}"
    folder = f"{run_path}/sampler_weights/000000"
    manifest = store.manifest(f"lora://{RUN}/sampler_weights/000000")
    files = {name: fs.cat_file(f"{folder}/{name}") for name in manifest.files}
    batch: dict[str, bytes] = {}
    for step in range(1, n):
        name = f"{step:06d}"
        copy = dataclasses.replace(
            manifest, name=name, step=step, created_at=manifest.created_at + timedelta(seconds=step)
        )
        batch.update({f"{run_path}/sampler_weights/{name}/{f}": data for f, data in files.items()})
        batch[f"{run_path}/sampler_weights/{name}/{MANIFEST}"] = copy.to_json()
        if len(batch) >= 2000:
            fs.pipe(batch)
            batch.clear()
    if batch:
        fs.pipe(batch)
    fs.invalidate_cache()


def run(checkpoints: int = 10_000) -> dict[str, Any]:
    """Fill the run, then measure each listing; returns ``{"rows": ...}`` (group ``s3_list`` of the suite).

    Args:
        checkpoints: how many checkpoints the run holds.

    Returns:
        The rows: seconds and requests (total and by S3 operation) of each call.
    """
    with moto_s3() as options:
        store = CheckpointStore(f"s3://{BUCKET}/list", options)
        fill(store, options, checkpoints)
        counter = RequestCounter(store.fs)
        rows: dict[str, dict[str, Any]] = {}

        def row(key: str, fn: Any, **extra: Any) -> Any:
            seconds, result, requests = counter.measure(fn)
            rows[key] = {"seconds": round(seconds, 3), **requests, **extra}
            return result

        store.fs.rm_file(f"{store._root_path}/{RUN}/{INDEX_FILE}")  # as a run written before the index
        listed = row("list.scan_10k", lambda: store.list_checkpoints(RUN))
        rows["list.scan_10k"]["listed"] = len(listed)
        report = row("reindex_10k", lambda: store.reindex(RUN)[0])
        rows["reindex_10k"]["previous"] = report.previous
        listed = row("list.ours_10k", lambda: store.list_checkpoints(RUN))
        rows["list.ours_10k"]["listed"] = len(listed)
        index_bytes = store.fs.info(f"{store._root_path}/{RUN}/{INDEX_FILE}")["size"]
        rows["list.ours_10k"]["index_bytes"] = index_bytes
        row("last_10k", lambda: store.last_checkpoint(RUN, "sampler"))
        row("page_10k", lambda: store.list_user_checkpoints(limit=100))
        io = LoRACheckpointIO(root=store.root, run_id=RUN, async_save=False, storage_options=options)
        row("save_at_10k", lambda: io.save_checkpoint(checkpoint(checkpoints), f"{checkpoints:06d}"))
        assert len(store.list_checkpoints(RUN)) == checkpoints + 1
    return {"checkpoints": checkpoints, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=int, default=10_000)
    args = parser.parse_args()
    quiet()
    json.dump(run(args.checkpoints), sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
