"""Object-store saves and a gc that misjudges them (issue 13, item 13): a gc on a host whose clock runs a day
ahead leaves a save in flight alone (leftovers are aged by the store's clock), and a save whose objects
vanished before its commit commits nothing."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from helpers.checkpoints import fake_checkpoint
from lightning_lora_ckpt import CheckpointStore, CheckpointWriteError, LoRACheckpointIO
from lightning_lora_ckpt.format.layout import join


class VanishingMemoryFS(MemoryFileSystem):
    """An object store where each upload of a file named ``adapter_config.json`` removes the folder's
    ``adapter_model.safetensors`` (what a gc deleting a save's objects meanwhile does)."""

    protocol = "vanishingmem"
    root_marker = ""

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        super().pipe_file(path, value, mode=mode, **kwargs)
        if path.endswith("/adapter_config.json"):
            self.rm_file(path.rsplit("/", 1)[0] + "/adapter_model.safetensors")


fsspec.register_implementation("vanishingmem", VanishingMemoryFS, clobber=True)


def test_a_save_whose_objects_vanished_commits_nothing() -> None:
    root = f"vanishingmem://{uuid.uuid4().hex}"
    io = LoRACheckpointIO(root=root, run_id="run", async_save=False)
    with pytest.raises(CheckpointWriteError, match=r"vanished before the commit.*nothing was committed"):
        io.save_checkpoint(fake_checkpoint(1, training=False), "s1")
    assert CheckpointStore(root).list_checkpoints("run") == []
    assert not fsspec.filesystem("vanishingmem").exists(join(root, "run/sampler_weights/s1/checkpoint.json"))


def test_gc_on_a_host_a_day_ahead_keeps_a_save_in_flight(
    s3_server: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, options = f"s3://{s3_server['bucket']}/{uuid.uuid4().hex}", s3_server["storage_options"]
    io = LoRACheckpointIO(root=root, run_id="run", async_save=False, storage_options=options)
    io.save_checkpoint(fake_checkpoint(1), "t1")  # the run's resume point
    store = CheckpointStore(root, options)
    in_flight = join(store._root_path, "run/weights/t2")  # a save that has uploaded its first object
    store.fs.pipe_file(join(in_flight, "adapter_model.safetensors"), b"uploading")
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 25 * 3600)  # this host's clock runs 25 h ahead

    assert store.incomplete(older_than="1d") == []
    store.gc()
    store.fs.invalidate_cache()
    assert store.fs.exists(join(in_flight, "adapter_model.safetensors"))
    monkeypatch.setattr(time, "time", real)
    assert store.incomplete(older_than=0) == [join(root, "run/weights/t2")]


def test_two_memory_writers_of_one_name_one_wins_whole() -> None:
    root = f"memory://{uuid.uuid4().hex}"
    barrier, outcomes = threading.Barrier(2), []

    def write(step: int) -> None:
        io = LoRACheckpointIO(root=root, run_id="run", async_save=False)
        barrier.wait()
        try:
            io.save_checkpoint(fake_checkpoint(step), "same", {"overwrite": False})
            outcomes.append(("done", step))
        except FileExistsError as err:
            outcomes.append(("refused", str(err)))

    for _ in range(20):
        root = f"memory://{uuid.uuid4().hex}"
        outcomes.clear()
        threads = [threading.Thread(target=write, args=(step,)) for step in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done = [o for o in outcomes if o[0] == "done"]
        assert len(done) == 1 and len(outcomes) == 2, outcomes
        store = CheckpointStore(root)
        (checkpoint,) = store.list_checkpoints("run")
        assert store.verify(checkpoint.path).ok and checkpoint.step == done[0][1]


def test_an_overwrite_racing_a_commit_never_leaves_it_damaged(
    s3_server: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writer B finds an object of a folder with no manifest and overwrites it; writer A commits the folder between
    B's look and B's overwrite. A's checkpoint would then list an object that is B's: B takes A's commit back, and
    the name is absent, never damaged."""
    from lightning_lora_ckpt.storage.read import manifest_if_any
    from lightning_lora_ckpt.storage.s3 import S3ManifestLastCommit

    root, options = f"s3://{s3_server['bucket']}/{uuid.uuid4().hex}", s3_server["storage_options"]
    a, b = (LoRACheckpointIO(root=root, run_id="r", async_save=False, storage_options=options) for _ in range(2))
    uri = a.resolve("x", "sampler")
    fs, path = fsspec.core.url_to_fs(uri, **options)
    fs.pipe_file(join(path, "adapter_model.safetensors"), b"left by an interrupted save")
    upload, armed = S3ManifestLastCommit._upload, [True]

    def a_commits_first(self: Any, target: str, data: bytes, manifest: Any, create: bool = False) -> Any:
        if armed[0] and not create and target.endswith("adapter_model.safetensors"):
            armed[0] = False
            a.save_checkpoint(fake_checkpoint(1, training=False), "x")  # A, whole, between B's look and overwrite
            assert CheckpointStore(root, options).verify(uri).ok
        return upload(self, target, data, manifest, create)

    monkeypatch.setattr(S3ManifestLastCommit, "_upload", a_commits_first)
    with pytest.raises(FileExistsError, match="another writer"):
        b.save_checkpoint(fake_checkpoint(2, training=False), "x")
    assert not armed[0] and manifest_if_any(uri, options) is None
    assert CheckpointStore(root, options).list_checkpoints("r") == []
