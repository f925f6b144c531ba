"""Helpers shared by the benchmark scripts: quiet set-up, batches, trainers, timing, a loopback S3 server."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import shutil
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

BUCKET = "bench"


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
