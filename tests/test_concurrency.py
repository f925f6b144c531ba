"""Concurrency: two processes saving to the same run, and gc sweeping while saves are in flight.

Writers are forked children saving through the real ``LoRACheckpointIO`` (the checkpoint dicts of a
trained tiny ``LoRAModule``, version ``v`` shifting the adapter by ``v``); afterwards every listed
checkpoint must verify and load to exactly what one writer saved under that name (docs/crash-safety.md).
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from test_crash import FORK, Save, Source, build_source, check_checkpoint, save

from lightning_lora_ckpt import Checkpoint, CheckpointStore, CheckpointWriteError, LoRACheckpointIO
from lightning_lora_ckpt.format import layout as uris
from lightning_lora_ckpt.format.strict_json import CheckpointFormatError, utcnow

RUN = "shared"
DAMAGED = -1  # version reported for a checkpoint that fails verification (and loading)


@pytest.fixture(scope="module")
def source() -> Source:
    return build_source()


@pytest.fixture(params=["local", "s3"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    """A fresh root: a local folder, or a prefix of the moto S3 bucket."""
    if request.param == "local":
        return str(tmp_path / "root"), {}
    server = request.getfixturevalue("s3_server")
    return f"s3://{server['bucket']}/{uuid.uuid4().hex}", server["storage_options"]


def key(item: Save) -> str:
    return f"{uris.TYPE_DIRS[item.kind]}/{item.name}"


def _write(
    root: str, options: dict[str, Any], plan: list[tuple[Save, int]], source: Source, barrier: Any, fd: int
) -> None:
    """Child process: wait for the other writer, then save ``plan``; report each outcome on the pipe ``fd``."""
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
    store: CheckpointStore, io: LoRACheckpointIO, source: Source, may_be_damaged: Callable[[Checkpoint], bool]
) -> dict[str, int]:
    """id -> version of each listed checkpoint of the run, which verifies and loads to exactly what that
    version saved; one allowed to be damaged may instead fail verification, and then loading must refuse it."""
    listed = {}
    for checkpoint in store.list_checkpoints(RUN):
        if may_be_damaged(checkpoint) and not store.verify(checkpoint.path).ok:
            with pytest.raises(CheckpointFormatError, match="damaged"):
                io.load_checkpoint(checkpoint.path)
            listed[checkpoint.checkpoint_id] = DAMAGED
        else:
            listed[checkpoint.checkpoint_id] = check_checkpoint(store, io, checkpoint, source)
    return listed


def writer_plan(writer: int, rounds: int) -> list[tuple[Save, int]]:
    """The run's first save, then per round: a name of its own, an overwrite of a shared name, and a
    name both writers try to create without overwrite. Versions are unique per writer and save."""
    plan = [(Save(RUN, "training", f"first-{writer}"), 1000 * (writer + 1))]
    for k in range(rounds):
        version = 1000 * (writer + 1) + 10 * (k + 1)
        kind = "training" if k % 2 else "sampler"
        plan += [
            (Save(RUN, kind, f"own-{writer}-{k}"), version),
            (Save(RUN, kind, f"shared-{k % 2}", overwrite=True), version + 1),
            (Save(RUN, "sampler", f"race-{k}"), version + 2),
        ]
    return plan


def test_two_writers_same_run(where: tuple[str, dict[str, Any]], source: Source) -> None:
    root, options = where
    plans = [writer_plan(w, rounds=5) for w in range(2)]
    (reports,) = list(run_writers(root, options, plans, source))[1:]
    store = CheckpointStore(root, options)

    assert store.get_run(RUN).run_id == RUN  # run.json written by the racing first saves is valid
    saved: dict[str, set[int]] = {}
    for plan in plans:
        for item, version in plan:
            saved.setdefault(key(item), set()).add(version)
    io = LoRACheckpointIO(root=root, storage_options=options)
    local = not root.startswith("s3://")
    # Object stores write in place: same-name writers can mix objects, which checksums catch on load.
    listed = check_all(store, io, source, lambda c: not local and len(saved[c.checkpoint_id]) > 1)

    races = {key(item) for plan in plans for item, _ in plan if item.name.startswith("race-")}
    outcomes: dict[str, dict[str, int]] = {}
    for report in reports:
        for what, name, version, *message in report:
            outcomes.setdefault(name, {})[what] = int(version)
            if what != "done":
                assert what == "FileExistsError" and name in races, (what, name, message)
                assert "already exists" in message[0] or "another writer" in message[0], message
    assert set(listed) == set(saved), sorted(set(listed) ^ set(saved))
    for name, versions in saved.items():
        assert listed[name] in versions | {DAMAGED}, f"{name}: found version {listed[name]}, saved {versions}"
        if name in races:  # one winner, one clear refusal, the stored one is the winner's
            assert set(outcomes[name]) == {"done", "FileExistsError"}, (name, outcomes[name])
            assert listed[name] in (outcomes[name]["done"], DAMAGED)
        elif len(versions) == 1:
            assert outcomes[name] == {"done": listed[name]}


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


def gc_plan(rounds: int) -> list[tuple[Save, int]]:
    """New names of both kinds and overwrites of ``latest`` (deleted first on object stores)."""
    plan = []
    for k in range(rounds):
        plan += [
            (Save(RUN, "training", f"step-{k}"), 10 * (k + 1)),
            (Save(RUN, "sampler", "latest", overwrite=True), 10 * (k + 1) + 1),
        ]
    return plan


@pytest.mark.parametrize("incomplete_after", ["1d", 0])
def test_gc_during_saves(where: tuple[str, dict[str, Any]], incomplete_after: float | str, source: Source) -> None:
    root, options = where
    local = not root.startswith("s3://")
    store = CheckpointStore(root, options)
    io = LoRACheckpointIO(root=root, run_id=RUN, async_save=False, storage_options=options)
    for v in range(1, 4):  # checkpoints with a TTL of a minute: gc, told it is an hour later, deletes them
        io.save_checkpoint(
            source.checkpoint("sampler", v), f"old-{v}", {"ttl_seconds": 60, "user_metadata": {"version": v}}
        )
    plan = gc_plan(rounds=6)
    writers = run_writers(root, options, [plan], source)
    next(writers)
    with sweeping(store, utcnow() + timedelta(hours=1), incomplete_after) as counts:
        (report,) = next(writers)
    assert counts[0] >= 2 and counts[1] == 3, counts  # gc ran during the saves and deleted the expired ones

    done = {name: int(version) for what, name, version, *_ in report if what == "done"}
    if incomplete_after == "1d":
        assert all(what == "done" for what, *_ in report), report  # nothing fresh is swept: every save commits
    may_be_damaged = not local and incomplete_after == 0  # gc took files of a save in flight: the caveat
    listed = check_all(store, io, source, lambda checkpoint: may_be_damaged)
    for item, version in plan:
        name = key(item)
        if not item.overwrite and name in done:
            assert listed.get(name) in (version, DAMAGED), (
                f"{name} was committed as {version}, found {listed.get(name)}"
            )
    assert set(listed) <= {key(item) for item, _ in plan}, sorted(listed)  # the expired ones are gone
    overwrites = {key(item): v for item, v in plan if item.overwrite}
    for name in set(listed) & set(overwrites):
        assert listed[name] in {v for item, v in plan if key(item) == name} | {DAMAGED}
