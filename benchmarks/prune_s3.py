"""``CheckpointStore.prune`` on S3: time and HTTP requests for one run holding many checkpoints.

Saves ``--checkpoints`` tiny checkpoints (training and sampler, alternating, one per step) into one run on a
moto S3 server on loopback (no network, no AWS account), then measures ``prune(run, KeepLatest(10))`` as a dry
run and for real (a soft delete: one manifest compare-and-swap per deleted checkpoint), a ``restore``, and the
``gc`` that purges the soft-deleted ones after the grace period. Prints one JSON object:

    python benchmarks/prune_s3.py [--checkpoints 1000] [--keep 10]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import timedelta
from typing import Any

import torch
from _common import BUCKET, RequestCounter, moto_s3, quiet

from lightning_lora_ckpt import CheckpointStore, LoRACheckpointIO
from lightning_lora_ckpt.format.strict_json import utcnow
from lightning_lora_ckpt.policy.retention import KeepLatest


def fake_checkpoint(step: int, training: bool) -> dict[str, Any]:
    """A tiny checkpoint dict of the shape LoRAModule produces (a few hundred bytes of tensors)."""
    weight = torch.randn(16)
    checkpoint: dict[str, Any] = {
        "state_dict": {"base_model.model.x.lora_A.weight": weight},
        "lora_ckpt": {"adapter_config": {"r": 4}, "base_model": {"name_or_path": "bench", "fingerprint": "0" * 64}},
        "global_step": step,
    }
    if training:
        checkpoint["optimizer_states"] = [{"state": {0: {"exp_avg": weight.clone()}}, "param_groups": []}]
    return checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=int, default=1000)
    parser.add_argument("--keep", type=int, default=10, help="KeepLatest(N)")
    args = parser.parse_args()
    quiet()
    with moto_s3() as options:
        results = measure(args, options)
    json.dump(results, sys.stdout, indent=2)
    print()


def measure(args: argparse.Namespace, options: dict[str, Any]) -> dict[str, Any]:
    root = f"s3://{BUCKET}/prune"
    results: dict[str, Any] = {"checkpoints": args.checkpoints, "retention": f"KeepLatest({args.keep})"}
    io = LoRACheckpointIO(root=root, run_id="run", async_save=False, storage_options=options)
    start = time.perf_counter()
    for step in range(1, args.checkpoints + 1):
        io.save_checkpoint(fake_checkpoint(step, training=step % 2 == 0), f"{step:06d}")
    results["save_seconds"] = round(time.perf_counter() - start, 2)

    store = CheckpointStore(root, options)
    counter = RequestCounter(store.fs)
    rule = KeepLatest(args.keep)
    figures: dict[str, Any] = {}

    seconds, listed, requests = counter.measure(lambda: store.list_checkpoints("run"))
    assert len(listed) == args.checkpoints
    figures["list_checkpoints"] = {"seconds": round(seconds, 3), **requests}

    seconds, plan, requests = counter.measure(lambda: store.prune("run", rule, dry_run=True))
    assert len(plan.delete) == args.checkpoints - args.keep, len(plan.delete)
    figures["prune_dry_run"] = {"seconds": round(seconds, 3), "deleted": len(plan.delete), **requests}

    seconds, plan, requests = counter.measure(lambda: store.prune("run", rule))
    assert len(plan.delete) == args.checkpoints - args.keep and len(store.list_checkpoints("run")) == args.keep
    figures["prune"] = {
        "seconds": round(seconds, 3),
        "deleted": len(plan.delete),
        "ms_per_deleted_checkpoint": round(1000 * seconds / max(1, len(plan.delete)), 2),
        **requests,
    }

    victim = plan.delete[0].path
    seconds, _, requests = counter.measure(lambda: store.restore(victim))
    figures["restore_one"] = {"seconds": round(seconds, 3), **requests}

    later = utcnow() + timedelta(days=2)
    seconds, purged, requests = counter.measure(lambda: store.gc(now=later))
    assert len(purged) == args.checkpoints - args.keep - 1 and store.deleted() == []
    figures["gc_purge"] = {"seconds": round(seconds, 3), "purged": len(purged), **requests}
    results["figures"] = figures
    return results


if __name__ == "__main__":
    main()
