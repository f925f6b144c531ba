"""Real saves from forked processes, and the checks of what a store holds afterwards.

The checkpoint dicts are those Lightning hands the plugin for a trained tiny ``LoRAModule`` (built once,
then shared by the forked children); version ``v`` of a save shifts the adapter by ``v`` and is recorded
in its user metadata, so every listed checkpoint can be checked against exactly what one save wrote.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import pytest
import torch

from helpers.compare import assert_same_state
from helpers.training import MODULE_KWARGS, batch_loader, make_trainer
from lightning_lora_ckpt import Checkpoint, CheckpointStore, CheckpointWriteError, LoRACheckpointIO, LoRAModule
from lightning_lora_ckpt.format import layout as uris
from lightning_lora_ckpt.format.layout import CheckpointType
from lightning_lora_ckpt.format.strict_json import CheckpointFormatError
from lightning_lora_ckpt.storage.local import TEMP_ENTRY

FORK = multiprocessing.get_context("fork")
DAMAGED = -1  # version reported for a checkpoint that fails verification (and loading)


@dataclasses.dataclass(frozen=True)
class Source:
    """The checkpoint dicts Lightning hands to the CheckpointIO plugin; version ``v`` shifts the adapter by ``v``."""

    training: dict[str, Any]
    sampler: dict[str, Any]

    def checkpoint(self, kind: CheckpointType, version: int) -> dict[str, Any]:
        """The checkpoint dict of ``kind`` at version ``version``."""
        base = self.training if kind == "training" else self.sampler
        return {**base, "state_dict": self.adapter(version), "global_step": base["global_step"] + version}

    def adapter(self, version: int) -> dict[str, torch.Tensor]:
        """The adapter tensors of version ``version``."""
        return {k: v + version for k, v in self.training["state_dict"].items()}


def build_source(root: str) -> Source:
    """The checkpoint dicts of a tiny ``LoRAModule`` trained for two steps, as the plugin saves them: with the
    adapter its binding picks out (a plugin under ``root``, which saves nothing, holds the binding)."""
    module = LoRAModule(**MODULE_KWARGS)
    io = LoRACheckpointIO(root=root, run_id="source", async_save=False)
    trainer = make_trainer(io, max_steps=2)
    trainer.fit(module, batch_loader(2))
    connector = trainer._checkpoint_connector
    training, sampler = connector.dump_checkpoint(weights_only=False), connector.dump_checkpoint(weights_only=True)
    binding = getattr(io, "adapter_binding", None)
    if binding is not None and "lora_ckpt" not in training:  # the plugin adds the adapter entry when it saves
        binding.to_checkpoint(training, "training")
        binding.to_checkpoint(sampler, "sampler")
    return Source(training, sampler)


@dataclasses.dataclass(frozen=True)
class Save:
    """One save of a plan: where it goes, and whether it replaces a committed checkpoint."""

    run_id: str
    kind: CheckpointType
    name: str
    overwrite: bool = False

    def uri(self, root: str) -> str:
        return uris.checkpoint_uri(root, self.run_id, self.kind, self.name)

    def __str__(self) -> str:
        return f"{self.run_id}/{uris.TYPE_DIRS[self.kind]}/{self.name}{' (overwrite)' if self.overwrite else ''}"


def forked_child() -> None:
    """First thing in a forked child: no OpenMP threads. The parent's GNU OpenMP pool does not survive a fork,
    and the child's first parallel torch op would wait on its barrier for ever."""
    torch.set_num_threads(1)


def save(root: str, options: dict[str, Any], item: Save, checkpoint: dict[str, Any], version: int) -> None:
    """Save ``checkpoint`` through the real plugin path, tagged with its version."""
    io = LoRACheckpointIO(root=root, run_id=item.run_id, async_save=False, storage_options=options)
    io.save_checkpoint(checkpoint, item.name, {"overwrite": item.overwrite, "user_metadata": {"version": version}})


def save_plan(
    root: str, options: dict[str, Any], plan: list[Save], checkpoints: list[dict[str, Any]], version: int, fd: int
) -> None:
    """Child process: the saves of ``plan``, reporting each start and commit on the pipe ``fd``.

    It first connects to the storage (a listing) and reports ``ready``: kill delays count from there, so
    they spread over the saves rather than the set-up of a new S3 session after the fork. ``end`` reports
    the seconds from ready to the last commit (the process's exit, which can take long, is left out).
    """
    forked_child()
    try:
        CheckpointStore(root, options).list_runs()
        os.write(fd, b"ready\n")
        ready = time.perf_counter()
        for k, (item, checkpoint) in enumerate(zip(plan, checkpoints, strict=True)):
            os.write(fd, f"start {k}\n".encode())
            save(root, options, item, checkpoint, version)
            os.write(fd, f"done {k}\n".encode())
        os.write(fd, f"end {time.perf_counter() - ready}\n".encode())
    except BaseException as err:
        os.write(fd, f"error {type(err).__name__}: {err}\n".encode())
        raise


@dataclasses.dataclass
class Outcome:
    """What the parent learned from one forked child."""

    exitcode: int
    started: set[int]
    done: set[int]
    seconds: float  # from ready to the last commit, or to the kill

    @property
    def phase(self) -> str:
        if self.exitcode == 0:
            return "after the last commit"
        if not self.started:
            return "before the first save"
        k = max(self.started)
        return f"in save {k}" if k not in self.done else f"after save {k}"


def fork_plan(target: Callable[..., None], args: tuple[Any, ...], kill_after: float | None) -> Outcome:
    """Run ``target(*args, fd)`` in a forked child; SIGKILL it ``kill_after`` seconds after it reports ready."""
    read, write = os.pipe()
    child = FORK.Process(target=target, args=(*args, write), daemon=True)
    child.start()
    os.close(write)
    with os.fdopen(read) as pipe:
        ready = pipe.readline()
        start = time.perf_counter()
        if kill_after is not None and ready:
            time.sleep(kill_after)
            child.kill()
        child.join(timeout=120)
        seconds = time.perf_counter() - start
        events = [line.split(" ", 1) for line in pipe.read().splitlines()]
    errors = [text for what, text in events if what == "error"]
    assert ready == "ready\n" and child.exitcode in (0, -signal.SIGKILL) and not errors, (
        f"child failed: {child.exitcode} {ready} {errors}"
    )
    started = {int(k) for what, k in events if what == "start"}
    done = {int(k) for what, k in events if what == "done"}
    seconds = next((float(s) for what, s in events if what == "end"), seconds)
    return Outcome(child.exitcode, started, done, seconds)


def check_listed(store: CheckpointStore, run_id: str, source: Source) -> dict[str, int]:
    """Every checkpoint listed in the run verifies and holds exactly what its version saved: id -> version."""
    io = LoRACheckpointIO(root=store.root, storage_options=store.storage_options)
    return {c.checkpoint_id: check_checkpoint(store, io, c, source) for c in store.list_checkpoints(run_id)}


def check_checkpoint(store: CheckpointStore, io: LoRACheckpointIO, checkpoint: Checkpoint, source: Source) -> int:
    """The checkpoint verifies and loads to exactly what its version saved; returns the version."""
    report = store.verify(checkpoint.path)
    assert report.ok, report.problems
    version = checkpoint.user_metadata["version"]
    loaded = io.load_checkpoint(checkpoint.path)
    assert_same_state(loaded["state_dict"], source.adapter(version), checkpoint.checkpoint_id)
    assert loaded["global_step"] == source.training["global_step"] + version
    if checkpoint.checkpoint_type == "training":
        optimizer_states = loaded["optimizer_states"]  # decoded tuples may come back as lists
        assert_same_state(optimizer_states, source.training["optimizer_states"], "optimizer_states", strict_types=False)
    return version


def check_resume(store: CheckpointStore, run_id: str, source: Source) -> None:
    """The newest committed training checkpoint of the run rebuilds the module with the adapter it saved."""
    last = store.last_checkpoint(run_id)
    if last is None:
        return
    module = LoRAModule.from_checkpoint(last.path, with_optimizer=True, storage_options=store.storage_options)
    assert_same_state(module.adapter_state_dict(), source.adapter(last.user_metadata["version"]), last.path)
    assert module._restore_optimizer_from["global_step"] == last.step


def temp_entries(root: str) -> list[str]:
    """Hidden temporary entries anywhere under a local root."""
    return [os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files if TEMP_ENTRY.fullmatch(n)]


def key(item: Save) -> str:
    """The checkpoint id ``item`` saves to within its run, e.g. ``weights/latest``."""
    return f"{uris.TYPE_DIRS[item.kind]}/{item.name}"


def _write(
    root: str, options: dict[str, Any], plan: list[tuple[Save, int]], source: Source, barrier: Any, fd: int
) -> None:
    """Child process: wait for the other writer, then save ``plan``; report each outcome on the pipe ``fd``."""
    forked_child()
    barrier.wait()
    for item, version in plan:
        try:
            save(root, options, item, source.checkpoint(item.kind, version), version)
            os.write(fd, f"done {key(item)} {version}\n".encode())
        except (FileExistsError, CheckpointWriteError) as err:
            message = str(err).replace("\n", " ")
            os.write(fd, f"{type(err).__name__} {key(item)} {version} {message}\n".encode())
    os.close(fd)


def run_writers(
    root: str, options: dict[str, Any], plans: list[list[tuple[Save, int]]], source: Source
) -> Iterator[list[list[str]]]:
    """Start one forked writer per plan at the same moment; yield while they run, then their report lines."""
    barrier = FORK.Barrier(len(plans))
    children, pipes = [], []
    for plan in plans:
        read, write = os.pipe()
        child = FORK.Process(target=_write, args=(root, options, plan, source, barrier, write), daemon=True)
        child.start()
        os.close(write)
        children.append(child)
        pipes.append(read)
    yield []
    reports = []
    for child, read in zip(children, pipes, strict=True):
        with os.fdopen(read) as pipe:
            reports.append([line.split(" ", 3) for line in pipe.read().splitlines()])
        child.join(timeout=120)
        assert child.exitcode == 0, f"writer exited with {child.exitcode}"
    yield reports


def check_all(
    store: CheckpointStore,
    io: LoRACheckpointIO,
    source: Source,
    may_be_damaged: Callable[[Checkpoint], bool],
    run_id: str,
) -> dict[str, int]:
    """id -> version of each listed checkpoint of the run, which verifies and loads to exactly what that
    version saved; one allowed to be damaged may instead fail verification (version ``DAMAGED``), and then
    loading must refuse it."""
    listed = {}
    for checkpoint in store.list_checkpoints(run_id):
        if may_be_damaged(checkpoint) and not store.verify(checkpoint.path).ok:
            with pytest.raises(CheckpointFormatError, match="damaged"):
                io.load_checkpoint(checkpoint.path)
            listed[checkpoint.checkpoint_id] = DAMAGED
        else:
            listed[checkpoint.checkpoint_id] = check_checkpoint(store, io, checkpoint, source)
    return listed


@contextlib.contextmanager
def sweeping(store: CheckpointStore, now: datetime, incomplete_after: float | str) -> Iterator[list[int]]:
    """Run ``store.gc`` over and over in a thread inside the block; yields [gc runs, checkpoints deleted]."""
    stop, counts = threading.Event(), [0, 0]

    def loop() -> None:
        while not stop.is_set():
            counts[1] += len(store.gc(now=now, incomplete_after=incomplete_after))
            counts[0] += 1

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield counts
    finally:
        stop.set()
        thread.join()
