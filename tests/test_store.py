"""CheckpointStore on a local root, on memory:// and on S3 (moto over HTTP on loopback)."""

from __future__ import annotations

import io as _io
import os
import tarfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import fake_checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_lora_ckpt import (
    CheckpointConflictError,
    CheckpointFormatError,
    CheckpointStore,
    LoRACheckpointIO,
    extract_archive,
)
from lightning_lora_ckpt.format.strict_json import utcnow
from lightning_lora_ckpt.storage.commit import object_tags
from lightning_lora_ckpt.storage.fs import url_to_fs


def populate(root: str, options: dict[str, Any]) -> LoRACheckpointIO:
    io = LoRACheckpointIO(root=root, run_id="r1", async_save=False, storage_options=options)
    io.save_checkpoint(fake_checkpoint(1), "t1")
    io.save_checkpoint(fake_checkpoint(1, training=False), "s1", {"ttl_seconds": 3600})
    io.save_checkpoint(fake_checkpoint(2), "t2", {"ttl_seconds": 60, "user_metadata": {"note": "x"}})
    other = LoRACheckpointIO(root=root, run_id="r2", async_save=False, storage_options=options)
    time.sleep(0.01)
    other.save_checkpoint(fake_checkpoint(5, training=False), "s5")
    return io


def test_listing_and_runs(root: tuple[str, dict[str, Any]]) -> None:
    uri, options = root
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


def test_ttl_publish_delete_never_touch_the_weights(root: tuple[str, dict[str, Any]]) -> None:
    uri, options = root
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


def test_gc_keeps_newest_training_public_and_unfinished(root: tuple[str, dict[str, Any]]) -> None:
    uri, options = root
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


def test_verify_download_and_archive(root: tuple[str, dict[str, Any]], tmp_path: Path) -> None:
    uri, options = root
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


def test_s3_objects_carry_lifecycle_ttl_tags(s3_server: dict[str, Any]) -> None:
    uri, options = f"s3://{s3_server['bucket']}/tags", s3_server["storage_options"]
    populate(uri, options)
    store = CheckpointStore(uri, options)

    def tags(name: str) -> set[str]:
        key_prefix = f"tags/{name}/"
        keys = [
            o["Key"]
            for o in s3_server["client"].list_objects_v2(Bucket=s3_server["bucket"], Prefix=key_prefix)["Contents"]
        ]
        assert len(keys) >= 3
        return {
            t["Value"]
            for key in keys
            for t in s3_server["client"].get_object_tagging(Bucket=s3_server["bucket"], Key=key)["TagSet"]
            if t["Key"] == "lora-ckpt-ttl"
        }

    assert tags("r1/sampler_weights/s1") == {"1d"} and tags("r1/weights/t1") == {"none"}
    store.set_ttl("lora://r1/weights/t1", "10d")
    assert tags("r1/weights/t1") == {"30d"}
    store.set_ttl("lora://r1/weights/t1", 200 * 86400)
    assert tags("r1/weights/t1") == {"none"}
    store.set_ttl("lora://r1/sampler_weights/s1", "3d")
    store.publish("lora://r1/sampler_weights/s1")
    assert tags("r1/sampler_weights/s1") == {"none"}
    assert set(object_tags(store.resolve("lora://r1/weights/t2"), options)) == {
        "adapter_model.safetensors",
        "adapter_config.json",
        "training_state.safetensors",
        "training_state.json",
        "checkpoint.json",
    }


def malicious_tar(tmp_path: Path, kind: str) -> str:
    path = tmp_path / f"{kind}.tar"
    with tarfile.open(path, "w") as tar:
        ok = tarfile.TarInfo("adapter_config.json")
        ok.size = 2
        tar.addfile(ok, _io.BytesIO(b"{}"))
        member = tarfile.TarInfo(
            {"symlink": "link", "hardlink": "hard", "absolute": "/tmp/evil", "dotdot": "../evil", "nested": "a/b"}[kind]
        )
        if kind == "symlink":
            member.type, member.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif kind == "hardlink":
            member.type, member.linkname = tarfile.LNKTYPE, "adapter_config.json"
        member.size = 0
        tar.addfile(member, _io.BytesIO(b""))
    return str(path)


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "absolute", "dotdot", "nested"])
def test_archive_extraction_refuses_escapes(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "out"
    with pytest.raises(ValueError, match="Refusing to extract"):
        extract_archive(malicious_tar(tmp_path, kind), target)
    assert not target.exists() and not (tmp_path / "evil").exists()


checkpoint_specs = st.lists(
    st.tuples(
        st.sampled_from(["r1", "r2"]),
        st.booleans(),  # training?
        st.integers(0, 5),  # step
        st.one_of(st.none(), st.integers(1, 5 * 86400)),  # ttl seconds
        st.booleans(),  # public?
    ),
    min_size=1,
    max_size=7,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=checkpoint_specs, clock=st.integers(-3600, 6 * 86400), dry_run=st.booleans())
def test_gc_property(specs: list[tuple[str, bool, int, int | None, bool]], clock: int, dry_run: bool) -> None:
    import uuid

    root = f"memory://gc-{uuid.uuid4().hex}"
    ios = {r: LoRACheckpointIO(root=root, run_id=r, async_save=False) for r in ("r1", "r2")}
    store = CheckpointStore(root)
    for i, (run_id, training, step, ttl, public) in enumerate(specs):
        ios[run_id].save_checkpoint(fake_checkpoint(step, training), f"c{i}", {"ttl_seconds": ttl} if ttl else None)
        if public:
            store.publish(f"lora://{run_id}/{'weights' if training else 'sampler_weights'}/c{i}")
    before = {c.path: c for r in ("r1", "r2") for c in store.list_checkpoints(r)}
    newest = {store.last_checkpoint(r).path for r in ("r1", "r2") if store.last_checkpoint(r)}
    now = utcnow() + timedelta(seconds=clock)
    deleted = {c.path for c in store.gc(dry_run=dry_run, now=now)}
    expired = {p for p, c in before.items() if c.expires_at and c.expires_at <= now}
    must_keep = {p for p, c in before.items() if c.public} | newest
    assert deleted == expired - must_keep
    after = {c.path for r in ("r1", "r2") for c in store.list_checkpoints(r)}
    assert after == (set(before) if dry_run else set(before) - deleted)
