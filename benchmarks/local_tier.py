"""The fast local tier versus a direct S3 save: how long a training save blocks, side by side in one run.

A synthetic training state of the Qwen3-0.6B shape (LoRA r=16 on the 7 linear projections of 28 layers,
float32, plus AdamW's two moments: about 120 MB) is saved through ``LoRACheckpointIO`` straight to a moto
S3 server on loopback, and through ``LoRACheckpointIO(local_tier=...)``, whose save returns after the local
commit while the mirror uploads in the background (its time to durable is reported too):

    python benchmarks/local_tier.py [--repeats 3] [--layers 28]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid

from _common import BUCKET, Projection, moto_s3, quiet, training_state

from lightning_lora_ckpt import CheckpointStore, LoRACheckpointIO

#: (name, in features, out features) of the Qwen3-0.6B projections.
PROJECTIONS: list[Projection] = [
    ("q_proj", 1024, 2048),
    ("k_proj", 1024, 1024),
    ("v_proj", 1024, 1024),
    ("o_proj", 2048, 1024),
    ("gate_proj", 1024, 3072),
    ("up_proj", 1024, 3072),
    ("down_proj", 3072, 1024),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=28)
    args = parser.parse_args()
    quiet()
    state = training_state(PROJECTIONS, args.layers, 16, 1, "qwen3-0.6b")
    with moto_s3() as options, tempfile.TemporaryDirectory() as tier:
        root = f"s3://{BUCKET}/{uuid.uuid4().hex}"
        direct = LoRACheckpointIO(root=root, run_id="direct", async_save=False, storage_options=options)
        tiered = LoRACheckpointIO(
            root=root, run_id="tiered", async_save=False, storage_options=options, local_tier=tier
        )
        times: dict[str, list[float]] = {"direct_s3_save": [], "local_tier_save": [], "local_tier_to_durable": []}
        for k in range(args.repeats):  # side by side, alternating
            start = time.perf_counter()
            direct.save_checkpoint(state, f"s{k}")
            times["direct_s3_save"].append(time.perf_counter() - start)
            start = time.perf_counter()
            tiered.save_checkpoint(state, f"s{k}")
            times["local_tier_save"].append(time.perf_counter() - start)
            tiered.wait()
            times["local_tier_to_durable"].append(time.perf_counter() - start)
        size = CheckpointStore(root, options).last_checkpoint("tiered").size_bytes
        ok = all(c.size_bytes == size for c in CheckpointStore(root, options).list_checkpoints("tiered"))
    medians = {name: round(statistics.median(values), 3) for name, values in times.items()}
    result = {
        "state_bytes": size,
        "repeats": args.repeats,
        "median_seconds": medians,
        "all_seconds": {name: [round(v, 3) for v in values] for name, values in times.items()},
        "save_blocking_ratio_local_tier_vs_direct": round(medians["local_tier_save"] / medians["direct_s3_save"], 3),
        "mirrored_checkpoints_complete": ok,
    }
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
