"""A writer process that keeps overwriting one checkpoint with two alternating versions, and the check that what a
reader opened is exactly one of them (tests/test_reader_consistency.py).

Version ``v`` is :func:`helpers.checkpoints.fake_checkpoint` at step ``v`` with larger tensors (so that reading
a file takes a while, as with a real adapter): its adapter tensors are filled with ``v`` and its optimizer moment
with ``2 * v``, so the two versions have the same file sizes and differ in every tensor file's bytes.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from helpers.checkpoints import fake_checkpoint
from lightning_lora_ckpt import LoRACheckpointIO
from lightning_lora_ckpt.storage.loading import OpenedCheckpoint

SPAWN = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch thread pool inherited from the parent
VERSIONS = (1, 2)  # A and B
SHAPE = (4, 8192)  # rank 4 as the adapter config says; 128 KiB a tensor


def version_checkpoint(version: int) -> dict[str, Any]:
    """The checkpoint dict of version ``version``."""
    checkpoint = fake_checkpoint(version)
    weight = torch.full(SHAPE, float(version))
    checkpoint["state_dict"] = {
        "base_model.model.layer.lora_A.weight": weight,
        "base_model.model.layer.lora_B.weight": weight.T.contiguous(),
    }
    checkpoint["optimizer_states"][0]["state"][0]["exp_avg"] = weight * 2
    return checkpoint


def save_version(root: str, options: dict[str, Any], run_id: str, name: str, version: int) -> str:
    """Save version ``version`` as the training checkpoint ``name`` of ``run_id``, replacing what is there.

    Returns:
        The checkpoint's URI.
    """
    io = LoRACheckpointIO(root=root, run_id=run_id, async_save=False, storage_options=options)
    io.save_checkpoint(version_checkpoint(version), name, {"overwrite": True})
    return io.resolve(name, "training")


def overwrite_loop(
    root: str,
    options: dict[str, Any],
    run_id: str,
    name: str,
    stop: Any,
    commits: Any,
    max_seconds: float,
    pause_s: float,
) -> None:
    """Child process: overwrite the checkpoint with B, A, B, ... until ``stop`` is set (or ``max_seconds``),
    counting the commits in ``commits`` and pausing up to ``pause_s`` (uniformly drawn) after each."""
    torch.set_num_threads(1)
    io = LoRACheckpointIO(root=root, run_id=run_id, async_save=False, storage_options=options)
    checkpoints = [version_checkpoint(v) for v in VERSIONS]
    deadline = time.monotonic() + max_seconds
    k = 1
    while not stop.is_set() and time.monotonic() < deadline:
        io.save_checkpoint(checkpoints[k % 2], name, {"overwrite": True})
        k += 1
        with commits.get_lock():
            commits.value += 1
        time.sleep(random.uniform(0, pause_s))


@dataclasses.dataclass
class Writer:
    """The running writer: ``commits`` counts its overwrites so far."""

    process: Any
    stop: Any
    commits: Any

    @property
    def count(self) -> int:
        return int(self.commits.value)


@contextmanager
def overwriting(
    root: str, options: dict[str, Any], run_id: str, name: str, max_seconds: float, pause_s: float = 0.0
) -> Iterator[Writer]:
    """A writer process overwriting the checkpoint while the body runs (see :func:`overwrite_loop`); yields once
    it has committed twice."""
    stop, commits = SPAWN.Event(), SPAWN.Value("i", 0)
    process = SPAWN.Process(
        target=overwrite_loop, args=(root, options, run_id, name, stop, commits, max_seconds, pause_s), daemon=True
    )
    process.start()
    writer = Writer(process, stop, commits)
    try:
        started = time.monotonic()
        while writer.count < 2:
            assert process.is_alive() or writer.count >= 2, f"the writer died (exit code {process.exitcode})"
            assert time.monotonic() - started < 60, "the writer did not start"
            time.sleep(0.02)
        yield writer
    finally:
        stop.set()
        process.join(timeout=60)
        if process.is_alive():
            process.kill()
    assert process.exitcode == 0, f"the writer failed (exit code {process.exitcode})"


def version_of(opened: OpenedCheckpoint) -> int:
    """Which version the opened checkpoint is, checking that every tensor read is exactly that version's.

    Raises:
        AssertionError: it is neither version, or a mix of both.
    """
    step = opened.manifest.step
    assert step in VERSIONS, f"unexpected step {step}"
    expected = version_checkpoint(step)
    adapter = opened.adapter
    assert adapter.keys() == expected["state_dict"].keys(), sorted(adapter)
    for key, tensor in expected["state_dict"].items():
        assert torch.equal(adapter[key], tensor), f"{key} is not version {step}'s"
    moments = opened.payload.state_tensors
    if moments:
        exp_avg = expected["optimizer_states"][0]["state"][0]["exp_avg"]
        assert all(torch.equal(t, exp_avg) for t in moments.values()), f"optimizer state is not version {step}'s"
    return step
