"""Metadata updates, deletions, gc and overwrites racing on one checkpoint, in two real processes at once
(issue 13, items 3-5): every change that returned is there afterwards, nothing deleted comes back, and no
update lands in the checkpoint that replaced the one it read."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from helpers.checkpoints import fake_checkpoint
from helpers.races import Race
from lightning_lora_ckpt import CheckpointStore, LoRACheckpointIO
from lightning_lora_ckpt.format.layout import join
from lightning_lora_ckpt.format.strict_json import CheckpointFormatError

pytestmark = pytest.mark.stress

ROUNDS = 6


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    """A fresh root and its storage options on each backend with cross-process metadata updates."""
    if request.param == "local":
        return str(tmp_path / "root"), {}
    server = request.getfixturevalue("s3_server")
    return f"s3://{server['bucket']}/{uuid.uuid4().hex}", server["storage_options"]


def _save(root: str, options: dict[str, Any], uri: str, step: int, ttl: float | None = None) -> None:
    io = LoRACheckpointIO(root=root, run_id="race", async_save=False, storage_options=options)
    io.save_checkpoint(fake_checkpoint(step, training=False), uri, {"overwrite": True, "ttl_seconds": ttl})


def _present(store: CheckpointStore, uri: str) -> bool:
    try:
        store.get(uri)
    except CheckpointFormatError:
        return False
    return True


def test_publish_and_set_ttl_never_undo_each_other(backend: tuple[str, dict[str, Any]]) -> None:
    root, options = backend
    store, uri = CheckpointStore(root, options), join(root, "race/sampler_weights/c")
    _save(root, options, uri, 1)
    with Race(root, options, uri, [[("publish", None)] * ROUNDS, [("set_ttl", "2h")] * ROUNDS]) as race:
        for _ in range(ROUNDS):
            race.round()
            after = store.get(uri)
            assert after.public and after.expires_at is not None, after  # both changes, whatever the order
            store.unpublish(uri)
            store.set_ttl(uri, None)
        outcomes = race.outcomes()
    assert all(o[0] == "ok" for plan in outcomes for o in plan), outcomes


@pytest.mark.parametrize("update", ["publish", "set_ttl"])
def test_update_racing_delete_never_resurrects(backend: tuple[str, dict[str, Any]], update: str) -> None:
    root, options = backend
    store, uri = CheckpointStore(root, options), join(root, "race/sampler_weights/c")
    plans = [[("delete", None)] * ROUNDS, [(update, "2h")] * ROUNDS]
    with Race(root, options, uri, plans) as race:
        for step in range(ROUNDS):
            _save(root, options, uri, step)
            race.round()
            assert not _present(store, uri), f"round {step}: the deleted checkpoint is back"
            assert store.list_checkpoints("race") == []
        deletes, updates = race.outcomes()
    assert all(o[0] == "ok" for o in deletes), deletes
    for o in updates:  # before the deletion, or refused after it: never written into nothing
        assert o[0] == "ok" or (o[1] == "CheckpointFormatError" and "No checkpoint" in o[2]), o
    print(f"{update} vs delete: {sum(o[0] == 'ok' for o in updates)} of {ROUNDS} updates landed before the deletion")


def test_gc_racing_publish_keeps_what_was_published(backend: tuple[str, dict[str, Any]]) -> None:
    root, options = backend
    store, uri = CheckpointStore(root, options), join(root, "race/sampler_weights/c")
    plans = [[("gc", 1)] * ROUNDS, [("publish", None)] * ROUNDS]
    with Race(root, options, uri, plans) as race:
        for step in range(ROUNDS):
            if _present(store, uri) and store.get(uri).public:
                store.unpublish(uri)
            _save(root, options, uri, step, ttl=60)  # gc, told it is an hour later, finds it expired
            race.round()
        gcs, publishes = race.outcomes()
    for step, (gc, publish) in enumerate(zip(gcs, publishes, strict=True)):
        assert gc[0] == "ok", gc
        if publish[0] == "ok":  # published: gc must have kept it (or deleted it before the publish saw it)
            assert publish[1] is True and uri not in gc[1], (step, gc, publish)
        else:
            assert publish[1] == "CheckpointFormatError" and uri in gc[1], (step, gc, publish)
    kept = sum(p[0] == "ok" for p in publishes)
    print(f"gc vs publish: {kept} of {ROUNDS} published first and kept, {ROUNDS - kept} deleted first")


def test_metadata_update_during_overwrite_lands_whole(backend: tuple[str, dict[str, Any]]) -> None:
    root, options = backend
    store, uri = CheckpointStore(root, options), join(root, "race/sampler_weights/c")
    _save(root, options, uri, 0)
    plans = [[("overwrite", step) for step in range(1, ROUNDS + 1)], [("set_ttl", "2h")] * ROUNDS]
    with Race(root, options, uri, plans) as race:
        for step in range(1, ROUNDS + 1):
            race.round()
            report = store.verify(uri)
            assert report.ok, (step, report.problems)
            assert store.get(uri).step == step
        overwrites, updates = race.outcomes()
    assert all(o[0] == "ok" for o in overwrites), overwrites
    for o in updates:  # on the old or the new checkpoint; on object stores maybe between them (none committed)
        assert o[0] == "ok" or (o[1] == "CheckpointFormatError" and "No checkpoint" in o[2]), o
