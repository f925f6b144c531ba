"""The storage contract: what every backend of a checkpoint root must do, as one abstract suite.

Like fsspec's ``fsspec/tests/abstract``, the tests are methods of base classes that a test module
subclasses once per backend (``tests/test_storage_backends.py``: local, memory, S3 on a loopback moto
server). A subclass says how to get a fresh root (:meth:`StorageContract.root`) and the
``storage_options`` that reach it (:meth:`StorageContract.storage_options`), and what kind of commit the
backend has (:attr:`StorageContract.object_store`). ``StorageContract`` holds the tests that run in one
process; ``CrossProcessContract`` adds those where other processes (the CLI, forked writers, a writer
killed mid-save) share the root, which ``memory://`` (one store per process) cannot do.

The forked writers save the real checkpoint dicts of a trained tiny ``LoRAModule`` (the ``source``
fixture; version ``v`` shifts the adapter by ``v``); afterwards every listed checkpoint must verify and
load to exactly what one writer saved under that name (docs/crash-safety.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import random
import statistics
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest

from helpers.checkpoints import fake_checkpoint, populate
from helpers.cli import cli, cli_json
from helpers.saves import (
    DAMAGED,
    Outcome,
    Save,
    Source,
    check_all,
    check_listed,
    check_resume,
    fork_plan,
    key,
    run_writers,
    save,
    save_plan,
    sweeping,
    temp_entries,
)
from lightning_lora_ckpt import (
    CheckpointConflictError,
    CheckpointFormatError,
    CheckpointStore,
    LoRACheckpointIO,
    extract_archive,
)
from lightning_lora_ckpt.format import layout as uris
from lightning_lora_ckpt.format.layout import CheckpointType
from lightning_lora_ckpt.format.manifest import Manifest
from lightning_lora_ckpt.format.strict_json import utcnow
from lightning_lora_ckpt.storage.commit import open_protocol
from lightning_lora_ckpt.storage.fs import url_to_fs
from lightning_lora_ckpt.storage.read import read_manifest

RUN = "shared"  # the run the forked writers share


class StorageContract:
    """The contract every backend meets within one process. Subclasses name the backend and its roots."""

    name: ClassVar[str]
    """The backend's name in reports."""
    object_store: ClassVar[bool]
    """Files are written in place and the manifest last (no atomic rename): readers can meet a save in flight."""

    uri: str
    options: dict[str, Any]

    def root(self) -> str:
        """A fresh, empty checkpoint root for one test."""
        raise NotImplementedError

    def storage_options(self) -> dict[str, Any]:
        """The ``storage_options`` that reach the roots."""
        return {}

    @pytest.fixture(autouse=True)
    def _backend(self, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        """Binds the test's fixtures, then its root and options, to the test instance."""
        self.request, self.tmp_path = request, tmp_path
        self.uri, self.options = self.root(), self.storage_options()

    def test_listing_and_runs(self) -> None:
        uri, options = self.uri, self.options
        populate(uri, options)
        store = CheckpointStore(uri, options)
        assert [r.run_id for r in store.list_runs()] == ["r1", "r2"]
        run = store.get_run("r1")
        assert run.base_model == "tiny-qwen3" and run.lora_rank == 4
        assert (
            run.last_checkpoint.checkpoint_id == "weights/t2"
            and run.last_sampler_checkpoint.checkpoint_id == "sampler_weights/s1"
        )
        listed = store.list_checkpoints("r1")
        assert [c.checkpoint_id for c in listed] == ["weights/t1", "sampler_weights/s1", "weights/t2"]
        assert listed[2].user_metadata == {"note": "x"} and listed[2].path == f"{store.root}/r1/weights/t2"
        assert store.get("lora://r1/weights/t2") == listed[2]
        page = store.list_user_checkpoints(limit=2, offset=1)
        assert [c.checkpoint_id for c in page.checkpoints] == ["weights/t2", "sampler_weights/s1"]
        assert (page.cursor.offset, page.cursor.limit, page.cursor.total_count) == (1, 2, 4)
        assert store.last_checkpoint("r2") is None and store.last_checkpoint("r2", "sampler").step == 5
        with pytest.raises(KeyError, match=r"No run 'nope'"):
            store.get_run("nope")
        with pytest.raises(CheckpointFormatError, match=r"checkpoint\.json is missing"):
            store.get("lora://r1/weights/missing")

    def test_ttl_publish_delete_never_touch_the_weights(self) -> None:
        uri, options = self.uri, self.options
        populate(uri, options)
        store = CheckpointStore(uri, options)
        target = "lora://r1/weights/t1"
        fs, path = url_to_fs(store.resolve(target), options)
        weights_before = fs.cat_file(f"{path}/adapter_model.safetensors")
        updated = store.set_ttl(target, "2h")
        assert timedelta(hours=2) - timedelta(seconds=5) < updated.expires_at - utcnow() <= timedelta(hours=2)
        assert store.set_ttl(target, None).expires_at is None
        with pytest.raises(ValueError, match="must be positive"):
            store.set_ttl(target, 0)
        assert store.publish(target).public
        with pytest.raises(CheckpointConflictError, match="already public"):
            store.publish(target)
        assert not store.unpublish(target).public
        with pytest.raises(CheckpointConflictError, match="already private"):
            store.unpublish(target)
        assert store.verify(target).ok
        assert fs.cat_file(f"{path}/adapter_model.safetensors") == weights_before
        store.delete(target)
        assert [c.checkpoint_id for c in store.list_checkpoints("r1")] == ["sampler_weights/s1", "weights/t2"]
        with pytest.raises(CheckpointFormatError):
            store.delete(target)

    def test_gc_keeps_newest_training_public_and_unfinished(self) -> None:
        uri, options = self.uri, self.options
        io = populate(uri, options)
        store = CheckpointStore(uri, options)
        store.set_ttl("lora://r1/weights/t1", 1)
        store.set_ttl("lora://r2/sampler_weights/s5", 1)
        store.publish("lora://r2/sampler_weights/s5")
        fs, path = url_to_fs(f"{store.root}/r1/weights/unfinished", options)
        fs.makedirs(path, exist_ok=True)
        fs.pipe_file(f"{path}/adapter_model.safetensors", b"partial")  # a save in flight: no manifest yet
        later = utcnow() + timedelta(days=1)
        planned = store.gc(dry_run=True, now=later)
        assert sorted(c.checkpoint_id for c in planned) == ["sampler_weights/s1", "weights/t1"]
        assert len(store.list_checkpoints("r1")) == 3
        assert store.gc(now=later) == planned
        assert [c.checkpoint_id for c in store.list_checkpoints("r1")] == ["weights/t2"]  # expired, but newest
        assert fs.exists(f"{path}/adapter_model.safetensors")
        assert store.gc(now=later) == []
        assert io.load_checkpoint("t2")["global_step"] == 2

    def test_verify_download_and_archive(self) -> None:
        uri, options, tmp_path = self.uri, self.options, self.tmp_path
        populate(uri, options)
        store = CheckpointStore(uri, options)
        seen: list[tuple[str, int, int]] = []
        local = store.download("lora://r1/weights/t2", tmp_path / "dl", progress=lambda *a: seen.append(a))
        assert sorted(os.listdir(local)) == sorted(
            [
                "adapter_model.safetensors",
                "adapter_config.json",
                "training_state.safetensors",
                "training_state.json",
                "checkpoint.json",
            ]
        )
        assert CheckpointStore(str(tmp_path)).verify(local).ok
        assert any(done == total for _, done, total in seen)
        with pytest.raises(FileExistsError, match="not empty"):
            store.download("lora://r1/weights/t2", local)
        tar = store.archive("lora://r1/weights/t2", str(tmp_path / "t2.tar.gz"))
        extracted = extract_archive(tar, tmp_path / "x")
        assert CheckpointStore(str(tmp_path)).verify(extracted).ok
        fs, path = url_to_fs(store.resolve("lora://r1/weights/t2"), options)
        fs.pipe_file(f"{path}/training_state.json", b'{"tampered": true}')
        report = store.verify("lora://r1/weights/t2")
        assert not report.ok and "training_state.json has" in report.problems[0]
        with pytest.raises(CheckpointFormatError, match="damaged"):
            store.download("lora://r1/weights/t2", tmp_path / "dl2")
        assert not (tmp_path / "dl2").exists()

    def test_overwrite_swaps_in_the_new_checkpoint(self) -> None:
        io = LoRACheckpointIO(root=self.uri, run_id="run", async_save=False, storage_options=self.options)
        io.save_checkpoint(fake_checkpoint(1), "final")
        io.save_checkpoint(fake_checkpoint(2), "final", {"overwrite": True})
        assert read_manifest(io.resolve("final", "training"), self.options).step == 2
        fs, weights = url_to_fs(f"{self.uri}/run/weights", self.options)
        assert [posixpath.basename(p) for p in fs.ls(weights, detail=False)] == ["final"]  # no hidden leftovers
        with pytest.raises(FileExistsError):  # overwrite=False refuses to replace (without it a save replaces)
            io.save_checkpoint(fake_checkpoint(3), "final", {"overwrite": False})

    def test_manifest_compare_and_swap(self) -> None:
        """Manifest updates and deletions act only on the manifest version they were given: with a stale one
        (S3 ETag, GCS generation, local digest) they return False and change nothing."""
        io = LoRACheckpointIO(root=self.uri, run_id="run", async_save=False, storage_options=self.options)
        io.save_checkpoint(fake_checkpoint(1), "t1")
        uri = io.resolve("t1", "training")
        protocol, path = open_protocol(uri, self.options)
        raw, stale = protocol.read_manifest(uri, path) or pytest.fail("no manifest after the save")
        manifest = Manifest.from_json(raw, uri)
        assert protocol.replace_manifest(path, dataclasses.replace(manifest, user_metadata={"n": 1}), stale)
        current = protocol.read_manifest(uri, path)
        assert current is not None and current[1] != stale
        assert Manifest.from_json(current[0], uri).user_metadata == {"n": 1}

        assert not protocol.replace_manifest(path, dataclasses.replace(manifest, user_metadata={"n": 2}), stale)
        assert not protocol.delete(path, stale)
        assert not protocol.delete(path, None)  # None: only a folder without a manifest
        store = CheckpointStore(self.uri, self.options)
        assert protocol.read_manifest(uri, path) == current and store.verify(uri).ok

        assert protocol.delete(path, current[1])
        assert protocol.read_manifest(uri, path) is None
        store.reindex("run")  # the protocol alone leaves the run's listing index to its callers (storage/commit.py)
        assert store.list_checkpoints("run") == []
        assert protocol.delete(path, current[1])  # already gone
        assert not protocol.replace_manifest(path, manifest, current[1])
        fs, _ = url_to_fs(uri, self.options)
        fs.invalidate_cache()
        assert not fs.exists(f"{path}/adapter_model.safetensors")  # the other objects went with the manifest


class CrossProcessContract(StorageContract):
    """The contract where other processes share the root: the CLI, concurrent writers, killed writers."""

    crash_trials: ClassVar[int]
    """How many writers the crash test kills at random points of their saves."""

    def test_management_commands_end_to_end(self) -> None:
        io = LoRACheckpointIO(root=self.uri, run_id="run", async_save=False, storage_options=self.options)
        io.save_checkpoint(fake_checkpoint(1), "t1", {"ttl_seconds": 1})
        io.save_checkpoint(fake_checkpoint(2, training=False), "s2")
        io.save_checkpoint(fake_checkpoint(3), "t3")
        populated, tmp_path = ["--root", self.uri, "--storage-options", json.dumps(self.options)], self.tmp_path

        listed = cli_json("list", "run", *populated)["checkpoints"]
        assert [(c["checkpoint_id"], c["step"]) for c in listed] == [
            ("weights/t1", 1),
            ("sampler_weights/s2", 2),
            ("weights/t3", 3),
        ]
        page = cli_json("list", "--limit", "2", *populated)
        assert (
            page["cursor"] == {"offset": 0, "limit": 2, "total_count": 3}
            and page["checkpoints"][0]["checkpoint_id"] == "weights/t3"
        )
        info = cli_json("info", "lora://run/weights/t3", *populated)
        assert info["step"] == 3 and set(info["files"]) == {
            "adapter_model.safetensors",
            "adapter_config.json",
            "training_state.safetensors",
            "training_state.json",
        }
        assert cli_json("set-ttl", "lora://run/sampler_weights/s2", "--ttl", "2h", *populated)["expires_at"]
        assert cli_json("set-ttl", "lora://run/sampler_weights/s2", "--remove", *populated)["expires_at"] is None
        assert cli_json("publish", "lora://run/sampler_weights/s2", *populated)["public"] is True
        conflict = cli("publish", "lora://run/sampler_weights/s2", *populated)
        assert conflict.returncode == 1 and "already public" in conflict.stderr
        assert cli_json("unpublish", "lora://run/sampler_weights/s2", *populated)["public"] is False
        assert cli_json("verify", "lora://run/weights/t3", *populated)["ok"] is True
        downloaded = cli_json("download", "lora://run/weights/t3", str(tmp_path / "dl"), *populated)["path"]
        assert (Path(downloaded) / "training_state.safetensors").exists()
        table = cli("download", "lora://run/sampler_weights/s2", str(tmp_path / "dl2"), *populated)
        assert table.returncode == 0 and "adapter_model.safetensors" in table.stdout  # the progress bar's rows
        cli_json("archive", "lora://run/weights/t3", str(tmp_path / "t3.tar.gz"), *populated)
        extracted = cli_json("extract", str(tmp_path / "t3.tar.gz"), str(tmp_path / "x"), *populated)["path"]
        assert cli_json("verify", extracted)["ok"] is True
        gc = cli_json("gc", "--dry-run", *populated)
        assert [c["checkpoint_id"] for c in gc["deleted"]] == ["weights/t1"]
        refused = cli("delete", "lora://run/weights/t1", *populated, stdin="n\n")
        assert refused.returncode == 1 and "aborted" in refused.stderr
        assert [c["checkpoint_id"] for c in cli_json("gc", "-y", *populated)["deleted"]] == ["weights/t1"]
        cli_json("delete", "-y", "lora://run/sampler_weights/s2", *populated)
        assert [c["checkpoint_id"] for c in cli_json("list", "run", *populated)["checkpoints"]] == ["weights/t3"]

    @pytest.mark.stress
    def test_two_writers_same_run(self, source: Source) -> None:
        root, options = self.uri, self.options
        plans = [writer_plan(w, rounds=5) for w in range(2)]
        (reports,) = list(run_writers(root, options, plans, source))[1:]
        store = CheckpointStore(root, options)

        assert store.get_run(RUN).run_id == RUN  # run.json written by the racing first saves is valid
        saved: dict[str, set[int]] = {}
        for plan in plans:
            for item, version in plan:
                saved.setdefault(key(item), set()).add(version)
        io = LoRACheckpointIO(root=root, storage_options=options)
        listed = check_all(store, io, source, lambda c: False, RUN)  # never a mix of two writers' objects

        races = {key(item) for plan in plans for item, _ in plan if item.name.startswith("race-")}
        # Object stores write in place: a writer whose objects another writer of the name replaced commits nothing.
        shared = {key(item) for plan in plans for item, _ in plan if item.overwrite} if self.object_store else set()
        outcomes: dict[str, dict[str, int]] = {}
        for report in reports:
            for what, name, version, *message in report:
                outcomes.setdefault(name, {})[what] = int(version)
                if what != "done":
                    refusal = what == "FileExistsError" or (what == "CheckpointWriteError" and name in shared)
                    assert refusal and name in races | shared, (what, name, message)
                    assert "already exists" in message[0] or "another writer" in message[0], message
        # A shared name on an object store is absent if both of its last writers were refused (after one deleted it).
        assert set(saved) - shared <= set(listed) <= set(saved), sorted(set(listed) ^ set(saved))
        for name, versions in saved.items():
            if name not in listed:
                continue
            assert listed[name] in versions, f"{name}: found version {listed[name]}, saved {versions}"
            if name in races:  # one winner, one clear refusal, the stored one is the winner's
                assert set(outcomes[name]) == {"done", "FileExistsError"}, (name, outcomes[name])
                assert listed[name] == outcomes[name]["done"]
            elif len(versions) == 1:
                assert outcomes[name] == {"done": listed[name]}

    @pytest.mark.parametrize("incomplete_after", ["1d", 0])
    @pytest.mark.stress
    def test_gc_during_saves(self, incomplete_after: float | str, source: Source) -> None:
        root, options = self.uri, self.options
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
        may_be_damaged = self.object_store and incomplete_after == 0  # gc took files of a save in flight: the caveat
        listed = check_all(store, io, source, lambda checkpoint: may_be_damaged, RUN)
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

    @pytest.mark.stress
    def test_sigkill_at_random_points_of_saves(self, source: Source) -> None:
        """A process SIGKILLed at any point of real saves never loses or half-exposes a checkpoint.

        Each trial forks a child (instantly: everything is already imported) that runs a plan of saves through
        ``LoRACheckpointIO.save_checkpoint`` -- a new run (``run.json``), training and sampler checkpoints
        under new names, and overwrites of an existing name -- and kills it after a seeded random delay. The
        delays are stratified over 1.3x the measured duration of the whole plan (from when the child is
        connected), so kills land before the first save, in every save and after the last commit. After each
        kill the store is checked against what the child reported and against docs/crash-safety.md.
        """
        root, options, trials, local = self.uri, self.options, self.crash_trials, not self.object_store
        store = CheckpointStore(root, options)
        previous: dict[CheckpointType, int | None] = {"training": 0, "sampler": 0}  # version at main/*/latest
        for kind in previous:
            save(root, options, Save("main", kind, "latest"), source.checkpoint(kind, 0), 0)

        def trial(i: int, kill_after: float | None) -> tuple[Outcome, int]:
            plan, version = crash_plan(i), i + 1
            checkpoints = [source.checkpoint(item.kind, version) for item in plan]
            outcome = fork_plan(save_plan, (root, options, plan, checkpoints, version), kill_after)
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
                checkpoint_id = f"{uris.TYPE_DIRS[item.kind]}/{item.name}"
                got = listed.get(f"main/{checkpoint_id}" if item.run_id == "main" else checkpoint_id)
                if k in outcome.done or outcome.exitcode == 0:
                    assert got == version, f"{item} was committed, the store has version {got}"
                elif k not in outcome.started:
                    assert got == (previous[item.kind] if item.overwrite else None), (
                        f"{item} never started, found {got}"
                    )
                elif item.overwrite:
                    # Local replacement swaps atomically; object stores delete the old one first (docs/crash-safety.md).
                    allowed = {previous[item.kind], version} | ({None} if self.object_store else set())
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
        if local:
            assert sorted(temp_entries(root)) == sorted(leftovers)
        assert store.gc() == [] and store.incomplete() == leftovers  # fresh leftovers may be saves in flight: kept
        assert store.incomplete(older_than=3600) == []
        store.gc(incomplete_after=0)
        assert store.incomplete() == []
        if local:
            assert temp_entries(root) == []
        runs = store.list_runs()
        assert {r.run_id for r in runs} >= {"main"}
        for run in runs:
            check_listed(store, run.run_id, source)

        print(
            f"\n{self.name}: {trials} kills, plan of {len(crash_plan(0))} saves, {duration * 1000:.0f} ms uninterrupted"
        )
        print(f"  phase at the kill: {dict(sorted(phases.items()))}")
        print(f"  new commits per trial: {dict(sorted(commits.items()))}; leftovers swept by gc: {len(leftovers)}")
        assert sum(phases.values()) == trials
        assert commits[0] >= 1 and commits[len(crash_plan(0))] >= 1, commits  # kills before and after the saves
        assert sum(n for c, n in commits.items() if 0 < c < len(crash_plan(0))) >= 1, commits
        assert sum(n for p, n in phases.items() if p.startswith("in save")) >= trials // 3, phases
        if local:  # on S3 most of a save is requests before and after the uploads: kills rarely hit them
            assert leftovers, "no kill left an interrupted save behind: the kill points missed the writes"


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


def gc_plan(rounds: int) -> list[tuple[Save, int]]:
    """New names of both kinds and overwrites of ``latest`` (deleted first on object stores)."""
    plan = []
    for k in range(rounds):
        plan += [
            (Save(RUN, "training", f"step-{k}"), 10 * (k + 1)),
            (Save(RUN, "sampler", "latest", overwrite=True), 10 * (k + 1) + 1),
        ]
    return plan


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


def kill_delays(trials: int, duration: float, seed: int) -> list[float]:
    """Stratified random delays covering [0, 1.3 * duration): one in each of ``trials`` equal slots, shuffled."""
    rng = random.Random(seed)
    slots = list(range(trials))
    rng.shuffle(slots)
    return [(slot + rng.random()) / trials * 1.3 * duration for slot in slots]
