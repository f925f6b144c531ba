"""Storage faults on S3: a real proxy (tests/support/fault_proxy.py) between s3fs/botocore and the moto server.

Transient faults are retried by the libraries (botocore's standard retry mode, then s3fs) and the save
lands intact; persistent ones end in a ``CheckpointWriteError`` naming the checkpoint within a bounded
time, with nothing half-written visible and earlier checkpoints intact; with ``on_error="warn"`` a
training run keeps going past a failed save.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from helpers.checkpoints import fake_checkpoint
from helpers.training import MODULE_KWARGS, batch_loader, make_trainer
from lightning_lora_ckpt import (
    CheckpointStore,
    CheckpointWriteError,
    LoRACheckpointIO,
    LoRAModule,
    PeriodicCheckpoint,
)
from lightning_lora_ckpt.storage.fs import S3_CONFIG_DEFAULTS, url_to_fs
from support.fault_proxy import FaultKind, FaultProxy, fault_proxy

# Small bounds for the persistent-fault tests: 2 botocore attempts, 1 s timeouts.
FAST_FAIL = {"retries": {"mode": "standard", "total_max_attempts": 2}, "connect_timeout": 1, "read_timeout": 1}


@pytest.fixture
def proxy(s3_server: dict[str, Any]) -> Iterator[FaultProxy]:
    with fault_proxy(s3_server["storage_options"]["client_kwargs"]["endpoint_url"]) as p:
        yield p


def through(proxy: FaultProxy, s3_server: dict[str, Any], config_kwargs: dict[str, Any] | None = None) -> dict:
    """storage_options reaching moto through the proxy (the library's retry defaults unless ``config_kwargs``)."""
    options = {**s3_server["storage_options"], "client_kwargs": {"endpoint_url": proxy.url, "region_name": "us-east-1"}}
    return {**options, "config_kwargs": config_kwargs} if config_kwargs else options


def new_root(s3_server: dict[str, Any]) -> str:
    return f"s3://{s3_server['bucket']}/{uuid.uuid4().hex}"


def listed(root: str, s3_server: dict[str, Any], run_id: str = "run") -> list[str]:
    """Names of the committed checkpoints of a run, read directly from moto (no proxy)."""
    store = CheckpointStore(root, s3_server["storage_options"])
    return [c.checkpoint_id for c in store.list_checkpoints(run_id)]


def assert_intact(root: str, s3_server: dict[str, Any], uri: str, step: int) -> None:
    store = CheckpointStore(root, s3_server["storage_options"])
    assert store.verify(uri).ok
    io = LoRACheckpointIO(root=root, run_id="run", async_save=False, storage_options=s3_server["storage_options"])
    restored = io.load_checkpoint(uri)
    assert restored["global_step"] == step
    assert torch.equal(restored["state_dict"]["base_model.model.layer.lora_A.weight"], torch.full((4, 8), float(step)))


def test_s3_defaults_fill_only_what_the_user_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_RETRY_MODE", raising=False)
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    fs, _ = url_to_fs("s3://bucket/a", {"anon": True})
    assert fs.config_kwargs == S3_CONFIG_DEFAULTS
    fs, _ = url_to_fs("s3://bucket/a", {"anon": True, "config_kwargs": {"read_timeout": 99}})
    assert fs.config_kwargs == {**S3_CONFIG_DEFAULTS, "read_timeout": 99}
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "7")  # the user's botocore setting is not overridden
    fs, _ = url_to_fs("s3://bucket/a", {"anon": True})
    assert "retries" not in fs.config_kwargs and fs.config_kwargs["read_timeout"] == S3_CONFIG_DEFAULTS["read_timeout"]
    fs, _ = url_to_fs("memory://a", None)  # other filesystems get no S3 options
    assert not hasattr(fs, "config_kwargs")


@pytest.mark.parametrize("kind", ["close", "reset", "500", "503"])
def test_transient_faults_are_retried_and_the_save_lands(proxy: FaultProxy, s3_server: dict, kind: FaultKind) -> None:
    root = new_root(s3_server)
    io = LoRACheckpointIO(root=root, run_id="run", async_save=False, storage_options=through(proxy, s3_server))
    proxy.inject(kind, times=2, method="PUT")  # the first two uploads fail once each attempt
    io.save_checkpoint(fake_checkpoint(3), "000003")
    assert proxy.injected(kind) == 2
    # run.json + 4 files + manifest + the listing index's intent and the index, and the 2 failed attempts repeated
    assert proxy.requests("PUT") == 8 + 2
    assert listed(root, s3_server) == ["weights/000003"]
    assert_intact(root, s3_server, f"{root}/run/weights/000003", 3)


def test_slow_and_stalled_responses_are_survived(proxy: FaultProxy, s3_server: dict) -> None:
    root = new_root(s3_server)
    options = through(proxy, s3_server, {"read_timeout": 1})
    io = LoRACheckpointIO(root=root, run_id="run", async_save=False, storage_options=options)
    proxy.inject("stall", times=1, method="PUT", path_contains="adapter_model")  # times out after 1 s, retried
    proxy.inject("throttle", times=None, rate=50_000)  # everything else
    io.save_checkpoint(fake_checkpoint(5), "000005")
    loaded = LoRACheckpointIO(root=root, run_id="run", async_save=False, storage_options=options)
    assert loaded.load_checkpoint("000005")["global_step"] == 5  # read through the throttled link
    assert proxy.injected("stall") == 1 and proxy.injected("throttle") > 6
    assert_intact(root, s3_server, f"{root}/run/weights/000005", 5)


@pytest.mark.parametrize(
    ("kind", "max_requests"),
    # botocore attempts (2) x s3fs retries (5, only for throttling and connection errors) x aiohttp's one
    # reconnect on a dropped keep-alive connection
    [("close", 2 * 5 * 2), ("reset", 2 * 5 * 2), ("500", 2), ("503", 2 * 5), ("stall", 2 * 5)],
)
def test_persistent_faults_fail_clearly_in_bounded_time(
    proxy: FaultProxy, s3_server: dict, kind: FaultKind, max_requests: int
) -> None:
    root = new_root(s3_server)
    io = LoRACheckpointIO(
        root=root, run_id="run", async_save=False, storage_options=through(proxy, s3_server, FAST_FAIL)
    )
    io.save_checkpoint(fake_checkpoint(1), "000001")
    before = len(proxy.log)
    proxy.inject(kind, times=None)
    start = time.monotonic()
    with pytest.raises(CheckpointWriteError) as info:
        io.save_checkpoint(fake_checkpoint(2), "000002")
    elapsed = time.monotonic() - start
    proxy.clear()
    assert elapsed < 60
    assert f"{root}/run/weights/000002" in str(info.value) and "Could not write checkpoint" in str(info.value)
    assert isinstance(info.value.__cause__, Exception)  # the storage error itself is kept
    assert 1 <= len(proxy.log) - before <= max_requests
    assert listed(root, s3_server) == ["weights/000001"]
    assert_intact(root, s3_server, f"{root}/run/weights/000001", 1)


def test_a_manifest_that_cannot_be_written_leaves_nothing_visible(proxy: FaultProxy, s3_server: dict) -> None:
    root = new_root(s3_server)
    options = through(proxy, s3_server, FAST_FAIL)
    io = LoRACheckpointIO(root=root, run_id="run", async_save=False, storage_options=options)
    proxy.inject("503", times=None, method="PUT", path_contains="checkpoint.json")
    with pytest.raises(CheckpointWriteError, match="000007"):
        io.save_checkpoint(fake_checkpoint(7), "000007")
    proxy.clear()
    direct = s3_server["client"].list_objects_v2(Bucket=s3_server["bucket"], Prefix=root.split("/", 3)[3])
    uploaded = {o["Key"].rsplit("/", 1)[-1] for o in direct["Contents"]}
    assert "adapter_model.safetensors" in uploaded and "checkpoint.json" not in uploaded  # files, no manifest
    assert listed(root, s3_server) == []
    with pytest.raises(ValueError, match=r"checkpoint\.json is missing"):
        io.load_checkpoint("000007")
    io.save_checkpoint(fake_checkpoint(7), "000007")  # the leftovers are replaced by the next save
    assert_intact(root, s3_server, f"{root}/run/weights/000007", 7)


def test_training_continues_past_a_failed_save_with_on_error_warn(
    proxy: FaultProxy, s3_server: dict, caplog: pytest.LogCaptureFixture
) -> None:
    root = new_root(s3_server)
    io = LoRACheckpointIO(
        root=root, run_id="run", storage_options=through(proxy, s3_server, FAST_FAIL), on_error="warn"
    )
    proxy.inject("500", times=None, path_contains="/weights/000004/")  # every request of that save fails
    callback = PeriodicCheckpoint(every_n_train_steps=2, kind="state", keep_last=1)
    trainer = make_trainer(io, max_steps=6, callbacks=[callback])
    with caplog.at_level(logging.WARNING, logger="lightning_lora_ckpt.lightning.checkpoint_io"):
        trainer.fit(LoRAModule(**MODULE_KWARGS), batch_loader())
    assert trainer.global_step == 6
    messages = [r.getMessage() for r in caplog.records]
    assert any("Could not write checkpoint" in m and "000004" in m and "training continues" in m for m in messages)
    # keep_last=1 would have deleted 000002 once 000004 was saved: since that save failed, 000002 stays
    assert any("Not deleting checkpoint" in m and "000002" in m for m in messages)
    assert listed(root, s3_server) == ["weights/000002", "weights/000006", "weights/final"]
    store = CheckpointStore(root, s3_server["storage_options"])
    assert all(store.verify(f"{root}/run/{name}").ok for name in listed(root, s3_server))


def test_on_error_is_validated() -> None:
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'warn'"):
        LoRACheckpointIO(on_error="ignore")  # type: ignore[arg-type]
