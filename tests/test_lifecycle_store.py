"""Pins, soft delete, restore, prune and the grace period of gc (CheckpointStore and the command line).

On a local folder, on ``memory://`` and on S3 (the loopback moto server) wherever storage matters; the
decisions themselves (which checkpoints a rule keeps) are unit-tested in tests/test_retention_policy.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from helpers.checkpoints import fake_checkpoint
from helpers.cli import cli, cli_json
from lightning_lora_ckpt import CheckpointStore, LoRACheckpointIO
from lightning_lora_ckpt.format.strict_json import CheckpointFormatError, utcnow
from lightning_lora_ckpt.policy.retention import KeepBest, KeepLatest, MaxBytes
from lightning_lora_ckpt.storage import lifecycle
from lightning_lora_ckpt.storage.commit import object_tags, retire_checkpoint, update_manifest
from lightning_lora_ckpt.storage.fs import CheckpointConflictError, url_to_fs

RUN = "run"
DAY = timedelta(days=1)


@pytest.fixture(params=["local", "memory", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    """(root, storage_options) of a fresh root on a local folder, ``memory://`` or the loopback moto S3 server."""
    if request.param == "local":
        return str(tmp_path / "root"), {}
    if request.param == "memory":
        return f"memory://lifecycle-{uuid.uuid4().hex}", {}
    server = request.getfixturevalue("s3_server")
    return f"s3://{server['bucket']}/{uuid.uuid4().hex}", server["storage_options"]


def make_run(root: str, options: dict[str, Any], steps: range = range(1, 6)) -> CheckpointStore:
    """A run with a training and a sampler checkpoint at each step (names ``000001``...), val_loss = 1/step."""
    io = LoRACheckpointIO(root=root, run_id=RUN, async_save=False, storage_options=options)
    for step in steps:
        for training in (True, False):
            io.save_checkpoint(fake_checkpoint(step, training=training), f"{step:06d}")
    store = CheckpointStore(root, options)
    for c in store.list_checkpoints(RUN):
        update_manifest(c.path, lambda m: dataclasses.replace(m, metrics={"val_loss": 1 / m.step}), options)
    return store


def uri(kind: str, step: int) -> str:
    return f"lora://{RUN}/{kind}/{step:06d}"


def snapshot(store: CheckpointStore) -> dict[str, bytes]:
    """The bytes of every object (file) under the store's root, by path."""
    fs, path = url_to_fs(store.root, store.storage_options)
    fs.invalidate_cache()
    return {p: fs.cat_file(p) for p in sorted(fs.find(path))}


def ids(checkpoints: list[Any]) -> list[str]:
    return [c.checkpoint_id for c in checkpoints]


def test_pin_and_unpin(backend: tuple[str, dict[str, Any]]) -> None:
    store = make_run(*backend, steps=range(1, 3))
    pinned = store.pin(uri("weights", 1))
    assert pinned.pinned and store.get(uri("weights", 1)).pinned
    assert [c.pinned for c in store.list_checkpoints(RUN)] == [True, False, False, False]
    with pytest.raises(CheckpointConflictError, match="already pinned"):
        store.pin(uri("weights", 1))
    assert not store.unpin(uri("weights", 1)).pinned
    with pytest.raises(CheckpointConflictError, match="not pinned"):
        store.unpin(uri("weights", 1))


def test_a_pinned_checkpoint_survives_gc_delete_overwrite_and_prune(backend: tuple[str, dict[str, Any]]) -> None:
    root, options = backend
    io = LoRACheckpointIO(root=root, run_id=RUN, async_save=False, storage_options=options)
    io.save_checkpoint(fake_checkpoint(1), "t1", {"ttl_seconds": 60})
    io.save_checkpoint(fake_checkpoint(2), "t2")
    store = CheckpointStore(root, options)
    t1 = store.pin("lora://run/weights/t1")
    if root.startswith("s3://"):  # no bucket lifecycle rule may expire it either
        assert {tags["lora-ckpt-ttl"] for tags in object_tags(t1.path, options).values()} == {"none"}
    before = snapshot(store)

    assert store.gc(now=utcnow() + 30 * DAY) == []  # past its TTL
    with pytest.raises(CheckpointConflictError, match=r"is pinned .*lightning-lora-ckpt unpin"):
        store.delete(t1.path)
    with pytest.raises(CheckpointConflictError, match="is pinned and is never replaced"):
        io.save_checkpoint(fake_checkpoint(7), "t1", {"overwrite": True})
    plan = store.prune(RUN, KeepLatest(1))
    assert ids(plan.keep) == ["weights/t1", "weights/t2"] and plan.reasons[t1.path] == "pinned"
    assert retire_checkpoint(t1.path, options) is None
    assert snapshot(store) == before  # nothing of it changed

    store.unpin(t1.path)
    assert ids(store.gc(now=utcnow() + 30 * DAY)) == ["weights/t1"]


def test_prune_dry_run_changes_nothing(backend: tuple[str, dict[str, Any]]) -> None:
    store = make_run(*backend)
    before = snapshot(store)
    plan = store.prune(RUN, KeepLatest(2), dry_run=True)
    assert [c.step for c in plan.delete] == [1, 1, 2, 2, 3, 3]
    assert [c.step for c in plan.keep] == [4, 4, 5, 5] and not plan.over_budget
    assert snapshot(store) == before
    assert len(store.list_checkpoints(RUN)) == 10 and store.deleted() == []


def test_prune_then_restore_gives_identical_bytes(backend: tuple[str, dict[str, Any]]) -> None:
    store = make_run(*backend)
    before = snapshot(store)
    plan = store.prune(RUN, KeepLatest(1) | KeepBest("val_loss", 1, mode="max"))  # steps 5 and 1
    assert [c.step for c in plan.delete] == [2, 2, 3, 3, 4, 4]
    assert [c.step for c in store.list_checkpoints(RUN)] == [1, 1, 5, 5]
    assert store.list_user_checkpoints().cursor.total_count == 4
    deleted = store.deleted(RUN)
    assert sorted(d.checkpoint.path for d in deleted) == sorted(c.path for c in plan.delete)
    assert all(d.deleted_at <= utcnow() and d.to_dict()["deleted_at"] for d in deleted)
    assert store.deleted() == deleted
    with pytest.raises(CheckpointFormatError, match=r"was deleted at .*lightning-lora-ckpt restore"):
        store.get(uri("weights", 3))
    assert store.get(uri("weights", 3), include_deleted=True).step == 3
    with pytest.raises(CheckpointFormatError, match="was deleted at"):
        store.publish(uri("weights", 3))  # no metadata change to a soft-deleted checkpoint
    with pytest.raises(CheckpointFormatError, match="was deleted at"):
        store.pin(uri("weights", 3))

    for d in deleted:
        assert store.restore(d.checkpoint.path).path == d.checkpoint.path
    assert snapshot(store) == before  # every file, the manifests included, byte for byte
    assert len(store.list_checkpoints(RUN)) == 10 and store.deleted() == []
    assert store.verify(uri("weights", 3)).ok
    with pytest.raises(CheckpointConflictError, match="not deleted"):
        store.restore(uri("weights", 3))


def test_soft_deleted_checkpoints_are_not_resumed(backend: tuple[str, dict[str, Any]]) -> None:
    store = make_run(*backend, steps=range(1, 4))
    for c in store.list_checkpoints(RUN):
        if c.step == 3:
            assert retire_checkpoint(c.path, store.storage_options) is not None
    assert store.last_checkpoint(RUN).step == 2  # type: ignore[union-attr]
    run = store.get_run(RUN)
    assert run.last_checkpoint.step == run.last_sampler_checkpoint.step == 2  # type: ignore[union-attr]


def test_gc_purges_after_the_grace_and_keeps_before(backend: tuple[str, dict[str, Any]]) -> None:
    store = make_run(*backend, steps=range(1, 4))
    store.prune(RUN, KeepLatest(1))
    doomed = sorted(d.checkpoint.path for d in store.deleted())
    assert len(doomed) == 4
    kept = snapshot(store)
    now = utcnow()

    assert store.gc() == [] and store.gc(now=now + timedelta(hours=23)) == []
    assert sorted(c.path for c in store.gc(dry_run=True, now=now + 2 * DAY)) == doomed
    assert snapshot(store) == kept
    store.restore(uri("weights", 1))  # restored meanwhile: kept
    purged = store.gc(now=now + 2 * DAY)
    assert sorted(c.path for c in purged) == [p for p in doomed if not p.endswith("/run/weights/000001")]
    assert store.deleted() == [] and [c.step for c in store.list_checkpoints(RUN)] == [1, 3, 3]
    remaining = snapshot(store)
    assert not [p for p in remaining if "/000002/" in p or "sampler_weights/000001/" in p]  # every file gone
    with pytest.raises(CheckpointFormatError, match=r"Nothing to restore .*purged by gc"):
        store.restore(uri("weights", 2))


def test_gc_grace_is_configurable_and_a_ttl_purges_a_soft_deleted_checkpoint(tmp_path: Path) -> None:
    root = str(tmp_path / "root")
    io = LoRACheckpointIO(root=root, run_id=RUN, async_save=False)
    io.save_checkpoint(fake_checkpoint(1), "a")
    io.save_checkpoint(fake_checkpoint(2), "b", {"ttl_seconds": 60})
    io.save_checkpoint(fake_checkpoint(3), "c")
    store = CheckpointStore(root)
    store.prune(RUN, KeepLatest(1))
    now = utcnow()
    assert ids(store.gc(now=now + timedelta(minutes=5))) == ["weights/b"]  # its TTL is over: a TTL deletes for good
    assert store.gc(now=now + timedelta(minutes=5), grace="1h") == []
    assert ids(store.gc(now=now + timedelta(hours=2), grace="1h")) == ["weights/a"]
    with pytest.raises(ValueError, match="grace period"):
        store.gc(grace=-1)


def test_every_deletion_is_judged_at_its_moment(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A checkpoint published after prune's scan stays; one restored after gc's scan stays."""
    store = make_run(f"memory://lifecycle-{uuid.uuid4().hex}", {}, steps=range(1, 4))
    real_retire, real_delete = lifecycle.retire_checkpoint, lifecycle.delete_checkpoint
    late = store.resolve(uri("weights", 1))

    def publish_first(path: str, *args: Any) -> Any:
        if path == late:
            store.publish(path)
        return real_retire(path, *args)

    monkeypatch.setattr(lifecycle, "retire_checkpoint", publish_first)
    with caplog.at_level(logging.WARNING, logger="lightning_lora_ckpt.storage.commit"):
        plan = store.prune(RUN, KeepLatest(1))
    assert late in ids_paths(plan.keep) and late not in ids_paths(plan.delete)
    assert plan.reasons[late] == "published" and "Not deleting checkpoint" in caplog.text
    assert len(plan.delete) == len(store.deleted()) == 3

    monkeypatch.undo()
    restored = store.resolve(uri("sampler_weights", 2))

    def restore_first(path: str, *args: Any) -> Any:
        if path == restored:
            store.restore(path)
        return real_delete(path, *args)

    monkeypatch.setattr(lifecycle, "delete_checkpoint", restore_first)
    purged = store.gc(now=utcnow() + 2 * DAY)
    assert restored not in ids_paths(purged) and len(purged) == 2
    assert store.get(restored).step == 2


def ids_paths(checkpoints: list[Any]) -> list[str]:
    return [c.path for c in checkpoints]


def test_retire_checkpoint(tmp_path: Path) -> None:
    store = make_run(str(tmp_path / "root"), {}, steps=range(1, 3))
    one, two = (store.resolve(uri("weights", s)) for s in (1, 2))
    assert retire_checkpoint(one, keep=lambda m: "the caller keeps it") is None
    store.publish(one)
    assert retire_checkpoint(one) is None  # published: never retired
    store.unpublish(one)
    retired = retire_checkpoint(one)
    assert retired is not None and retired.deleted_at is not None
    assert retire_checkpoint(one) == retired  # again: the first deletion time stays
    store.delete(one)  # delete purges a soft-deleted checkpoint at once
    assert retire_checkpoint(one) is None  # gone
    assert store.deleted() == [] and store.get(two).step == 2


def test_prune_warns_when_the_kept_ones_exceed_the_budget(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = make_run(str(tmp_path / "root"), {}, steps=range(1, 4))
    with caplog.at_level(logging.WARNING, logger="lightning_lora_ckpt.storage.lifecycle"):
        plan = store.prune(RUN, KeepLatest(2) | MaxBytes(1), dry_run=True)
    assert plan.over_budget and "exceed the byte budget" in caplog.text
    assert [c.step for c in plan.delete] == [1, 1]
    everything = sum(c.size_bytes for c in store.list_checkpoints(RUN))
    plan = store.prune(RUN, MaxBytes(everything - 1), together=False)
    assert ids(plan.delete) == ["weights/000001"] and not plan.over_budget
    assert ids(store.prune(RUN, KeepLatest(1), only=[]).delete) == []  # only: nothing listed, nothing deleted


def test_cli_pin_prune_restore_gc(tmp_path: Path) -> None:
    root = str(tmp_path / "root")
    store = make_run(root, {}, steps=range(1, 5))
    at = ["--root", root]
    t1 = store.resolve(uri("weights", 1))

    listed = cli_json("list", RUN, *at)["checkpoints"]
    assert listed[0]["metrics"] == {"val_loss": 1.0} and listed[0]["pinned"] is False
    assert cli_json("pin", uri("weights", 1), *at)["pinned"] is True
    again = cli("pin", uri("weights", 1), *at)
    assert again.returncode == 1 and again.stderr.startswith("error: ") and "already pinned" in again.stderr
    info = cli_json("info", uri("weights", 1), *at)
    assert info["pinned"] is True and info["metrics"] == {"val_loss": 1.0} and info["deleted_at"] is None
    table = cli("list", RUN, *at)
    assert table.returncode == 0 and "val_loss=1" in table.stdout and "pinned" in table.stdout
    refused = cli("delete", "-y", uri("weights", 1), *at)
    assert refused.returncode == 1 and "unpin" in refused.stderr and store.get(t1)

    prune = ["prune", RUN, "--keep-latest", "1", "--keep-best", "val_loss:max:1", *at]
    dry = cli_json(*prune, "--dry-run")
    assert dry["dry_run"] is True and [c["step"] for c in dry["deleted"]] == [2, 2, 3, 3]
    kept = {c["checkpoint_id"]: c["reason"] for c in dry["kept"]}
    assert kept["weights/000001"] == "pinned" and kept["sampler_weights/000004"] == "KeepLatest(1)"
    asked = cli(*prune)  # stdin is not a terminal: refuses to ask
    assert asked.returncode == 1 and "stdin is not a terminal" in asked.stderr and "Traceback" not in asked.stderr
    assert len(store.list_checkpoints(RUN)) == 8
    done = cli_json(*prune, "-y")
    assert [c["step"] for c in done["deleted"]] == [2, 2, 3, 3]
    assert [c["step"] for c in cli_json("list", RUN, *at)["checkpoints"]] == [1, 1, 4, 4]

    deleted = cli_json("list", "--deleted", *at)["checkpoints"]
    assert sorted(c["step"] for c in deleted) == [2, 2, 3, 3] and all(c["deleted_at"] for c in deleted)
    assert "restore URI" in cli("list", RUN, "--deleted", *at).stdout
    assert cli_json("info", uri("weights", 3), *at)["deleted_at"] == deleted_at(deleted, "weights/000003")
    assert cli_json("restore", uri("weights", 3), *at)["step"] == 3
    not_deleted = cli("restore", uri("weights", 3), *at)
    assert not_deleted.returncode == 1 and "not deleted" in not_deleted.stderr

    assert cli_json("gc", "-y", *at)["deleted"] == []  # within the grace period
    gc = cli_json("gc", "--grace", "0", "-y", *at)
    assert sorted(c["checkpoint_id"] for c in gc["deleted"]) == [
        "sampler_weights/000002",
        "sampler_weights/000003",
        "weights/000002",
    ]
    assert cli_json("list", "--deleted", *at)["checkpoints"] == []
    purged = cli("restore", uri("weights", 2), *at)
    assert purged.returncode == 1 and "Nothing to restore" in purged.stderr  # gc purged it
    assert cli_json("unpin", uri("weights", 1), *at)["pinned"] is False


def deleted_at(listed: list[dict[str, Any]], checkpoint_id: str) -> str:
    return next(c["deleted_at"] for c in listed if c["checkpoint_id"] == checkpoint_id)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["prune", RUN], "no retention rule given"),
        (["prune", RUN, "--keep-latest", "0"], "keep_latest must be an int >= 1"),
        (["prune", RUN, "--keep-best", "val_loss:median:1"], "MODE must be 'min' or 'max'"),
        (["prune", RUN, "--max-bytes", "lots"], "max_bytes"),
        (["prune", "nope", "--keep-latest", "1"], "No run 'nope'"),
        (["gc", "--grace", "soon"], "Invalid duration"),
    ],
)
def test_cli_lifecycle_errors_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    root = str(tmp_path / "root")
    make_run(root, {}, steps=range(1, 2))
    out = cli(*args, "--root", root, "--json")
    assert out.returncode == 1 and out.stdout == "", out
    assert out.stderr.startswith("error: ") and message in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert json.loads(cli("list", RUN, "--root", root, "--json").stdout)["checkpoints"]  # nothing changed
