"""An 8B-shaped training checkpoint: ours against the safetensors floor, Lightning's AsyncCheckpointIO and DCP.

A synthetic Lightning checkpoint dict (no base model) of LoRA r=64 on every linear layer (q, k, v, o, gate,
up, down) of a Llama-3-8B-shaped model (32 layers, hidden 4096, intermediate 14336, 32 heads and 8 KV heads
of 128: k/v out 1024): the adapter (167.8 M float32 parameters) and AdamW's exp_avg, exp_avg_sq and step,
about 2.0 GB of tensors. In one process, round-robin over ``--repeats`` rounds on a local temporary directory,
each save of the same dict (or of its tensors):

- ours, ``LoRACheckpointIO(async_save=False).save_checkpoint``;
- ours, ``async_save=True``: until the call returns (the training loop is blocked), until its background copy
  of the tensors is done (``wait_for_snapshots``: in a Trainer the next optimizer update waits for it) and until
  committed (``wait``); and the peak resident memory above the level before the save (sampled every 5 ms);
- Lightning's ``AsyncCheckpointIO(TorchCheckpointIO())``: the call (which clones every tensor) and until
  ``teardown()`` has written the file (``torch.save``, no fsync);
- ``torch.distributed.checkpoint.async_save`` with a gloo process group of one: the call (a staging copy) and
  until its future is done (``FileSystemWriter``, which fsyncs);
- the floor: ``safetensors.torch.save_file`` of the same tensors, fsync of the file and its directory.

Then the reads: ours, ``open_checkpoint(with_state=True)`` (every file's digest verified) and decoding the whole
training state, versus the floor ``safetensors.torch.load_file(backend="pread")`` (every byte read) and the
default, mapped ``load_file`` (reads nothing until a tensor is used). With ``--cache warm`` (the default) each
timed read is preceded by an untimed read of the same files, so all of them read from the page cache;
``--cache cold`` evicts them first instead (``posix_fadvise``). Only the newest artifact of each method is kept.

    python benchmarks/scale.py [--repeats 3] [--layers 32] [--rank 64] [--cache warm] [--device cpu] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from _common import (
    Method,
    PeakRss,
    Projection,
    disk,
    elapsed,
    floor_tensors,
    path_bytes,
    quiet,
    read_floor,
    round_robin,
    save_floor,
    set_page_cache,
    training_state,
)
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO
from lightning_utilities.core.apply_func import apply_to_collection
from report import ratios

from lightning_lora_ckpt import LoRACheckpointIO
from lightning_lora_ckpt.storage.loading import open_checkpoint

#: (name, in features, out features) of the Llama-3-8B projections (k/v: 8 KV heads of 128).
LLAMA3_8B: list[Projection] = [
    ("q_proj", 4096, 4096),
    ("k_proj", 4096, 1024),
    ("v_proj", 4096, 1024),
    ("o_proj", 4096, 4096),
    ("gate_proj", 4096, 14336),
    ("up_proj", 4096, 14336),
    ("down_proj", 14336, 4096),
]
#: Every row: key -> what it measures.
ROWS: dict[str, str] = {
    "save.ours_sync": "8B ours, `LoRACheckpointIO(async_save=False).save_checkpoint`",
    "save.ours_async": "8B ours, `async_save=True`: call returns; tensors copied in a background thread; `wait()`",
    "save.lightning_async": "8B Lightning `AsyncCheckpointIO(TorchCheckpointIO())`: clones in the call, "
    "`torch.save` in a thread until `teardown()` (no fsync)",
    "save.dcp_async": "8B `torch.distributed.checkpoint.async_save` (gloo, world size 1): staging copy in the "
    "call, `FileSystemWriter` (fsync) until the future is done",
    "save.floor": "8B floor: `safetensors.torch.save_file` of the same tensors, fsync of file and directory",
    "resume.ours": "8B ours: `open_checkpoint(with_state=True)` (every file's digest verified), training state decoded",
    "resume.floor": '8B floor: `safetensors.torch.load_file(backend="pread")` (every byte read)',
    "resume.floor_mmap": "8B `safetensors.torch.load_file` default (maps the file: reads nothing until used)",
}
#: Other ratios worth reading: name -> (numerator, denominator), each ``(row, field)``.
COMPARISONS: dict[str, tuple[tuple[str, str], tuple[str, str]]] = {
    "save_vs_floor_8b": (("save.ours_sync", "seconds"), ("save.floor", "seconds")),
    "async_committed_vs_sync_8b": (("save.ours_async", "committed_seconds"), ("save.ours_sync", "seconds")),
    "async_copied_vs_lightning_async_blocking": (
        ("save.ours_async", "copied_seconds"),
        ("save.lightning_async", "seconds"),
    ),
    "async_copied_vs_dcp_async_blocking": (("save.ours_async", "copied_seconds"), ("save.dcp_async", "seconds")),
    "async_committed_vs_lightning_async": (
        ("save.ours_async", "committed_seconds"),
        ("save.lightning_async", "committed_seconds"),
    ),
    "async_committed_vs_dcp_async": (
        ("save.ours_async", "committed_seconds"),
        ("save.dcp_async", "committed_seconds"),
    ),
    "lightning_async_extra_memory_8b": (
        ("save.lightning_async", "extra_rss_bytes"),
        ("save.lightning_async", "state_bytes"),
    ),
    "dcp_async_extra_memory_8b": (("save.dcp_async", "extra_rss_bytes"), ("save.dcp_async", "state_bytes")),
    "async_extra_anonymous_memory_8b": (("save.ours_async", "extra_anon_bytes"), ("save.ours_async", "state_bytes")),
    "resume_vs_floor_mmap_8b": (("resume.ours", "seconds"), ("resume.floor_mmap", "seconds")),
}
CACHE_NOTES = {
    "warm": "warm page cache (each timed read follows an untimed read of the same files).",
    "cold": "cold page cache (the files are flushed and evicted with posix_fadvise before each timed read).",
}


@contextlib.contextmanager
def process_group_of_one(store: Path) -> Iterator[Any]:
    """A gloo process group of world size 1 (a ``FileStore``, no network), torn down after the block."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(store), 1), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


class Scale:
    """The state, every method measured on it, and the newest artifact of each save row (``last``)."""

    def __init__(self, tmp: Path, state: dict[str, Any], process_group: Any) -> None:
        self.tmp, self.state, self.process_group = tmp, state, process_group
        self.tensors = floor_tensors(state["state_dict"], state["optimizer_states"][0])
        self.state_bytes = sum(t.numel() * t.element_size() for t in self.tensors.values())
        self.cuda = any(t.is_cuda for t in self.tensors.values())
        self.sync = LoRACheckpointIO(root=str(tmp / "ours"), run_id="scale", async_save=False)
        self.background = LoRACheckpointIO(root=str(tmp / "ours"), run_id="scale", async_save=True)
        self.last: dict[str, Path] = {}

    def artifact(self, row: str, path: Path) -> Path:
        """``path``, where ``row`` writes this round; its artifact of the previous round is removed (untimed)."""
        old = self.last.pop(row, None)
        if old is not None:
            remove(old)
        self.last[row] = path
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    # -- saves ------------------------------------------------------------------------------------
    def save_methods(self) -> dict[str, Method]:
        return {
            "save.ours_sync": self.ours_sync,
            "save.ours_async": self.ours_async,
            "save.lightning_async": self.lightning_async,
            "save.dcp_async": self.dcp_async,
            "save.floor": self.floor,
        }

    def ours_sync(self, i: int) -> dict[str, float]:
        self.artifact("save.ours_sync", Path(self.sync.resolve(f"sync-{i}", "training")))
        return {"seconds": elapsed(lambda: self.sync.save_checkpoint(self.state, f"sync-{i}"))[0]}

    def ours_async(self, i: int) -> dict[str, float]:
        self.artifact("save.ours_async", Path(self.background.resolve(f"async-{i}", "training")))
        io = self.background
        return self.asynchronous(lambda: io.save_checkpoint(self.state, f"async-{i}"), io.wait_for_snapshots, io.wait)

    def lightning_async(self, i: int) -> dict[str, float]:
        path = self.artifact("save.lightning_async", self.tmp / "lightning" / f"{i}.ckpt")
        io = AsyncCheckpointIO(TorchCheckpointIO())
        return self.asynchronous(lambda: io.save_checkpoint(self.state, path), None, io.teardown)

    def dcp_async(self, i: int) -> dict[str, float]:
        import torch.distributed.checkpoint as dcp

        path = self.artifact("save.dcp_async", self.tmp / "dcp" / str(i))
        futures: list[Any] = []

        def start() -> None:
            futures.append(dcp.async_save(self.tensors, checkpoint_id=str(path), process_group=self.process_group))

        def committed() -> None:  # a Future, or an AsyncSaveResponse where staging is asynchronous too
            getattr(futures[0], "upload_completion", futures[0]).result()

        return self.asynchronous(start, None, committed)

    def asynchronous(
        self, start: Callable[[], Any], copied: Callable[[], Any] | None, committed: Callable[[], Any]
    ) -> dict[str, float]:
        """Times of one asynchronous save from its start: until ``start()`` returns (the loop is blocked), until
        ``copied()`` returns (its copy of the tensors is done; None: the call made it), until ``committed()``
        returns; and the peak memory above the level before it (host, and GPU for CUDA tensors)."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            gpu_baseline = torch.cuda.memory_allocated()
        with PeakRss() as memory:
            begin = time.perf_counter()
            start()
            blocked = time.perf_counter() - begin
            if copied is not None:
                copied()
            copy_done = time.perf_counter() - begin
            committed()
            done = time.perf_counter() - begin
        result = {
            "seconds": blocked,
            "copied_seconds": copy_done,
            "committed_seconds": done,
            "extra_rss_bytes": memory.extra,
            "extra_anon_bytes": memory.extra_anon,
        }
        if self.cuda:
            result["extra_gpu_bytes"] = torch.cuda.max_memory_allocated() - gpu_baseline
        return result

    def floor(self, i: int) -> dict[str, float]:
        path = self.artifact("save.floor", self.tmp / "floor" / f"{i}.safetensors")
        return {"seconds": elapsed(lambda: save_floor(self.tensors, path))[0]}

    # -- reads ------------------------------------------------------------------------------------
    def resume_methods(self, cache: str) -> dict[str, Method]:
        ours, floor = self.last["save.ours_sync"], self.last["save.floor"]

        def read_ours() -> None:
            opened = open_checkpoint(str(ours), with_state=True)
            opened.payload.state(opened.uri)  # the whole training state decoded, as a resume needs it

        def timed_read(path: Path, read: Callable[[], Any]) -> dict[str, float]:
            set_page_cache(path, cache)
            return {"seconds": elapsed(read)[0]}

        return {
            "resume.ours": lambda i: timed_read(ours, read_ours),
            "resume.floor": lambda i: timed_read(floor, lambda: read_floor(floor)),
            "resume.floor_mmap": lambda i: timed_read(floor, lambda: read_floor(floor, lazy=True)),
        }

    def check_reads(self) -> bool:
        """Whether ours and the floor read back what was saved (one adapter and one moment tensor compared)."""
        opened = open_checkpoint(str(self.last["save.ours_sync"]), with_state=True)
        key = next(iter(self.state["state_dict"]))
        moments = opened.payload.state(opened.uri)["optimizer_states"][0]["state"][0]["exp_avg"]
        floor = read_floor(self.last["save.floor"])
        return (
            torch.equal(opened.adapter[key], self.state["state_dict"][key].cpu())
            and torch.equal(moments, self.state["optimizer_states"][0]["state"][0]["exp_avg"].cpu())
            and torch.equal(floor[f"adapter.{key}"], self.state["state_dict"][key].cpu())
        )

    def teardown(self) -> None:
        self.background.teardown()
        self.sync.teardown()


def run(
    repeats: int = 3,
    layers: int = 32,
    rank: int = 64,
    cache: str = "warm",
    device: str = "cpu",
    reads: bool = True,
    workdir: str | None = None,
) -> dict[str, Any]:
    """Build the state, measure every save (and, with ``reads``, every read) round-robin; config, rows, ratios."""
    quiet()
    if cache not in CACHE_NOTES:
        raise ValueError(f"cache must be one of {sorted(CACHE_NOTES)}, got {cache!r}")
    state = training_state(LLAMA3_8B, layers, rank, step=100, base="llama-3-8b-shape", step_tensors=True)
    if device != "cpu":  # AdamW keeps its step counts on the CPU (unless capturable or fused)
        state = apply_to_collection(state, torch.Tensor, lambda t: t.to(device) if t.dim() else t)
    with (
        tempfile.TemporaryDirectory(prefix="lora-scale-", dir=workdir) as tmp,
        process_group_of_one(Path(tmp) / "pg-store") as group,
    ):
        scale = Scale(Path(tmp), state, group)
        try:
            rows = round_robin(scale.save_methods(), repeats)
            for key, row in rows.items():
                row["bytes"] = path_bytes(scale.last[key])
                if "extra_rss_bytes" in row:
                    row["state_bytes"] = scale.state_bytes
            if reads:
                rows |= round_robin(scale.resume_methods(cache), repeats)
            verified = scale.check_reads() if reads else None
        finally:
            scale.teardown()
        where = disk(tmp)
    for key, row in rows.items():
        row["description"] = ROWS[key]
    config = {
        "shape": "Llama-3-8B (hidden 4096, intermediate 14336, 32 heads, 8 KV heads of 128)",
        "layers": layers,
        "lora_rank": rank,
        "target_modules": [name for name, _, _ in LLAMA3_8B],
        "trainable_parameters": sum(t.numel() for t in state["state_dict"].values()),
        "state_bytes": scale.state_bytes,
        "tensors": len(scale.tensors),
        "device": device,
        "repeats": repeats,
        "cache": cache if reads else None,
        "cache_note": CACHE_NOTES[cache] if reads else "none measured.",
        "disk": where,
        "reads_verified": verified,
    }
    return {"config": config, "rows": {k: rows[k] for k in ROWS if k in rows}, "comparisons": ratios(COMPARISONS, rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="rounds; figures are medians")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32: the 8B shape)")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--cache", choices=sorted(CACHE_NOTES), default="warm", help="page cache before each read")
    parser.add_argument("--device", default="cpu", help="where the state lives (cuda: saves only)")
    parser.add_argument("--workdir", help="where the checkpoints are written (a temporary directory inside it)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    result = run(args.repeats, args.layers, args.rank, args.cache, args.device, args.device == "cpu", args.workdir)
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
