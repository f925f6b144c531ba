"""Full-parameter checkpoints (``LoRAModule(rank=0)``) and snapshot chains, on the qwen3-0.6b shape in bf16.

Trains the built-in ``qwen3-0.6b-shape`` model (random weights, Qwen3-0.6B's shapes, bf16) in full with AdamW at
lr 1e-5 through the plugin, saving a sampler checkpoint before training and every ``--every`` steps. The plugin
writes them as a snapshot chain (``LoRACheckpointIO(max_deltas=...)``): the first a base, the next ones deltas
against the previous one. Then measures, side by side in one run:

- the stored bytes and the save time (sync, fsynced; a delta's includes computing it) of the base and of each delta;
- the time to rebuild the newest snapshot's weights through its chain (``storage.chain.rebuild_weights``: the
  base read once, each delta XORed into it in place, digests checked) versus reading the same weights stored as a
  base (its ``download``, which writes a base), both verified reads of every file into memory;
- the save time of a full-parameter training checkpoint (sync, fsynced) versus the raw safetensors floor
  (one file of the weights and the optimizer moments, fsynced).

Prints one JSON object:

    python benchmarks/full_parameter.py [--steps 10] [--every 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
from _common import elapsed, floor_tensors, make_trainer, quiet, save_floor, token_batches

from lightning_lora_ckpt import Checkpoint, CheckpointStore, LoRACheckpointIO, LoRAModule
from lightning_lora_ckpt.format.snapshot_delta import encode_delta
from lightning_lora_ckpt.storage.chain import rebuild_weights
from lightning_lora_ckpt.storage.read import read_checkpoint

RUN = "full"


class Snapshots(L.Callback):
    """Saves a sampler checkpoint before the first step and every ``every`` steps, named by step."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.seconds: dict[str, float] = {}  # save time of each snapshot, by name

    def _save(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        name = f"{trainer.global_step:06d}"
        self.seconds[name] = elapsed(lambda: module.save_weights_for_sampler(name))[0]  # type: ignore[operator]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step % self.every == 0:
            self._save(trainer, pl_module)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train, snapshot, and measure; returns the rows."""
    with tempfile.TemporaryDirectory(prefix="lora-full-", dir=args.workdir) as tmp:
        root = Path(tmp)
        chain_length = args.steps // args.every
        module = LoRAModule(args.base_model, rank=0, learning_rate=1e-5, dtype="bfloat16", max_shard_size="2GB")
        io = LoRACheckpointIO(root=str(root), run_id=RUN, async_save=False, max_deltas=chain_length)
        snapshot = Snapshots(args.every)
        trainer = make_trainer([io], args.steps)
        trainer.callbacks.append(snapshot)  # type: ignore[attr-defined]
        trainer.fit(module, token_batches(module.model.config.vocab_size, args.steps, length=32))
        store = CheckpointStore(str(root))
        listed = [c for c in store.list_checkpoints(RUN) if c.checkpoint_type == "sampler"]
        base, deltas = listed[0], listed[1:]
        assert base.snapshot == "base" and all(c.snapshot == "delta" for c in deltas), [c.snapshot for c in listed]
        newest = deltas[-1].path
        as_base = store.download(newest, root / "as-base")

        base_files = read_checkpoint(base.path)[1]
        newest_files = read_checkpoint(as_base)[1]
        against_base = sum(
            len(encode_delta(base_files[w], newest_files[w]) or b"") for w in store.manifest(newest).rebuilds
        )

        def rebuild() -> None:
            manifest, files = read_checkpoint(newest)
            rebuild_weights(newest, manifest, files)  # digests checked

        rebuild_seconds = statistics.median(elapsed(rebuild)[0] for _ in range(args.repeats))
        read_seconds = statistics.median(elapsed(lambda: read_checkpoint(as_base))[0] for _ in range(args.repeats))
        tensors = floor_tensors(module.adapter_state_dict(), trainer.optimizers[0].state_dict())
        saves: dict[str, list[float]] = {"ours": [], "floor": []}
        for i in range(args.repeats):  # interleaved: both see the same disk (its write-back and throttling)
            saves["ours"].append(elapsed(lambda i=i: module.save_state(f"train-{i}"))[0])
            saves["floor"].append(elapsed(lambda i=i: save_floor(tensors, root / f"floor-{i}.safetensors"))[0])
        ours, floor = statistics.median(saves["ours"]), statistics.median(saves["floor"])
        delta_bytes = [c.size_bytes - _metadata_bytes(store, c.path) for c in deltas]
        base_bytes = base.size_bytes - _metadata_bytes(store, base.path)
        return {
            "config": {"base_model": args.base_model, "dtype": "bfloat16", "lr": 1e-5, "steps": trainer.global_step},
            "rows": {
                "snapshot.base": {"bytes": base_bytes, "seconds": round(snapshot.seconds[_name(base)], 3)},
                "snapshot.deltas": {
                    "steps": [c.step for c in deltas],
                    "bytes": delta_bytes,
                    "save_seconds": [round(snapshot.seconds[_name(c)], 3) for c in deltas],
                    "base_over_delta": [round(base_bytes / b, 1) for b in delta_bytes],
                },
                "snapshot.newest_against_base": {"steps": [base.step, deltas[-1].step], "bytes": against_base},
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


def _name(checkpoint: Checkpoint) -> str:
    return checkpoint.checkpoint_id.rsplit("/", 1)[1]


def _metadata_bytes(store: CheckpointStore, uri: str) -> int:
    """The bytes of a snapshot's config and tokenizer files (the same in a base and a delta)."""
    manifest = store.manifest(uri)
    return sum(e.size for n, e in manifest.files.items() if ".safetensors" not in n)


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
