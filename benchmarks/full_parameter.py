"""Full-parameter checkpoints (``LoRAModule(rank=0)``) and delta snapshots, on the qwen3-0.6b shape in bf16.

Trains the built-in ``qwen3-0.6b-shape`` model (random weights, Qwen3-0.6B's shapes, bf16) in full with AdamW at
lr 1e-5 through the plugin, saving a sampler checkpoint (a Hugging Face model directory) before training and
every ``--every`` steps, then measures, side by side in one run:

- the bytes and encode time of each snapshot's weights stored as a delta against the previous snapshot
  (``format/snapshot_delta.py``: XOR of the raw bits, zstandard) versus the full files (a base);
- the time to rebuild the newest weights from the first snapshot and the chain of deltas after it, versus
  reading the newest snapshot's files as a base (both in memory, digests checked);
- the save time of a full-parameter training checkpoint (sync, fsynced) versus the raw safetensors floor
  (one file of the weights and the optimizer moments, fsynced).

The deltas are computed from the snapshots' files here: the plugin does not write delta checkpoints yet (the
chain's manifest, reader and deletion guards are issue 17's next step). Prints one JSON object:

    python benchmarks/full_parameter.py [--steps 10] [--every 2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
from _common import elapsed, floor_tensors, make_trainer, quiet, save_floor, token_batches

from lightning_lora_ckpt import LoRACheckpointIO, LoRAModule
from lightning_lora_ckpt.format.digests import digest_hex
from lightning_lora_ckpt.format.snapshot_delta import apply_delta, encode_delta

RUN = "full"


def weight_files(root: Path, name: str) -> dict[str, bytes]:
    """The weight files (``model*.safetensors``) of sampler checkpoint ``name``, by file name."""
    folder = root / RUN / "sampler_weights" / name
    return {p.name: p.read_bytes() for p in sorted(folder.glob("model*.safetensors"))}


class Snapshots(L.Callback):
    """Saves a sampler checkpoint before the first step and every ``every`` steps, named by step."""

    def __init__(self, names: list[str], every: int) -> None:
        self.names, self.every = names, every

    def _save(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.names.append(f"{trainer.global_step:06d}")
        module.save_weights_for_sampler(self.names[-1])  # type: ignore[operator]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step % self.every == 0:
            self._save(trainer, pl_module)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train, snapshot, and measure; returns the rows."""
    with tempfile.TemporaryDirectory(prefix="lora-full-", dir=args.workdir) as tmp:
        root = Path(tmp)
        module = LoRAModule(args.base_model, rank=0, learning_rate=1e-5, dtype="bfloat16", max_shard_size="2GB")
        io = LoRACheckpointIO(root=str(root), run_id=RUN, async_save=False)
        names: list[str] = []
        snapshot = Snapshots(names, args.every)
        trainer = make_trainer([io], args.steps)
        trainer.callbacks.append(snapshot)  # type: ignore[attr-defined]
        trainer.fit(module, token_batches(module.model.config.vocab_size, args.steps, length=32))
        snapshots = [weight_files(root, n) for n in names]
        base_bytes = sum(len(b) for b in snapshots[0].values())
        deltas, encode_seconds = [], []
        for parent, child in itertools.pairwise(snapshots):
            seconds, delta = elapsed(lambda p=parent, c=child: {f: encode_delta(p[f], c[f]) for f in c})
            deltas.append(delta)
            encode_seconds.append(seconds)
        delta_bytes = [sum(len(d) for d in delta.values()) for delta in deltas]
        newest = snapshots[-1]
        digests = {f: digest_hex(data) for f, data in newest.items()}

        def rebuild() -> None:
            current = snapshots[0]
            for delta in deltas:
                current = {f: bytes(apply_delta(current[f], d, len(current[f]), f)) for f, d in delta.items()}
            assert {f: digest_hex(data) for f, data in current.items()} == digests  # bit-exact

        def read_base() -> None:
            folder = root / RUN / "sampler_weights" / names[-1]
            files = {f: (folder / f).read_bytes() for f in newest}
            assert {f: digest_hex(data) for f, data in files.items()} == digests

        rebuild_seconds = statistics.median(elapsed(rebuild)[0] for _ in range(args.repeats))
        read_seconds = statistics.median(elapsed(read_base)[0] for _ in range(args.repeats))
        base_save = statistics.median(
            elapsed(lambda i=i: module.save_weights_for_sampler(f"base-{i}"))[0] for i in range(args.repeats)
        )
        ours = statistics.median(elapsed(lambda i=i: module.save_state(f"train-{i}"))[0] for i in range(args.repeats))
        tensors = floor_tensors(module.adapter_state_dict(), trainer.optimizers[0].state_dict())
        floor = statistics.median(
            elapsed(lambda i=i: save_floor(tensors, root / f"floor-{i}.safetensors"))[0] for i in range(args.repeats)
        )
        return {
            "config": {"base_model": args.base_model, "dtype": "bfloat16", "lr": 1e-5, "steps": trainer.global_step},
            "rows": {
                "snapshot.base": {"bytes": base_bytes, "seconds": round(base_save, 3)},
                "snapshot.deltas": {
                    "bytes": delta_bytes,
                    "encode_seconds": [round(s, 3) for s in encode_seconds],
                    "base_over_delta": [round(base_bytes / b, 1) for b in delta_bytes],
                },
                "rebuild.chain": {"deltas": len(deltas), "seconds": round(rebuild_seconds, 3)},
                "rebuild.read_base": {"seconds": round(read_seconds, 3)},
                "save.full_training": {"seconds": round(ours, 3)},
                "save.floor": {
                    "seconds": round(floor, 3),
                    "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
                },
            },
            "ratios": {
                "largest_delta_over_base": round(max(delta_bytes) / base_bytes, 5),
                "rebuild_chain_over_read_base": round(rebuild_seconds / read_seconds, 2),
                "full_training_save_over_floor": round(ours / floor, 2),
            },
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default="qwen3-0.6b-shape")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--every", type=int, default=2, help="steps between snapshots (10 / 2: a chain of 5 deltas)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", help="where the checkpoints are written (a temporary directory inside it)")
    args = parser.parse_args()
    quiet()
    json.dump(run(args), sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
