"""Every checkpoint path measured side by side, in one process, on the same trained LoRA state.

    python benchmarks/suite.py                                # qwen3-0.6b-shape, bf16 base, r=16 all-linear, AdamW;
                                                              # then the 8B shape (benchmarks/scale.py), CPU and GPU
    python benchmarks/suite.py --quick --base-model tiny-qwen3  # a quick run: the small part only
    python benchmarks/suite.py --repeats 5 --json docs/benchmarks.json --markdown docs/benchmarks.md

One ``LoRAModule`` is trained for a few steps; then, on that very state (adapter, AdamW moments, LR
schedule, loop state), it is saved and resumed each way:

- Lightning's default: the same trainer as a plain LightningModule around the PEFT model would have
  it (``TorchCheckpointIO``, the whole ``state_dict``, no LoRAModule checkpoint hooks);
- the Hugging Face Trainer way: a real ``transformers.Trainer`` over the same PEFT model, optimizer and
  scheduler, through its own ``_save_checkpoint`` / ``_load_from_checkpoint`` +
  ``_load_optimizer_and_scheduler`` + ``_load_rng_state``;
- ours: sampler, training (synchronous; asynchronous: loop blocked and until committed), resumed through
  Lightning's own restore path (``LoRACheckpointIO.load_checkpoint`` + module and optimizer loads);
- the floor: ``safetensors.torch.save_file`` of the same adapter and optimizer tensors plus fsync of the
  file and its directory, and ``safetensors.torch.load_file(backend="pread")`` of it (every byte read; the
  default, mapped load, which reads nothing until a tensor is used, is a row of its own);
- a new ``SamplingClient`` versus an adapter hotload; on a loopback moto S3 server, our training
  checkpoint upload versus a plain s3fs ``put`` of the same files.

Then, unless ``--quick``, ``benchmarks/scale.py``: a synthetic 8B-shaped training state (r=64 on every linear
layer of a Llama-3-8B shape, AdamW moments, about 2 GB) saved ours sync and async, through Lightning's
``AsyncCheckpointIO`` and ``torch.distributed.checkpoint.async_save``, and as the floor, and read back; and
the same saves with the state on the GPU where CUDA is available (else the group is recorded as skipped).
Every target of ``TARGETS`` is written to the results, those of a group not measured with no value.

Each round runs every method of a group once, ``--repeats`` rounds, so background load falls on all
of them alike (with an untimed ``os.sync()`` before each); the figures are medians.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import shutil
import sys
import tempfile
import types
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning as L
import s3_list
import scale
import torch
from _common import (
    BUCKET,
    Method,
    elapsed,
    floor_tensors,
    machine,
    make_trainer,
    moto_s3,
    path_bytes,
    quiet,
    read_floor,
    round_robin,
    save_floor,
    token_batches,
)
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.plugins.io import TorchCheckpointIO
from report import Target, evaluate, ratios, to_markdown

from lightning_lora_ckpt import LoRACheckpointIO, LoRAModule, SamplingClient

#: Every row of the results: key -> what it measures.
ROWS: dict[str, str] = {
    "save.lightning_default": "Lightning default `.ckpt` (plain LightningModule around the PEFT model, `TorchCheckpointIO`)",
    "save.hf_trainer": "HF `Trainer._save_checkpoint` (adapter, optimizer.pt, scheduler.pt, rng_state.pth, trainer_state.json, training_args.bin)",
    "save.ours_sampler": "ours, sampler checkpoint",
    "save.ours_training_sync": "ours, training checkpoint, `async_save=False`",
    "save.ours_training_async": "ours, training checkpoint, `async_save=True` (loop blocked; `committed_seconds` until durable)",
    "save.floor": "floor: `safetensors.torch.save_file` of adapter + optimizer tensors, fsync of file and directory",
    "resume.lightning_default": "Lightning default: `torch.load` of the `.ckpt`, whole `state_dict` and optimizer loaded",
    "resume.hf_trainer": "HF Trainer: PEFT `load_adapter` + `torch.load` of optimizer, scheduler and RNG state",
    "resume.ours": "ours: Lightning restore through `LoRACheckpointIO.load_checkpoint` (verified) + module and optimizer loads",
    "resume.floor": 'floor: `safetensors.torch.load_file(backend="pread")` of the same tensors (every byte read)',
    "resume.floor_mmap": "`safetensors.torch.load_file` default (maps the file: reads nothing until a tensor is used)",
    "sampling.new_client": "new `SamplingClient.from_checkpoint` (builds the base, loads the adapter)",
    "sampling.hotload": "`SamplingClient.load_adapter` of another adapter of the same base",
    "s3.ours_upload": "ours: training checkpoint saved to `s3://` (serialise, sha256, upload, manifest last)",
    "s3.s3fs_put": "plain s3fs `put` of the same files",
}
DOCS = Path(__file__).resolve().parent.parent / "docs"


#: Every target of issue 16, one table: each judged on the rows of its group (report.Target); a target whose group
#: was not measured in a run (``--quick``, or no benchmark yet) is recorded with no value and why it was skipped.
TARGETS = [
    Target(
        "save_vs_floor",
        "our training save (sync) / raw floor save",
        ("save.ours_training_sync", "seconds"),
        ("save.floor", "seconds"),
        1.10,
    ),
    Target(
        "resume_vs_floor", "our resume / raw floor read", ("resume.ours", "seconds"), ("resume.floor", "seconds"), 1.50
    ),
    Target(
        "async_blocking_vs_sync",
        "loop blocked per save: async / sync",
        ("save.ours_training_async", "seconds"),
        ("save.ours_training_sync", "seconds"),
        0.05,
    ),
    Target(
        "sampler_bytes_vs_lightning_default",
        "sampler checkpoint bytes / Lightning default bytes",
        ("save.ours_sampler", "bytes"),
        ("save.lightning_default", "bytes"),
        1 / 50,
    ),
    Target(
        "hotload_vs_new_client",
        "hotload / new sampling client",
        ("sampling.hotload", "seconds"),
        ("sampling.new_client", "seconds"),
        1 / 20,
    ),
    # -- the 8B shape (benchmarks/scale.py; skipped with --quick) --
    Target(
        "async_blocking_vs_sync_8b",
        "8B shape: loop blocked per save, async / sync",
        ("save.ours_async", "seconds"),
        ("save.ours_sync", "seconds"),
        0.05,
        "scale",
    ),
    Target(
        "resume_vs_floor_8b",
        "8B shape: our verified read of the training checkpoint / raw floor read",
        ("resume.ours", "seconds"),
        ("resume.floor", "seconds"),
        1.50,
        "scale",
    ),
    Target(
        "async_extra_memory_8b",
        "8B shape: peak extra RSS during an async save / bytes of the state's tensors",
        ("save.ours_async", "extra_rss_bytes"),
        ("save.ours_async", "state_bytes"),
        1.10,
        "scale",
    ),
    Target(
        "async_blocking_vs_lightning_async",
        "8B shape: loop blocked per save, ours async / Lightning `AsyncCheckpointIO`",
        ("save.ours_async", "seconds"),
        ("save.lightning_async", "seconds"),
        1.0,
        "scale",
    ),
    Target(
        "async_blocking_vs_dcp_async",
        "8B shape: loop blocked per save, ours async / `torch.distributed.checkpoint.async_save`",
        ("save.ours_async", "seconds"),
        ("save.dcp_async", "seconds"),
        1.0,
        "scale",
    ),
    # -- listing one run of 10k checkpoints on S3 (benchmarks/s3_list.py; skipped with --quick or --no-s3) --
    Target(
        "s3_list_10k_requests",
        "S3: requests to list a run of 10k checkpoints",
        ("list.ours_10k", "requests"),
        None,
        10,
        "s3_list",
    ),
    Target(
        "s3_list_10k_seconds",
        "S3: seconds to list a run of 10k checkpoints",
        ("list.ours_10k", "seconds"),
        None,
        1.0,
        "s3_list",
    ),
]
#: Other ratios worth reading: name -> (numerator, denominator), each ``(row, field)``.
COMPARISONS: dict[str, tuple[tuple[str, str], tuple[str, str]]] = {
    "training_save_vs_lightning_default": (
        ("save.ours_training_sync", "seconds"),
        ("save.lightning_default", "seconds"),
    ),
    "training_save_vs_hf_trainer": (("save.ours_training_sync", "seconds"), ("save.hf_trainer", "seconds")),
    "training_bytes_vs_lightning_default": (("save.ours_training_sync", "bytes"), ("save.lightning_default", "bytes")),
    "training_bytes_vs_hf_trainer": (("save.ours_training_sync", "bytes"), ("save.hf_trainer", "bytes")),
    "async_committed_vs_sync": (
        ("save.ours_training_async", "committed_seconds"),
        ("save.ours_training_sync", "seconds"),
    ),
    "resume_vs_lightning_default": (("resume.ours", "seconds"), ("resume.lightning_default", "seconds")),
    "resume_vs_hf_trainer": (("resume.ours", "seconds"), ("resume.hf_trainer", "seconds")),
    "s3_upload_vs_put": (("s3.ours_upload", "seconds"), ("s3.s3fs_put", "seconds")),
}


@contextlib.contextmanager
def checkpoint_io(trainer: L.Trainer, io: CheckpointIO) -> Iterator[None]:
    """The trainer saves and loads through ``io`` inside the block."""
    previous = trainer.strategy.checkpoint_io
    trainer.strategy.checkpoint_io = io
    try:
        yield
    finally:
        trainer.strategy.checkpoint_io = previous


@contextlib.contextmanager
def plain_lightning(trainer: L.Trainer) -> Iterator[None]:
    """The trainer as a plain LightningModule around the PEFT model has it: Lightning's ``TorchCheckpointIO``,
    no LoRAModule checkpoint hooks, the whole ``state_dict`` saved and strictly loaded."""
    module = trainer.lightning_module
    module.on_save_checkpoint = types.MethodType(L.LightningModule.on_save_checkpoint, module)
    module.on_load_checkpoint = types.MethodType(L.LightningModule.on_load_checkpoint, module)
    module.strict_loading = True
    try:
        with checkpoint_io(trainer, TorchCheckpointIO()):
            yield
    finally:
        del module.on_save_checkpoint, module.on_load_checkpoint
        module.strict_loading = False


def hf_trainer(module: LoRAModule, trainer: L.Trainer, output_dir: Path) -> Any:
    """A ``transformers.Trainer`` over the same PEFT model, optimizer, LR scheduler and step (for its checkpointing)."""
    from transformers import Trainer, TrainingArguments

    hf = Trainer(model=module.model, args=TrainingArguments(output_dir=str(output_dir), report_to="none", use_cpu=True))
    hf.optimizer = trainer.optimizers[0]
    hf.lr_scheduler = trainer.lr_scheduler_configs[0].scheduler
    hf.state.global_step = trainer.global_step
    return hf


class Suite:
    """The trained state and every measurement on it; ``last`` keeps the newest artifact of each save row."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.tmp = tmp
        self.module = LoRAModule(args.base_model, rank=args.rank, alpha=2 * args.rank, dtype=args.dtype)
        self.io = LoRACheckpointIO(root=str(tmp / "ours"), run_id="bench", async_save=False)
        self.trainer = make_trainer([self.io], args.steps)
        self.trainer.fit(self.module, token_batches(self.module.model.config.vocab_size, args.steps))
        self.hf = hf_trainer(self.module, self.trainer, tmp / "hf")
        self.hf_dir = tmp / "hf" / f"checkpoint-{self.trainer.global_step}"
        self.tensors = floor_tensors(self.module.adapter_state_dict(), self.trainer.optimizers[0].state_dict())
        self.last: dict[str, str] = {}
        self.client: SamplingClient | None = None

    # -- saves ------------------------------------------------------------------------------------
    def save_methods(self) -> dict[str, Method]:
        return {
            "save.lightning_default": self.save_lightning_default,
            "save.hf_trainer": self.save_hf_trainer,
            "save.ours_sampler": lambda i: self.save_ours("save.ours_sampler", self.module.save_weights_for_sampler, i),
            "save.ours_training_sync": lambda i: self.save_ours("save.ours_training_sync", self.module.save_state, i),
            "save.ours_training_async": self.save_ours_async,
            "save.floor": self.save_floor,
        }

    def save_lightning_default(self, i: int) -> dict[str, float]:
        path = self.tmp / "lightning.ckpt"
        path.unlink(missing_ok=True)
        with plain_lightning(self.trainer):
            seconds, _ = elapsed(lambda: self.trainer.save_checkpoint(path))
        self.last["save.lightning_default"] = str(path)
        return {"seconds": seconds}

    def save_hf_trainer(self, i: int) -> dict[str, float]:
        shutil.rmtree(self.hf_dir, ignore_errors=True)
        seconds, _ = elapsed(lambda: self.hf._save_checkpoint(self.hf.model, trial=None))
        self.last["save.hf_trainer"] = str(self.hf_dir)
        return {"seconds": seconds}

    def save_ours(self, row: str, save: Callable[[str], str], i: int) -> dict[str, float]:
        seconds, self.last[row] = elapsed(lambda: save(f"{row.rsplit('_', 1)[-1]}-{i}"))
        return {"seconds": seconds}

    def save_ours_async(self, i: int) -> dict[str, float]:
        # As during fit: after a fit has ended the plugin commits saves before returning.
        self.io.async_save, self.io.fitting = True, True
        try:
            blocked, self.last["save.ours_training_async"] = elapsed(lambda: self.module.save_state(f"async-{i}"))
            committed, _ = elapsed(self.io.wait)
        finally:
            self.io.async_save, self.io.fitting = False, False
        return {"seconds": blocked, "committed_seconds": blocked + committed}

    def save_floor(self, i: int) -> dict[str, float]:
        path = self.tmp / "floor" / f"{i}.safetensors"
        path.parent.mkdir(exist_ok=True)
        seconds, _ = elapsed(lambda: save_floor(self.tensors, path))
        self.last["save.floor"] = str(path)
        return {"seconds": seconds}

    # -- resumes ----------------------------------------------------------------------------------
    def resume_methods(self) -> dict[str, Method]:
        def lightning_default(i: int) -> dict[str, float]:
            with plain_lightning(self.trainer):
                return {"seconds": elapsed(lambda: restore(self.last["save.lightning_default"]))[0]}

        def hf_trainer(i: int) -> dict[str, float]:
            def load() -> None:
                self.hf._load_from_checkpoint(str(self.hf_dir))
                self.hf._load_optimizer_and_scheduler(str(self.hf_dir))
                self.hf._load_rng_state(str(self.hf_dir))

            return {"seconds": elapsed(load)[0]}

        restore = self.trainer._checkpoint_connector.restore  # what fit(ckpt_path=...) runs
        return {
            "resume.lightning_default": lightning_default,
            "resume.hf_trainer": hf_trainer,
            "resume.ours": lambda i: {"seconds": elapsed(lambda: restore(self.last["save.ours_training_sync"]))[0]},
            "resume.floor": lambda i: {"seconds": elapsed(lambda: read_floor(self.last["save.floor"]))[0]},
            "resume.floor_mmap": lambda i: {
                "seconds": elapsed(lambda: read_floor(self.last["save.floor"], lazy=True))[0]
            },
        }

    # -- sampling ---------------------------------------------------------------------------------
    def sampling_methods(self) -> dict[str, Method]:
        first, other = self.last["save.ours_sampler"], self.other_adapter()

        def new_client(i: int) -> dict[str, float]:
            self.client = None
            gc.collect()
            seconds, self.client = elapsed(lambda: SamplingClient.from_checkpoint(first))
            return {"seconds": seconds}

        def hotload(i: int) -> dict[str, float]:
            assert self.client is not None
            return {"seconds": elapsed(lambda: self.client.load_adapter(other))[0]}

        return {"sampling.new_client": new_client, "sampling.hotload": hotload}

    def other_adapter(self) -> str:
        """A sampler checkpoint of a second adapter (the trained B matrices halved); the module is left as it was."""
        params = [p for n, p in self.module.model.named_parameters() if "lora_B" in n]
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p in params:
                p.mul_(0.5)
        try:
            return self.module.save_weights_for_sampler("other-adapter")
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved, strict=True):
                    p.copy_(s)

    # -- S3 ---------------------------------------------------------------------------------------
    def s3_methods(self, storage_options: dict[str, Any]) -> dict[str, Method]:
        import s3fs

        io = LoRACheckpointIO(
            root=f"s3://{BUCKET}/ours", run_id="bench", async_save=False, storage_options=storage_options
        )
        fs = s3fs.S3FileSystem(**storage_options)
        local = self.last["save.ours_training_sync"]

        def ours(i: int) -> dict[str, float]:
            with checkpoint_io(self.trainer, io):
                return {"seconds": elapsed(lambda: self.module.save_state(f"s3-{i}"))[0]}

        def put(i: int) -> dict[str, float]:
            return {"seconds": elapsed(lambda: fs.put(local, f"{BUCKET}/put/{i}", recursive=True))[0]}

        self.last["s3.ours_upload"] = self.last["s3.s3fs_put"] = local  # the same files
        return {"s3.ours_upload": ours, "s3.s3fs_put": put}

    def teardown(self) -> None:
        self.io.teardown()


def measure(args: argparse.Namespace) -> tuple[dict[str, dict[str, Any]], int, int]:
    """Train once and measure every group of the small run: its rows, and the module's (total, trainable) parameters."""
    with tempfile.TemporaryDirectory(prefix="lora-bench-", dir=args.workdir) as tmp:
        suite = Suite(args, Path(tmp))
        rows = round_robin(suite.save_methods(), args.repeats)
        for key in rows:
            rows[key]["bytes"] = path_bytes(suite.last[key])
        rows |= round_robin(suite.resume_methods(), args.repeats)
        if args.s3:
            with moto_s3() as options:
                s3 = round_robin(suite.s3_methods(options), args.repeats)
            for key in s3:
                s3[key]["bytes"] = path_bytes(suite.last[key])
            rows |= s3
        rows |= round_robin(suite.sampling_methods(), args.repeats)
        suite.teardown()
        trainable = sum(p.numel() for p in suite.module.parameters() if p.requires_grad)
        total = sum(p.numel() for p in suite.module.parameters())
    for key, row in rows.items():
        row["description"] = ROWS[key]
    return {key: rows[key] for key in ROWS if key in rows}, total, trainable


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The small run, then (unless ``--quick``) the 8B shape and, where CUDA is, the 8B shape on the GPU; the
    results: rows, targets, comparisons and machine of the small run, and the ``scale`` and ``gpu`` groups."""
    quiet()
    rows, total, trainable = measure(args)
    gc.collect()  # the small run's model and trainer, before the 8B state is built
    big = {"repeats": args.repeats, "layers": args.scale_layers, "rank": args.scale_rank, "workdir": args.workdir}
    list_group: dict[str, Any] = {"skipped": "--quick" if args.quick else "--no-s3"}
    if args.s3 and not args.quick:
        list_group = s3_list.run(args.list_checkpoints)
    if args.quick:
        scale_group = gpu_group = {"skipped": "--quick"}
    else:
        scale_group = scale.run(**big, cache=args.cache)
        gpu_group = {"skipped": "no CUDA"}
        if torch.cuda.is_available():
            gpu_group = scale.run(**big, device="cuda", reads=False)
    return {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "note": args.note,
        "config": {
            "base_model": args.base_model,
            "dtype": args.dtype,
            "lora_rank": args.rank,
            "lora_alpha": 2 * args.rank,
            "target_modules": "all-linear",
            "optimizer": "AdamW",
            "train_steps": args.steps,
            "repeats": args.repeats,
            "parameters": total,
            "trainable_parameters": trainable,
            "quick": args.quick,
        },
        "machine": machine(args.workdir or tempfile.gettempdir()),
        "rows": rows,
        "targets": evaluate(TARGETS, {"suite": {"rows": rows}, "scale": scale_group, "s3_list": list_group}),
        "comparisons": ratios(COMPARISONS, rows),
        "scale": scale_group,
        "gpu": gpu_group,
        "s3_list": list_group,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default="qwen3-0.6b-shape", help="built-in name, HF id or local directory")
    parser.add_argument("--dtype", default="bfloat16", help="dtype of the frozen base (the adapter is float32)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2, help="training steps before measuring")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per group; figures are medians")
    parser.add_argument("--no-s3", dest="s3", action="store_false", help="skip the moto S3 group")
    parser.add_argument("--quick", action="store_true", help="the small run only: skip the 8B shape and the GPU group")
    parser.add_argument("--list-checkpoints", type=int, default=10_000, help="checkpoints in the S3 listing run")
    parser.add_argument("--scale-layers", type=int, default=32, help="decoder layers of the 8B shape (32)")
    parser.add_argument("--scale-rank", type=int, default=64, help="LoRA rank of the 8B shape")
    parser.add_argument("--cache", choices=sorted(scale.CACHE_NOTES), default="warm", help="8B reads: page cache")
    parser.add_argument("--json", type=Path, default=DOCS / "benchmarks.json", help="write the results as JSON here")
    parser.add_argument("--markdown", type=Path, default=DOCS / "benchmarks.md", help="write the markdown report here")
    parser.add_argument("--note", default="", help="a line quoted at the top of the report")
    parser.add_argument("--workdir", help="where the checkpoints are written (a temporary directory inside it)")
    args = parser.parse_args(argv)
    for name in ("rank", "steps", "repeats", "scale_layers", "scale_rank"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    result = run(args)
    markdown = to_markdown(result)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    args.markdown.write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
