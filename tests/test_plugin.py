"""``plugins=[LoRACheckpointIO(...)]`` and nothing else, with a user's own LightningModule (not LoRAModule):
Lightning's ModelCheckpoint (default and configured), ``ckpt_path="best"``/``"last"``, exact resume in a new
process, replacing names, refusals at the start of fit, Fabric, and LoRAModule's Lightning habits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import peft
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from safetensors.torch import load_file

from helpers.training import MODULE_KWARGS, batch_loader, make_trainer
from helpers.user_module import UserLoRAModule, data, digest, trainer
from lightning_lora_ckpt import (
    CheckpointConflictError,
    CheckpointStore,
    LoRACheckpointIO,
    LoRAModule,
    StateEncodingError,
    load_base_model,
)

TESTS = Path(__file__).parent


def ids(root: Path, run_id: str = "u") -> list[str]:
    return sorted(c.checkpoint_id for c in CheckpointStore(str(root)).list_checkpoints(run_id))


def test_default_model_checkpoint_writes_through_the_plugin(tmp_path: Path) -> None:
    io = LoRACheckpointIO(root=str(tmp_path), run_id="u", async_save=False)
    trainer(io, max_epochs=1).fit(UserLoRAModule(), data(4))
    assert ids(tmp_path) == ["weights/epoch=0-step=4"]
    manifest = CheckpointStore(str(tmp_path)).manifest("lora://u/weights/epoch=0-step=4")
    assert manifest.base_model.name_or_path == "tiny-qwen3" and manifest.lora_rank == 4
    files = set(os.listdir(tmp_path / "u" / "weights" / "epoch=0-step=4"))
    assert files == {"adapter_model.safetensors", "adapter_config.json", "checkpoint.json", "training_state.json",
                     "training_state.safetensors"}  # fmt: skip
    assert peft.PeftModel.from_pretrained(
        load_base_model("tiny-qwen3"), str(tmp_path / "u" / "weights" / "epoch=0-step=4")
    )


def test_saves_and_resumes_never_walk_the_frozen_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The strategy hands the plugin the bound tensors by name and restores them by name: neither ``state_dict()``
    nor ``load_state_dict()`` of the whole model (walks over every module of the frozen base) is called, and the
    checkpoint and the resumed adapter are the same."""
    module = UserLoRAModule()
    walks: list[str] = []
    for method in ("state_dict", "load_state_dict"):
        original = getattr(torch.nn.Module, method)

        def counting(
            self: torch.nn.Module, *args: object, _m: str = method, _f: object = original, **kw: object
        ) -> object:
            if isinstance(self, UserLoRAModule):
                walks.append(_m)
            return _f(self, *args, **kw)  # type: ignore[operator]

        monkeypatch.setattr(torch.nn.Module, method, counting)
    trainer(LoRACheckpointIO(root=str(tmp_path), run_id="u", async_save=False), max_epochs=1).fit(module, data(2))
    assert walks == [] and ids(tmp_path) == ["weights/epoch=0-step=2"]
    folder = tmp_path / "u" / "weights" / "epoch=0-step=2"
    saved = load_file(folder / "adapter_model.safetensors")
    expected = peft.get_peft_model_state_dict(module.net)
    assert sorted(saved) == sorted(expected) and all(torch.equal(saved[k], expected[k]) for k in saved)
    resumed = UserLoRAModule()
    io = LoRACheckpointIO(root=str(tmp_path), run_id="u", async_save=False)
    restored: list[dict[str, torch.Tensor]] = []
    resumed.on_train_start = lambda: restored.append(  # type: ignore[method-assign]
        {k: v.clone() for k, v in peft.get_peft_model_state_dict(resumed.net).items()}
    )
    second = trainer(io, max_epochs=2)
    second.fit(resumed, data(2), ckpt_path=str(folder))
    assert walks == [] and all(torch.equal(restored[0][k], saved[k]) for k in saved)
    second.strategy.checkpoint_io = TorchCheckpointIO()  # the plugin swapped out: Lightning's own whole state_dict
    second.save_checkpoint(tmp_path / "plain.ckpt")
    plain = torch.load(tmp_path / "plain.ckpt", weights_only=False)["state_dict"]
    assert walks == ["state_dict"] and len(plain) > len(saved) and "net.base_model.model.lm_head.weight" in plain


def test_top_k_by_val_loss_with_save_last_then_best_and_last(tmp_path: Path) -> None:
    io = LoRACheckpointIO(root=str(tmp_path), run_id="u", async_save=False)
    callback = ModelCheckpoint(monitor="val_loss", save_top_k=2, save_last=True, every_n_train_steps=2)
    module = UserLoRAModule()
    fit = trainer(io, max_steps=8, callbacks=[callback], val_check_interval=2, limit_val_batches=2)
    fit.fit(module, data(8), data(2, seed=1))
    kept = {Path(p).stem for p in callback.best_k_models}
    assert len(kept) == 2
    assert ids(tmp_path) == sorted(f"weights/{name}" for name in [*kept, "last"])  # top-k deletion went through
    assert Path(callback.best_model_path).stem in kept
    best = CheckpointStore(str(tmp_path)).get(f"lora://u/weights/{Path(callback.best_model_path).stem}")
    assert best.step in (2, 4, 6, 8)
    validated = fit.validate(module, data(2, seed=1), ckpt_path="best")[0]["val_loss"]
    assert validated == pytest.approx(float(callback.best_model_score), abs=1e-6)
    again = trainer(LoRACheckpointIO(root=str(tmp_path), run_id="u", async_save=False), max_steps=10)
    again.fit(UserLoRAModule(), data(8), ckpt_path="last")  # no ModelCheckpoint needed to find "last"
    assert again.global_step == 10


def test_save_last_link_and_several_model_checkpoints(tmp_path: Path) -> None:
    io = LoRACheckpointIO(root=str(tmp_path), run_id="u", async_save=False)
    every = ModelCheckpoint(every_n_train_steps=2, save_top_k=-1, save_last="link")
    sampler = ModelCheckpoint(every_n_train_steps=4, save_top_k=-1, save_weights_only=True, filename="s-{step}")
    trainer(io, max_steps=4, callbacks=[every, sampler]).fit(UserLoRAModule(), data(4))
    assert ids(tmp_path) == ["sampler_weights/s-step=4", "weights/epoch=0-step=2", "weights/epoch=0-step=4"]
    link = tmp_path / "u" / "weights" / "last.ckpt"
    assert link.is_symlink() and os.readlink(link) == "epoch=0-step=4.ckpt"
    assert io.load_checkpoint(str(link))["global_step"] == 4  # the link leads to the checkpoint it names
    hostile = tmp_path / "u" / "weights" / "other.ckpt"
    hostile.symlink_to("../../elsewhere/epoch=0-step=4.ckpt")
    with pytest.raises(ValueError, match="not to a checkpoint beside it"):
        io.load_checkpoint(str(hostile))


def test_exact_resume_in_a_new_process(tmp_path: Path) -> None:
    def job(run_id: str, steps: int, ckpt: str | None = None) -> str:
        args = [
            sys.executable,
            "-m",
            "helpers.user_module",
            str(tmp_path),
            run_id,
            str(steps),
            *([ckpt] if ckpt else []),
        ]
        out = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=TESTS)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout.strip().splitlines()[-1]

    straight = job("a", 8)
    job("b", 4)
    assert job("b", 8, "last") == straight  # dropout RNG, AdamW moments, StepLR and loops all restored


def test_saving_a_name_twice_replaces_it_but_never_a_published_one(tmp_path: Path) -> None:
    io = LoRACheckpointIO(root=str(tmp_path), run_id="u", async_save=False)
    fit = trainer(io, max_steps=2, enable_checkpointing=False)
    fit.fit(UserLoRAModule(), data(2))
    fit.save_checkpoint("x")
    first = CheckpointStore(str(tmp_path)).get("lora://u/weights/x").time
    fit.save_checkpoint("x")
    assert CheckpointStore(str(tmp_path)).get("lora://u/weights/x").time > first
    with pytest.raises(FileExistsError, match="already exists"):
        fit.save_checkpoint("x", storage_options={"overwrite": False})
    CheckpointStore(str(tmp_path)).publish("lora://u/weights/x")
    with pytest.raises(CheckpointConflictError, match=r"weights/x is published"):
        fit.save_checkpoint("x")


class NoAdapter(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 4)
        self.steps = 0

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.steps += 1
        return self.layer(batch).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_module_without_an_adapter_is_refused_before_any_step(tmp_path: Path) -> None:
    module = NoAdapter()
    with pytest.raises(ValueError, match=r"NoAdapter holds no peft.PeftModel.*get_peft_model"):
        trainer(LoRACheckpointIO(root=str(tmp_path)), max_steps=2).fit(module, torch.ones(4, 4))
    assert module.steps == 0
    # Without the plugin the callback stays out of the way.
    L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False).fit(
        NoAdapter(), torch.ones(4, 4)
    )


class UnencodableHparams(UserLoRAModule):
    def __init__(self, fn: object = print) -> None:
        super().__init__()
        self.save_hyperparameters()  # a function: Lightning would pickle it into its .ckpt
        self.steps = 0

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.steps += 1
        return super().training_step(batch, batch_idx)


def test_state_that_cannot_be_stored_is_refused_before_any_step(tmp_path: Path) -> None:
    module = UnencodableHparams()
    with pytest.raises(
        StateEncodingError,
        match=r"builtin_function_or_method at checkpoint key .hyper_parameters\.fn.*before the first training step",
    ):
        trainer(LoRACheckpointIO(root=str(tmp_path)), max_steps=2).fit(module, data(2))
    assert module.steps == 0


def test_several_adapters_or_modules_to_save_are_refused(tmp_path: Path) -> None:
    module = UserLoRAModule()
    module.net.add_adapter("other", peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"adapters \['default', 'other'\].*delete the others"):
        trainer(LoRACheckpointIO(root=str(tmp_path)), max_steps=1).fit(module, data(1))
    saving = UserLoRAModule()
    saving.net = peft.get_peft_model(
        load_base_model("tiny-qwen3"), peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    )
    with pytest.raises(ValueError, match="modules_to_save"):
        trainer(LoRACheckpointIO(root=str(tmp_path)), max_steps=1).fit(saving, data(1))


def test_fabric_save_and_load_round_trip(tmp_path: Path) -> None:
    io = LoRACheckpointIO(root=str(tmp_path), run_id="f", async_save=False)
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[io])

    def setup() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        module = UserLoRAModule(dropout=0.0)
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
        return fabric.setup(module, optimizer)

    def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> None:
        optimizer.zero_grad()
        fabric.backward(model.loss(batch))
        optimizer.step()

    batches = list(data(4))
    model, optimizer = setup()
    io.bind(model)  # the one extra call Fabric needs
    for batch in batches[:2]:
        step(model, optimizer, batch)
    fabric.save("lora://f/weights/two", {"model": model, "optimizer": optimizer, "step": 2})
    for batch in batches[2:]:
        step(model, optimizer, batch)
    expected = model.adapter()

    model2, optimizer2 = setup()
    io.bind(model2)
    state = {"model": model2, "optimizer": optimizer2, "step": 0}
    remainder = fabric.load(str(tmp_path / "f" / "weights" / "two"), state)
    assert state["step"] == 2 and "model" not in remainder
    assert CheckpointStore(str(tmp_path)).get("lora://f/weights/two").step == 2
    for batch in batches[2:]:
        step(model2, optimizer2, batch)
    got = model2.adapter()
    assert digest(got) == digest(expected)
    files = set(os.listdir(tmp_path / "f" / "weights" / "two"))
    assert "training_state.safetensors" in files  # the optimizer made it a training checkpoint
    fabric.save("lora://f/sampler_weights/w", {"model": model2})
    assert CheckpointStore(str(tmp_path)).get("lora://f/sampler_weights/w").checkpoint_type == "sampler"


def test_lora_module_load_from_checkpoint(trained) -> None:
    module, _io, _trainer = trained
    uri = module.save_state("lf")
    loaded = LoRAModule.load_from_checkpoint(uri)
    assert digest(loaded.adapter_state_dict()) == digest(module.adapter_state_dict())
    assert loaded.hparams.rank == module.hparams.rank


def test_lora_module_without_the_plugin_resumes_with_lightning_defaults(tmp_path: Path) -> None:
    module = LoRAModule(**MODULE_KWARGS)
    fit = make_trainer(None, max_steps=2, default_root_dir=str(tmp_path), enable_checkpointing=True)
    fit.fit(module, batch_loader(2))
    ckpt = next(tmp_path.rglob("*.ckpt"))
    again = make_trainer(None, max_steps=4, default_root_dir=str(tmp_path))
    again.fit(LoRAModule(**MODULE_KWARGS), batch_loader(4), ckpt_path=str(ckpt))  # weights_only load by default
    assert again.global_step == 4


def test_lightning_cli_with_a_users_module_by_class_path(tmp_path: Path) -> None:
    config = tmp_path / "user.yaml"
    config.write_text(
        f"""
seed_everything: 0
trainer:
  accelerator: cpu
  max_steps: 3
  logger: false
  enable_progress_bar: false
  plugins:
    - class_path: lightning_lora_ckpt.LoRACheckpointIO
      init_args: {{root: {tmp_path}, run_id: cli, async_save: false}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{every_n_train_steps: 3, save_top_k: -1}}
model:
  class_path: helpers.user_module.UserLoRAModule
  init_args: {{rank: 2}}
data:
  class_path: lightning_lora_ckpt.JSONLDataModule
  init_args: {{train_file: {TESTS.parent / "examples" / "data" / "demo_train.jsonl"}, tokenizer: tiny-qwen3, batch_size: 2}}
"""
    )
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run(
        [sys.executable, "-m", "lightning_lora_ckpt", "fit", "-c", str(config)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert ids(tmp_path, "cli") == ["weights/epoch=0-step=3"]
    assert CheckpointStore(str(tmp_path)).manifest("lora://cli/weights/epoch=0-step=3").lora_rank == 2
