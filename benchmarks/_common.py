"""Helpers shared by the benchmark scripts: quiet set-up, batches, trainers, synthetic training states, timing,
round-robin measurement, memory sampling, the safetensors floor, page-cache control, a loopback S3 server."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import inspect
import logging
import os
import platform
import shutil
import statistics
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import safetensors.torch
import torch
from torch.utils.data import DataLoader

from lightning_lora_ckpt.storage.local import fsync_path

BUCKET = "bench"
#: (name, in features, out features) of a linear projection LoRA adapts.
Projection = tuple[str, int, int]
#: One measurement of a round-robin group: called with the round's index, returns its timings (and sizes).
Method = Callable[[int], dict[str, float]]


def quiet() -> None:
    """Offline Hub, and no per-step warnings or info lines from the libraries in the measured output."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers", "werkzeug", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)


def token_batches(vocab: int, n: int, batch_size: int = 1, length: int = 16, seed: int = 0) -> DataLoader:
    """``n`` random next-token batches in the ``LoRAModule`` batch format."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        ids = torch.randint(0, min(vocab, 1024), (batch_size, length + 1), generator=g)
        items.append({"input_ids": ids[:, :-1], "target_tokens": ids[:, 1:], "weights": torch.ones(batch_size, length)})
    return DataLoader(items, batch_size=None)


def make_trainer(plugins: list[Any] | None, steps: int) -> L.Trainer:
    """A CPU trainer without logger, progress bar or Lightning's own checkpoint callback."""
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        plugins=plugins,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def training_state(
    projections: list[Projection], layers: int, rank: int, step: int, base: str, step_tensors: bool = False
) -> dict[str, Any]:
    """A Lightning checkpoint dict of a LoRA adapter on ``projections`` of ``layers`` decoder layers and AdamW's
    moments (random float32 values), without a base model, in the shape ``LoRACheckpointIO.save_checkpoint`` takes.

    With ``step_tensors`` each parameter's AdamW ``step`` is a 0-dim float32 tensor, as ``torch.optim.AdamW`` keeps
    it; otherwise an int.
    """
    adapter, moments = {}, {}
    for layer in range(layers):
        for name, fan_in, fan_out in projections:
            prefix = f"base_model.model.model.layers.{layer}.{name}"
            for key, shape in (
                (f"{prefix}.lora_A.weight", (rank, fan_in)),
                (f"{prefix}.lora_B.weight", (fan_out, rank)),
            ):
                adapter[key] = torch.randn(shape)
                count = torch.tensor(float(step)) if step_tensors else step
                moments[len(moments)] = {"exp_avg": torch.randn(shape), "exp_avg_sq": torch.rand(shape), "step": count}
    config = {"r": rank, "lora_alpha": 2 * rank, "target_modules": [n for n, _, _ in projections], "peft_type": "LORA"}
    return {
        "state_dict": adapter,
        "lora_ckpt": {"adapter_config": config, "base_model": {"name_or_path": base, "fingerprint": "0" * 64}},
        "global_step": step,
        "epoch": 0,
        "optimizer_states": [{"state": moments, "param_groups": [{"lr": 1e-4, "params": list(moments)}]}],
    }


def floor_tensors(adapter: dict[str, torch.Tensor], optimizer_state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors a training checkpoint cannot do without: the adapter and every tensor of an optimizer's
    ``state_dict()``, flat, by name."""
    tensors = {f"adapter.{key}": value for key, value in adapter.items()}
    for index, state in optimizer_state["state"].items():
        tensors.update({f"optimizer.{index}.{k}": v for k, v in state.items() if isinstance(v, torch.Tensor)})
    return tensors


def save_floor(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """The floor of a save: one ``safetensors`` file of ``tensors`` (copied to the CPU first if they are not there),
    fsynced, and its directory fsynced."""
    safetensors.torch.save_file({k: v.to("cpu") for k, v in tensors.items()}, path)
    fsync_path(str(path))
    fsync_path(str(path.parent))


def read_floor(path: str | os.PathLike[str], lazy: bool = False) -> dict[str, torch.Tensor]:
    """The floor of a read: ``safetensors.torch.load_file`` of the file, every byte read into memory (its
    ``pread`` backend). safetensors >= 0.8 maps the file by default and reads nothing until a tensor is used;
    ``lazy`` measures that mapped load instead (older versions have no ``backend`` and always read)."""
    if lazy or "backend" not in inspect.signature(safetensors.torch.load_file).parameters:
        return safetensors.torch.load_file(path)
    return safetensors.torch.load_file(path, backend="pread")


def set_page_cache(path: str | os.PathLike[str], cache: str) -> None:
    """Before a timed read of the files at ``path``: ``"warm"`` reads them once (untimed) so that they are all in the
    page cache; ``"cold"`` flushes and evicts them (``posix_fadvise(DONTNEED)``, no root needed)."""
    files = [Path(path)] if Path(path).is_file() else sorted(f for f in Path(path).rglob("*") if f.is_file())
    if cache == "cold":
        os.sync()
    for file in files:
        with open(file, "rb") as f:
            if cache == "warm":
                while f.read(64 << 20):
                    pass
            elif cache == "cold":
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                raise ValueError(f"cache must be 'warm' or 'cold', got {cache!r}")


def path_bytes(path: str | os.PathLike[str]) -> int:
    """Size of a file, or the total size of the files under a directory."""
    p = Path(path)
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def elapsed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall-clock seconds of one call, and its result."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median wall-clock seconds of ``repeats`` calls, and the last call's result."""
    runs = [elapsed(fn) for _ in range(repeats)]
    return statistics.median(t for t, _ in runs), runs[-1][1]


def release_memory() -> None:
    """Collect garbage and hand the heap memory freed so far back to the OS (glibc ``malloc_trim``): tensors under
    glibc's mmap threshold (32 MB at most) come from the heap, which otherwise keeps what earlier methods freed, so
    that the next method would find it without page faults and without its resident memory growing."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def round_robin(methods: dict[str, Method], repeats: int) -> dict[str, dict[str, Any]]:
    """Call every method once per round for ``repeats`` rounds; per method, the median of each timing it returns.

    Before each call, untimed, ``os.sync()`` flushes what earlier calls left unsynced (Lightning and the HF
    Trainer do not fsync), and :func:`release_memory` frees what they left behind, so no method pays for another's
    writeback or profits from its freed memory.
    """
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in methods}
    for i in range(repeats):
        for name, method in methods.items():
            release_memory()
            os.sync()
            for field, value in method(i).items():
                samples[name].setdefault(field, []).append(value)
    return {
        name: {**{field: statistics.median(values) for field, values in fields.items()}, "samples": fields}
        for name, fields in samples.items()
    }


def memory_bytes() -> tuple[int, int]:
    """This process's resident memory and the anonymous part of it (resident less file-backed and shared pages:
    ``/proc/self/statm``; psutil elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            fields = f.read().split()
        page = os.sysconf("SC_PAGE_SIZE")
        return int(fields[1]) * page, (int(fields[1]) - int(fields[2])) * page
    except OSError:
        import psutil

        info = psutil.Process().memory_info()
        return info.rss, info.rss - getattr(info, "shared", 0)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (``VmHWM``, Linux >= 4.0); whether it could."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _kernel_peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakRss:
    """``with PeakRss() as mem: ...``: the peak resident memory during the block above the level at its start:
    ``mem.extra`` (all resident pages, file-mapped ones too) and ``mem.extra_anon`` (anonymous pages only).

    A background thread samples every ``interval`` seconds (and at both ends); the total peak is also read from the
    kernel's peak-RSS mark, reset at the start, where Linux allows it, so a sample missed while another thread held
    the GIL cannot hide a peak. Call :func:`release_memory` before, so that freed heap memory does not hide growth.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.baseline = self.peak = self.baseline_anon = self.peak_anon = 0
        self._kernel = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._update()

    def _update(self) -> None:
        total, anon = memory_bytes()
        self.peak, self.peak_anon = max(self.peak, total), max(self.peak_anon, anon)

    def __enter__(self) -> PeakRss:
        self._kernel = _reset_peak_rss()
        self.baseline, self.baseline_anon = memory_bytes()
        self.peak, self.peak_anon = self.baseline, self.baseline_anon
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._update()
        if self._kernel:
            self.peak = max(self.peak, _kernel_peak_rss())

    @property
    def extra(self) -> int:
        return self.peak - self.baseline

    @property
    def extra_anon(self) -> int:
        return self.peak_anon - self.baseline_anon


def disk(path: str | os.PathLike[str]) -> str:
    """The filesystem and block device ``path`` is on, e.g. ``ext4 on /dev/vda (non-rotational), 31.2 GiB free``."""
    target, best = os.path.realpath(path), ("", "?", "?")
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount, fstype = line.split()[:3]
            if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best[0]):
                best = (mount, device, fstype)
    _, device, fstype = best
    kind = ""
    with contextlib.suppress(OSError):
        rotational = Path(f"/sys/class/block/{Path(device).name}/queue/rotational").read_text().strip()
        kind = " (rotational)" if rotational == "1" else " (non-rotational)"
    free = shutil.disk_usage(target).free / (1 << 30)
    return f"{fstype} on {device}{kind}, {free:.1f} GiB free"


def machine(workdir: str | os.PathLike[str]) -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, RAM, the disk under ``workdir``, load, library versions."""
    import lightning
    import peft
    import transformers

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": round(ram / (1 << 30), 1),
        "disk": disk(workdir),
        "load_average_1m_at_start": round(os.getloadavg()[0], 2),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


@contextlib.contextmanager
def moto_s3() -> Iterator[dict[str, Any]]:
    """A moto S3 server on loopback with bucket ``bench``; yields the s3fs ``storage_options`` that reach it."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        boto3.client(
            "s3", endpoint_url=endpoint, aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1"
        ).create_bucket(Bucket=BUCKET)
        yield {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    finally:
        server.stop()


class RequestCounter:
    """Counts the HTTP requests an s3fs client sends, by S3 operation (botocore's before-send event)."""

    def __init__(self, fs: Any) -> None:
        """Args: fs: an ``s3fs.S3FileSystem``."""
        self.by_operation: Counter[str] = Counter()
        fs.s3.meta.events.register("before-send.s3", self._count)

    def _count(self, event_name: str = "", **kwargs: Any) -> None:
        self.by_operation[event_name.rsplit(".", 1)[-1]] += 1

    @property
    def total(self) -> int:
        """Requests counted so far."""
        return sum(self.by_operation.values())

    def measure(self, fn: Any) -> tuple[float, Any, dict[str, Any]]:
        """Seconds, result, and requests (total and by operation) of one call."""
        before = self.by_operation.copy()
        seconds, result = elapsed(fn)
        delta = self.by_operation - before
        return seconds, result, {"requests": sum(delta.values()), "by_operation": dict(sorted(delta.items()))}
