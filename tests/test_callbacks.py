"""PeriodicCheckpoint and CheckpointTTL: cadences, TTLs, ckpt_path="last", autoresume after SIGKILL."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from helpers.checkpoints import fake_checkpoint
from helpers.resume import train
from helpers.storage import FailingMemoryFS
from helpers.training import MODULE_KWARGS, batch_loader, make_trainer
from lightning_lora_ckpt import CheckpointStore, CheckpointTTL, LoRACheckpointIO, LoRAModule, PeriodicCheckpoint


def ids(store: CheckpointStore, run_id: str) -> dict[str, int]:
    return {c.checkpoint_id: c.step for c in store.list_checkpoints(run_id)}


def test_periodic_rolling_final_and_keep_last(tmp_path: Path) -> None:
    io = LoRACheckpointIO(root=str(tmp_path), run_id="run", async_save=True)
    saver = PeriodicCheckpoint(every_n_train_steps=3, kind="both", rolling_every_n_steps=2, keep_last=2)
    ttl = CheckpointTTL(periodic_ttl="7d", rolling_ttl="2h", final_ttl=None)
    make_trainer(io, max_steps=10, callbacks=[saver, ttl]).fit(LoRAModule(**MODULE_KWARGS), batch_loader(4))
    store = CheckpointStore(str(tmp_path))
    assert ids(store, "run") == {
        "weights/000006": 6,
        "sampler_weights/000006": 6,
        "weights/000009": 9,
        "sampler_weights/000009": 9,
        "weights/rolling-000010": 10,
        "weights/final": 10,
        "sampler_weights/final": 10,
    }
    lifetimes = {
        c.checkpoint_id: (c.expires_at - c.time) if c.expires_at else None for c in store.list_checkpoints("run")
    }
    assert lifetimes["weights/000009"] == timedelta(days=7) and lifetimes["sampler_weights/000006"] == timedelta(days=7)
    assert lifetimes["weights/rolling-000010"] == timedelta(hours=2)
    assert lifetimes["weights/final"] is None and lifetimes["sampler_weights/final"] is None
    # ckpt_path="last" resumes from the newest committed training checkpoint of the run
    resumed = LoRAModule(**MODULE_KWARGS)
    trainer = make_trainer(
        LoRACheckpointIO(root=str(tmp_path), run_id="run"), max_steps=12, callbacks=[PeriodicCheckpoint(kind="state")]
    )
    trainer.fit(resumed, batch_loader(4), ckpt_path="last")
    assert trainer.global_step == 12
    assert ids(store, "run")["weights/final"] == 12  # the final checkpoint is replaced


def test_time_based_saves_are_agreed_and_named_by_step(tmp_path: Path) -> None:
    class Slow(L.Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            time.sleep(0.06)

    io = LoRACheckpointIO(root=str(tmp_path), run_id="run")
    saver = PeriodicCheckpoint(every_n_seconds=0.25, kind="sampler", save_final=False)
    make_trainer(io, max_steps=8, callbacks=[Slow(), saver]).fit(LoRAModule(**MODULE_KWARGS), batch_loader(4))
    names = set(ids(CheckpointStore(str(tmp_path)), "run"))
    assert names and names <= {f"sampler_weights/{s:06d}" for s in range(1, 9)} and len(names) < 8


def test_failed_write_keeps_the_checkpoint_it_would_replace() -> None:
    FailingMemoryFS.writes_left = 100
    io = LoRACheckpointIO(root="failingmem://replace", run_id="run", async_save=True)
    io.save_checkpoint(fake_checkpoint(1), "rolling-000001")
    io.wait()
    FailingMemoryFS.writes_left = 2  # the next save fails part-way
    io.save_checkpoint(fake_checkpoint(2), "rolling-000002")
    io.remove_checkpoint("rolling-000001")
    with pytest.raises(OSError, match="injected upload failure"):
        io.wait()
    FailingMemoryFS.writes_left = 100
    assert ids(CheckpointStore("failingmem://replace"), "run") == {"weights/rolling-000001": 1}


def test_invalid_settings_and_lightning_checkpoint_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kind must be one of"):
        PeriodicCheckpoint(kind="weights")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="keep_last must be positive"):
        PeriodicCheckpoint(keep_last=0)
    with pytest.raises(ValueError, match="A TTL must be positive"):
        CheckpointTTL(periodic_ttl="0s")
    # Lightning's default ModelCheckpoint names are checkpoint names as they are, beside PeriodicCheckpoint.
    io = LoRACheckpointIO(root=str(tmp_path), run_id="run")
    saver = PeriodicCheckpoint(every_n_train_steps=1, kind="sampler", save_final=False)
    make_trainer(io, max_epochs=1, callbacks=[saver], enable_checkpointing=True).fit(
        LoRAModule(**MODULE_KWARGS), batch_loader(1)
    )
    assert set(ids(CheckpointStore(str(tmp_path)), "run")) == {"sampler_weights/000001", "weights/epoch=0-step=1"}


AUTORESUME_CHILD = textwrap.dedent(
    """
    import sys, time
    import lightning as L
    sys.path.insert(0, sys.argv[1])
    from helpers.resume import train
    from lightning_lora_ckpt import LoRACheckpointIO, PeriodicCheckpoint

    class Slow(L.Callback):
        def on_train_batch_end(self, *args):
            time.sleep(float(sys.argv[3]))

    io = LoRACheckpointIO(root=sys.argv[2], run_id="auto")
    saver = PeriodicCheckpoint(kind="state", rolling_every_n_steps=2, save_final=True)
    module, _ = train(io, ckpt_path="last", callbacks=[saver, Slow()], stateful=True)
    io.teardown()
    print("done", flush=True)
    """
)


def test_sigkill_then_ckpt_path_last_reaches_the_uninterrupted_adapter(tmp_path: Path) -> None:
    expected, _ = train(LoRACheckpointIO(root=str(tmp_path / "straight"), run_id="s"), stateful=True)
    root = str(tmp_path / "auto")
    args = [sys.executable, "-c", AUTORESUME_CHILD, str(Path(__file__).parent), root]
    child = subprocess.Popen([*args, "0.3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    store = CheckpointStore(root)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        last = store.last_checkpoint("auto") if (Path(root) / "auto" / "run.json").exists() else None
        if last and last.step >= 6:
            break
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    killed_at = store.last_checkpoint("auto").step
    assert 6 <= killed_at < 16
    done = subprocess.run([*args, "0"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "done" in done.stdout, done.stderr[-2000:]
    final = LoRAModule.from_checkpoint("lora://auto/weights/final", root=root, dropout=0.1)
    assert store.get("lora://auto/weights/final").step == 16
    want = expected.adapter_state_dict()
    assert all(torch.equal(want[k], v) for k, v in final.adapter_state_dict().items())
    assert json.dumps(sorted(ids(store, "auto"))) == json.dumps(["weights/final", "weights/rolling-000016"])


def test_a_rolling_checkpoint_a_kill_left_is_deleted_on_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process killed between a rolling save and the deletion of the one it replaces: the resume deletes it."""
    with monkeypatch.context() as patched:  # the first fit "dies" before any rolling deletion runs
        patched.setattr(LoRACheckpointIO, "remove_checkpoint", lambda self, path: None)
        io = LoRACheckpointIO(root=str(tmp_path), run_id="run", async_save=False)
        saver = PeriodicCheckpoint(rolling_every_n_steps=2, save_final=False)
        make_trainer(io, max_steps=4, callbacks=[saver]).fit(LoRAModule(**MODULE_KWARGS), batch_loader())
    store = CheckpointStore(str(tmp_path))
    assert sorted(ids(store, "run")) == ["weights/rolling-000002", "weights/rolling-000004"]
    io = LoRACheckpointIO(root=str(tmp_path), run_id="run", async_save=False)
    saver = PeriodicCheckpoint(rolling_every_n_steps=2, save_final=False)
    make_trainer(io, max_steps=6, callbacks=[saver]).fit(LoRAModule(**MODULE_KWARGS), batch_loader(), ckpt_path="last")
    assert sorted(ids(store, "run")) == ["weights/rolling-000006"]
