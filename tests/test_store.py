"""CheckpointStore: S3 lifecycle tags, archive extraction refusals, and a gc property test on memory://.

The storage contract every backend meets is tests/storage_suite.py (run by tests/test_storage_backends.py)."""

from __future__ import annotations

import io as _io
import tarfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.checkpoints import fake_checkpoint, populate
from lightning_lora_ckpt import CheckpointStore, LoRACheckpointIO, extract_archive
from lightning_lora_ckpt.format.strict_json import utcnow
from lightning_lora_ckpt.storage.commit import object_tags


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
