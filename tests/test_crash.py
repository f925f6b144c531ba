"""Crash consistency: a process SIGKILLed at any point of real saves never loses or half-exposes a checkpoint.

The real Lightning checkpoint dicts of a trained tiny ``LoRAModule`` are built once. Each trial forks a
child (instantly: everything is already imported) that runs a plan of saves through
``LoRACheckpointIO.save_checkpoint`` -- a new run (``run.json``), training and sampler checkpoints under
new names, and overwrites of an existing name -- and kills it after a seeded random delay. The delays are
stratified over 1.3x the measured duration of the whole plan (from when the child is connected), so kills land before the first save, in
every save and after the last commit. After each kill the store is checked against what the child
reported and against docs/crash-safety.md.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import random
import signal
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import MODULE_KWARGS, assert_same_state, batch_loader, make_trainer

from lightning_lora_ckpt import Checkpoint, CheckpointStore, LoRACheckpointIO, LoRAModule
from lightning_lora_ckpt.format import layout as uris
from lightning_lora_ckpt.format.layout import CheckpointType
from lightning_lora_ckpt.storage.local import TEMP_ENTRY

FORK = multiprocessing.get_context("fork")


@dataclasses.dataclass(frozen=True)
class Source:
    """The checkpoint dicts Lightning hands to the CheckpointIO plugin; version ``v`` shifts the adapter by ``v``."""

    training: dict[str, Any]
    sampler: dict[str, Any]

    def checkpoint(self, kind: CheckpointType, version: int) -> dict[str, Any]:
        base = self.training if kind == "training" else self.sampler
        return {**base, "state_dict": self.adapter(version), "global_step": base["global_step"] + version}

    def adapter(self, version: int) -> dict[str, torch.Tensor]:
        return {k: v + version for k, v in self.training["state_dict"].items()}


def build_source() -> Source:
    """The checkpoint dicts of a tiny ``LoRAModule`` trained for two steps."""
    module = LoRAModule(**MODULE_KWARGS)
    trainer = make_trainer(max_steps=2)
    trainer.fit(module, batch_loader(2))
    connector = trainer._checkpoint_connector
    return Source(connector.dump_checkpoint(weights_only=False), connector.dump_checkpoint(weights_only=True))


@pytest.fixture(scope="module")
def source() -> Source:
    return build_source()


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


def crash_plan(trial: int) -> list[Save]:
    """A new run (its first save writes run.json), new names of both kinds, and overwrites in a shared run."""
    run = f"t{trial:03d}"
    return [
        Save(run, "training", "a"),
        Save(run, "sampler", "a"),
        Save("main", "training", "latest", overwrite=True),
        Save(run, "training", "b"),
        Save("main", "sampler", "latest", overwrite=True),
    ]


def save(root: str, options: dict[str, Any], item: Save, checkpoint: dict[str, Any], version: int) -> None:
    """Save ``checkpoint`` through the real plugin path, tagged with its version."""
    io = LoRACheckpointIO(root=root, run_id=item.run_id, async_save=False, storage_options=options)
    io.save_checkpoint(checkpoint, item.name, {"overwrite": item.overwrite, "user_metadata": {"version": version}})


def _run_plan(
    root: str, options: dict[str, Any], plan: list[Save], checkpoints: list[dict[str, Any]], version: int, fd: int
) -> None:
    """Child process: the saves of ``plan``, reporting each start and commit on the pipe ``fd``.

    It first connects to the storage (a listing) and reports ``ready``: kill delays count from there, so
    they spread over the saves rather than the set-up of a new S3 session after the fork. ``end`` reports
    the seconds from ready to the last commit (the process's exit, which can take long, is left out).
    """
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


def kill_delays(trials: int, duration: float, seed: int) -> list[float]:
    """Stratified random delays covering [0, 1.3 * duration): one in each of ``trials`` equal slots, shuffled."""
    rng = random.Random(seed)
    slots = list(range(trials))
    rng.shuffle(slots)
    return [(slot + rng.random()) / trials * 1.3 * duration for slot in slots]


@pytest.mark.parametrize(("where", "trials"), [("local", 50), ("s3", 20)])
def test_sigkill_at_random_points_of_saves(
    where: str, trials: int, source: Source, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if where == "local":
        root, options = str(tmp_path / "root"), {}
    else:
        server = request.getfixturevalue("s3_server")
        root, options = f"s3://{server['bucket']}/{uuid.uuid4().hex}", server["storage_options"]
    store = CheckpointStore(root, options)
    previous: dict[CheckpointType, int | None] = {"training": 0, "sampler": 0}  # version at main/*/latest
    for kind in previous:
        save(root, options, Save("main", kind, "latest"), source.checkpoint(kind, 0), 0)

    def trial(i: int, kill_after: float | None) -> tuple[Outcome, int]:
        plan, version = crash_plan(i), i + 1
        checkpoints = [source.checkpoint(item.kind, version) for item in plan]
        outcome = fork_plan(_run_plan, (root, options, plan, checkpoints, version), kill_after)
        run_id = plan[0].run_id
        listed = {
            **check_listed(store, run_id, source),
            **{f"main/{k}": v for k, v in check_listed(store, "main", source).items()},
        }
        if any(not k.startswith("main/") for k in listed):
            assert store.get_run(run_id).run_id == run_id  # run.json is complete once anything is committed
        check_resume(store, run_id, source)
        check_resume(store, "main", source)
        committed = 0
        for k, item in enumerate(plan):
            key = f"{uris.TYPE_DIRS[item.kind]}/{item.name}"
            got = listed.get(f"main/{key}" if item.run_id == "main" else key)
            if k in outcome.done or outcome.exitcode == 0:
                assert got == version, f"{item} was committed, the store has version {got}"
            elif k not in outcome.started:
                assert got == (previous[item.kind] if item.overwrite else None), f"{item} never started, found {got}"
            elif item.overwrite:
                # Local replacement swaps atomically; object stores delete the old one first (docs/crash-safety.md).
                allowed = {previous[item.kind], version} | ({None} if where == "s3" else set())
                assert got in allowed, f"{item} killed mid-save: found version {got}, allowed {allowed}"
            else:
                assert got in (None, version)
            committed += got == version
            if item.overwrite:
                previous[item.kind] = got
        return outcome, committed

    # The median of 5: one uninterrupted plan in a few takes ~10x longer (an fsync waiting for a journal commit).
    duration = statistics.median(trial(i, None)[0].seconds for i in range(5))
    phases: Counter[str] = Counter()
    commits: Counter[int] = Counter()
    for i, delay in enumerate(kill_delays(trials, duration, seed=1234), start=5):
        outcome, committed = trial(i, delay)
        phases[outcome.phase] += 1
        commits[committed] += 1

    leftovers = store.incomplete()
    if where == "local":
        assert sorted(temp_entries(root)) == sorted(leftovers)
    assert store.gc() == [] and store.incomplete() == leftovers  # fresh leftovers may be saves in flight: kept
    assert store.incomplete(older_than=3600) == []
    store.gc(incomplete_after=0)
    assert store.incomplete() == []
    if where == "local":
        assert temp_entries(root) == []
    runs = store.list_runs()
    assert {r.run_id for r in runs} >= {"main"}
    for run in runs:
        check_listed(store, run.run_id, source)

    print(f"\n{where}: {trials} kills, plan of {len(crash_plan(0))} saves, {duration * 1000:.0f} ms uninterrupted")
    print(f"  phase at the kill: {dict(sorted(phases.items()))}")
    print(f"  new commits per trial: {dict(sorted(commits.items()))}; leftovers swept by gc: {len(leftovers)}")
    assert sum(phases.values()) == trials
    assert commits[0] >= 1 and commits[len(crash_plan(0))] >= 1, commits  # kills before and after the saves
    assert sum(n for c, n in commits.items() if 0 < c < len(crash_plan(0))) >= 1, commits
    assert sum(n for p, n in phases.items() if p.startswith("in save")) >= trials // 3, phases
    if where == "local":  # on S3 most of a save is requests before and after the uploads: kills rarely hit them
        assert leftovers, "no kill left an interrupted save behind: the kill points missed the writes"
