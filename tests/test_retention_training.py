"""Retention and metrics in real training runs: ``PeriodicCheckpoint(retention=...)`` soft-deletes exactly what its
rules do not keep, from its own periodic checkpoints only; every checkpoint records the logged metrics; the rules
come from YAML; ``LoRAModule(init_from=...)`` and the resume order."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from helpers.resume import adapter
from helpers.training import MODULE_KWARGS, batch_loader, make_trainer
from lightning_lora_ckpt import CheckpointStore, LoRACheckpointIO, LoRAModule, PeriodicCheckpoint
from lightning_lora_ckpt.policy.retention import KeepBest, KeepEvery, KeepLatest

REPO = Path(__file__).resolve().parents[1]
#: The val_loss the module logs in the validation after each step: the checkpoint of step s (saved before that
#: step's validation) records SCRIPT[s - 1], so step 3's checkpoint is the best (1.0) and step 1's has none.
SCRIPT = {1: 3.0, 2: 1.0, 3: 2.5, 4: 4.0, 5: 5.0, 6: 6.0}


class ScriptedValLoss(LoRAModule):
    """The tiny LoRAModule, whose validation logs the scripted val_loss of the step it follows."""

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", SCRIPT[self.global_step], batch_size=1)


class PinAt(L.Callback):
    """Pins a committed checkpoint once ``step`` has been saved (after the saver, which comes first)."""

    def __init__(self, io: LoRACheckpointIO, step: int, uri: str) -> None:
        self.io, self.step, self.uri = io, step, uri

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            self.io.wait()
            CheckpointStore(self.io.root).pin(self.uri)


def listed(store: CheckpointStore, run_id: str = "run") -> dict[str, int]:
    return {c.checkpoint_id: c.step for c in store.list_checkpoints(run_id)}


def both(*steps: int) -> set[str]:
    return {f"{kind}/{s:06d}" for s in steps for kind in ("weights", "sampler_weights")}


@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
def test_retention_keeps_the_latest_and_the_best_and_soft_deletes_the_rest(tmp_path: Path, async_save: bool) -> None:
    root = str(tmp_path)
    io = LoRACheckpointIO(root=root, run_id="run", async_save=async_save)
    saver = PeriodicCheckpoint(
        every_n_train_steps=1, kind="both", rolling_every_n_steps=4, retention=KeepLatest(2) | KeepBest("val_loss", 1)
    )
    trainer = make_trainer(
        io,
        max_steps=6,
        val_check_interval=1,
        limit_val_batches=1,
        callbacks=[saver, PinAt(io, 1, "lora://run/weights/000001")],
    )
    trainer.fit(ScriptedValLoss(**MODULE_KWARGS), batch_loader(8), batch_loader(1))
    store = CheckpointStore(root)
    # the latest two steps (5, 6), the best (3: val_loss 1.0), the pinned training checkpoint of step 1 (its step's
    # sampler checkpoint goes), and what is not this callback's periodic checkpoints: final (and no rolling one:
    # step 4's periodic training checkpoint is its rolling save)
    assert set(listed(store)) == both(3, 5, 6) | {"weights/000001", "weights/final", "sampler_weights/final"}
    assert store.get("lora://run/weights/000001").pinned
    kept = {c.checkpoint_id: c for c in store.list_checkpoints("run")}
    for step in (3, 5, 6):
        for kind in ("weights", "sampler_weights"):
            metrics = kept[f"{kind}/{step:06d}"].metrics
            assert metrics["val_loss"] == SCRIPT[step - 1] and "train_loss" in metrics, metrics
    if not async_save:  # names found retired leave its scope (and its state) at the next step
        assert saver.saved["training"] == ["000001", "000003", "000004", "000005", "000006"]
    assert "val_loss" not in kept["weights/000001"].metrics  # no validation before step 1's save
    assert kept["weights/final"].metrics["val_loss"] == SCRIPT[6]  # final is saved after the last validation
    # soft-deleted, not gone: each comes back as it was
    retired = {d.checkpoint.checkpoint_id for d in store.deleted("run")}
    assert retired == both(2, 4) | {"sampler_weights/000001"}
    if not hasattr(store, "restore"):
        pytest.skip("CheckpointStore.restore is not there yet")
    for checkpoint_id in sorted(retired):
        restored = store.restore(f"lora://run/{checkpoint_id}")
        assert store.verify(restored.path).ok
    assert set(listed(store)) == both(1, 2, 3, 4, 5, 6) | {"weights/final", "sampler_weights/final"}


def test_retention_judges_only_its_own_periodic_checkpoints(tmp_path: Path) -> None:
    """Another callback's checkpoints in the same folders, and an earlier fit's, are out of its scope."""
    root = str(tmp_path)
    io = LoRACheckpointIO(root=root, run_id="run")
    sampler_saver = PeriodicCheckpoint(every_n_train_steps=1, kind="sampler", save_final=False)
    make_trainer(io, max_steps=3, callbacks=[sampler_saver]).fit(LoRAModule(**MODULE_KWARGS), batch_loader(8))
    state_saver = PeriodicCheckpoint(every_n_train_steps=1, kind="state", save_final=False, retention=[KeepLatest(1)])
    io = LoRACheckpointIO(root=root, run_id="run")
    make_trainer(io, max_steps=3, callbacks=[state_saver]).fit(LoRAModule(**MODULE_KWARGS), batch_loader(8))
    assert set(listed(CheckpointStore(root))) == {f"sampler_weights/{s:06d}" for s in (1, 2, 3)} | {"weights/000003"}


def test_retention_settings() -> None:
    assert PeriodicCheckpoint(retention=[KeepLatest(2), KeepEvery(10)]).retention == KeepLatest(2) | KeepEvery(10)
    with pytest.raises(ValueError, match="keep_last or retention, not both"):
        PeriodicCheckpoint(keep_last=2, retention=KeepLatest(2))
    with pytest.raises(ValueError, match="retention must be a Retention rule"):
        PeriodicCheckpoint(retention=[])
    with pytest.raises(ValueError, match="retention must be a Retention rule"):
        PeriodicCheckpoint(retention="latest")  # type: ignore[arg-type]


def test_metrics_are_scalar_finite_floats(tmp_path: Path) -> None:
    class Logs(LoRAModule):
        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            self.log("an_int", 3)
            self.log("not_finite", float("nan"))
            self.log("a_tensor", torch.tensor(0.5))
            return super().training_step(batch, batch_idx)

    io = LoRACheckpointIO(root=str(tmp_path), run_id="run")
    trainer = make_trainer(io, max_steps=2)
    trainer.fit(Logs(**MODULE_KWARGS), batch_loader(4))
    trainer.save_checkpoint("after", weights_only=True)  # after fit: the last logged values
    metrics = CheckpointStore(str(tmp_path)).get("lora://run/sampler_weights/after").metrics
    assert set(metrics) == {"an_int", "a_tensor", "train_loss"} and metrics["an_int"] == 3.0
    assert all(type(v) is float for v in metrics.values())


YAML = """
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 3
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  plugins:
    - class_path: lightning_lora_ckpt.LoRACheckpointIO
      init_args: {{root: {root}, run_id: yaml}}
  callbacks:
    - class_path: lightning_lora_ckpt.PeriodicCheckpoint
      init_args:
        every_n_train_steps: 1
        kind: sampler
        save_final: false
        retention:
          - class_path: lightning_lora_ckpt.policy.retention.KeepLatest
            init_args: {{n: 1}}
          - class_path: lightning_lora_ckpt.policy.retention.KeepEvery
            init_args: {{n_steps: 2}}
model:
  class_path: lightning_lora_ckpt.LoRAModule
  init_args: {{base_model: tiny-qwen3, rank: 4, alpha: 8, learning_rate: 0.0, init_from: "lora://run/sampler_weights/start"}}
data:
  class_path: lightning_lora_ckpt.JSONLDataModule
  init_args: {{train_file: {repo}/examples/data/demo_train.jsonl, batch_size: 2, max_length: 32}}
"""


def test_retention_and_init_from_from_yaml(tmp_path: Path) -> None:
    root = tmp_path / "ckpts"
    start = LoRAModule(**{**MODULE_KWARGS, "seed": 7})
    io = LoRACheckpointIO(root=str(root), run_id="run")
    make_trainer(io, max_steps=1).fit(start, batch_loader(1))
    start.save_weights_for_sampler("start")
    (tmp_path / "fit.yaml").write_text(YAML.format(root=root, repo=REPO))
    command = [sys.executable, "-m", "lightning_lora_ckpt", "fit", "-c", str(tmp_path / "fit.yaml")]
    out = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    store = CheckpointStore(str(root))
    assert set(listed(store, "yaml")) == {"sampler_weights/000002", "sampler_weights/000003"}  # KeepEvery(2) | latest
    # learning_rate 0: the adapter is still the one init_from loaded
    assert _same(_sampler_adapter(store, "lora://yaml/sampler_weights/000003"), adapter(start))


def _sampler_adapter(store: CheckpointStore, uri: str) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in LoRAModule.from_checkpoint(uri, root=store.root).adapter_state_dict().items()}


# -- init_from and the resume order ---------------------------------------------------------------------
@pytest.fixture
def init_source(tmp_path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """A sampler checkpoint of an adapter trained from another seed, and its tensors."""
    module = LoRAModule(**{**MODULE_KWARGS, "seed": 3})
    make_trainer(LoRACheckpointIO(root=str(tmp_path), run_id="source"), max_steps=2).fit(module, batch_loader(2))
    uri = module.save_weights_for_sampler("init")
    return uri, adapter(module)


class FirstStep(L.Callback):
    """The adapter and step when training starts (after any restore)."""

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.step, self.adapter = trainer.global_step, adapter(pl_module)


def start(tmp_path: Path, init_from: str | None, ckpt_path: str | None, max_steps: int = 2) -> FirstStep:
    first = FirstStep()
    saver = PeriodicCheckpoint(every_n_train_steps=1, kind="state", save_final=False)
    io = LoRACheckpointIO(root=str(tmp_path), run_id="run")
    trainer = make_trainer(io, max_steps=max_steps, callbacks=[first, saver])
    trainer.fit(LoRAModule(**MODULE_KWARGS, init_from=init_from), batch_loader(4), ckpt_path=ckpt_path)
    return first


def test_resume_order_last_then_init_from_then_fresh(
    tmp_path: Path, init_source: tuple[str, dict[str, torch.Tensor]], caplog: pytest.LogCaptureFixture
) -> None:
    uri, init_adapter = init_source
    fresh = adapter(LoRAModule(**MODULE_KWARGS))
    caplog.set_level(logging.INFO, logger="lightning_lora_ckpt")
    # no committed training checkpoint in the run yet: ckpt_path="last" falls through to init_from
    first = start(tmp_path, uri, "last")
    assert first.step == 0 and _same(first.adapter, init_adapter) and not _same(first.adapter, fresh)
    assert f"LoRAModule: starting from the weights of {uri} (init_from)" in caplog.messages
    # the run has one now (000002): ckpt_path="last" wins, init_from is not even opened
    caplog.clear()
    trained = adapter(LoRAModule.from_checkpoint("lora://run/weights/000002", root=str(tmp_path)))
    first = start(tmp_path, str(tmp_path / "missing"), "last", max_steps=3)
    assert first.step == 2 and _same(first.adapter, trained)
    assert any(m.startswith("LoRAModule: resuming from") and "weights/000002" in m for m in caplog.messages)
    # an explicit ckpt_path wins over the newest one
    caplog.clear()
    explicit = adapter(LoRAModule.from_checkpoint("lora://run/weights/000001", root=str(tmp_path)))
    first = start(tmp_path, uri, "lora://run/weights/000001", max_steps=2)
    assert first.step == 1 and _same(first.adapter, explicit)
    assert "LoRAModule: resuming from lora://run/weights/000001" in caplog.messages
    # nothing at all: fresh
    caplog.clear()
    first = start(tmp_path / "other", None, None)
    assert first.step == 0 and _same(first.adapter, fresh) and "LoRAModule: starting fresh" in caplog.messages


def test_init_from_a_training_checkpoint_is_weights_only_and_kept_in_hparams(
    tmp_path: Path,
) -> None:
    module = LoRAModule(**{**MODULE_KWARGS, "seed": 3})
    io = LoRACheckpointIO(root=str(tmp_path), run_id="source2")
    make_trainer(io, max_steps=2).fit(module, batch_loader(2))
    training_uri = module.save_state("state")
    first = start(tmp_path, training_uri, None)
    assert first.step == 0 and _same(first.adapter, adapter(module))  # optimizer fresh, step 0
    rebuilt = LoRAModule.from_checkpoint("lora://run/weights/000002", with_optimizer=True, root=str(tmp_path))
    assert rebuilt.hparams.init_from == training_uri  # recorded in the hyperparameters
    trained, first = adapter(rebuilt), FirstStep()
    make_trainer(LoRACheckpointIO(root=str(tmp_path), run_id="more"), max_steps=1, callbacks=[first]).fit(
        rebuilt, batch_loader(1)
    )
    assert _same(first.adapter, trained) and not _same(trained, adapter(module))  # not applied over loaded weights
    with pytest.raises(ValueError, match=r"rank|differ|r="):
        start(tmp_path / "bad", _other_rank_checkpoint(tmp_path), None)


def _other_rank_checkpoint(tmp_path: Path) -> str:
    module = LoRAModule(**{**MODULE_KWARGS, "rank": 2})
    make_trainer(LoRACheckpointIO(root=str(tmp_path), run_id="rank2"), max_steps=1).fit(module, batch_loader(1))
    return module.save_weights_for_sampler("r2")


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
