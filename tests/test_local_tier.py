"""The fast local tier: saves commit to a local disk and are mirrored to the durable root in order, verified;
resume takes the newest committed training checkpoint of either tier; losing the local disk loses only what
was not mirrored yet (issue 14)."""

from __future__ import annotations

import logging
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest

from helpers.checkpoints import fake_checkpoint
from helpers.storage import FailingMemoryFS
from helpers.training import MODULE_KWARGS, batch_loader, make_trainer
from lightning_lora_ckpt import CheckpointStore, LoRACheckpointIO, LoRAModule, PeriodicCheckpoint


def _files(store: CheckpointStore, uri: str) -> dict[str, bytes]:
    manifest = store.manifest(uri)
    fs, path = store.fs, store.fs._strip_protocol(uri)
    return {name: fs.cat_file(f"{path}/{name}") for name in manifest.files}


def test_saves_commit_locally_and_are_mirrored_in_order(tmp_path: Path, s3_server: dict[str, Any]) -> None:
    root, options = f"s3://{s3_server['bucket']}/{uuid.uuid4().hex}", s3_server["storage_options"]
    tier = tmp_path / "nvme"
    io = LoRACheckpointIO(root=root, run_id="r", async_save=False, storage_options=options, local_tier=str(tier))
    for step in range(1, 5):
        io.save_checkpoint(fake_checkpoint(step), f"t{step}")
        io.save_checkpoint(fake_checkpoint(step, training=False), f"s{step}")
    io.teardown()  # waits for the mirror

    durable, local = CheckpointStore(root, options), CheckpointStore(str(tier))
    assert [(c.checkpoint_id, c.step) for c in durable.list_checkpoints("r") if c.checkpoint_type == "training"] == [
        (f"weights/t{s}", s) for s in range(1, 5)
    ]
    assert all(durable.verify(c.path).ok for c in durable.list_checkpoints("r"))
    assert durable.get_run("r").run_id == "r"  # run.json mirrored too
    # Mirrored copies are bit-identical, manifest included; the local tier keeps the newest of each type.
    assert {c.checkpoint_id for c in local.list_checkpoints("r")} == {"weights/t4", "sampler_weights/s4"}
    assert durable.manifest("lora://r/weights/t4") == local.manifest(str(tier / "r/weights/t4"))
    assert _files(durable, f"{root}/r/weights/t4") == _files(local, str(tier / "r/weights/t4"))


def test_resume_takes_the_newest_of_either_tier_and_survives_losing_the_local_disk(tmp_path: Path) -> None:
    durable_root, tier = f"failingmem://{uuid.uuid4().hex}", tmp_path / "nvme"
    FailingMemoryFS.writes_left = 10**6
    io = LoRACheckpointIO(root=durable_root, run_id="r", local_tier=str(tier), on_error="warn")
    make_trainer(io, max_steps=4, callbacks=[PeriodicCheckpoint(every_n_train_steps=2, kind="state")]).fit(
        LoRAModule(**MODULE_KWARGS), batch_loader(4)
    )
    assert CheckpointStore(durable_root).last_checkpoint("r").step == 4  # mirrored at the end of fit

    FailingMemoryFS.writes_left = 0  # the durable root now refuses every upload: the mirror fails
    io = LoRACheckpointIO(root=durable_root, run_id="r", local_tier=str(tier), on_error="warn")
    trainer = make_trainer(io, max_steps=6, callbacks=[PeriodicCheckpoint(every_n_train_steps=2, kind="state")])
    trainer.fit(LoRAModule(**MODULE_KWARGS), batch_loader(4), ckpt_path="last")
    assert trainer.global_step == 6 and CheckpointStore(durable_root).last_checkpoint("r").step == 4
    assert CheckpointStore(str(tier)).last_checkpoint("r").step == 6  # only in the local tier

    FailingMemoryFS.writes_left = 10**6
    io = LoRACheckpointIO(root=durable_root, run_id="r", local_tier=str(tier))
    trainer = make_trainer(io, max_steps=8)
    trainer.fit(LoRAModule(**MODULE_KWARGS), batch_loader(4), ckpt_path="last")  # the local one is newer
    assert trainer.global_step == 8

    shutil.rmtree(tier)  # the machine is gone: resume from what reached the durable root
    io = LoRACheckpointIO(root=durable_root, run_id="r", local_tier=str(tmp_path / "new-nvme"))
    trainer = make_trainer(io, max_steps=5)
    trainer.fit(LoRAModule(**MODULE_KWARGS), batch_loader(4), ckpt_path="last")
    assert trainer.global_step == 5  # resumed at step 4, the newest mirrored one


def test_a_failed_mirror_raises_or_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    FailingMemoryFS.writes_left = 0
    for on_error in ("warn", "raise"):
        io = LoRACheckpointIO(
            root=f"failingmem://{uuid.uuid4().hex}",
            run_id="r",
            async_save=False,
            local_tier=str(tmp_path / on_error),
            on_error=on_error,  # type: ignore[arg-type]
        )
        io.save_checkpoint(fake_checkpoint(1), "t1")  # commits locally at once
        assert CheckpointStore(str(tmp_path / on_error)).last_checkpoint("r").step == 1
        if on_error == "warn":
            with caplog.at_level(logging.WARNING):
                io.teardown()
            assert "Could not mirror" in caplog.text
        else:
            with pytest.raises(OSError, match="mirror"):
                io.teardown()
    FailingMemoryFS.writes_left = 10**6
