"""LoRACheckpointIO: layout, contents, integrity, atomicity and errors."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import pytest
import safetensors.torch
import torch
from fsspec.implementations.memory import MemoryFileSystem

from helpers.storage import FailingMemoryFS
from helpers.training import MODULE_KWARGS, batch_loader, make_trainer
from lightning_lora_ckpt import CheckpointFormatError, CheckpointStore, LoRACheckpointIO, LoRAModule
from lightning_lora_ckpt.format.manifest import Manifest
from lightning_lora_ckpt.storage.read import read_files, read_manifest

LORA_TARGETS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]
ADAPTER_KEYS = {
    f"base_model.model.model.layers.{layer}.{target}.lora_{ab}.weight"
    for layer in range(2)
    for target in LORA_TARGETS
    for ab in "AB"
}


def test_layout_and_exact_tensor_sets(trained) -> None:
    module, io, _ = trained
    sampler, training = module.save_weights_for_sampler("s"), module.save_state("t")
    root = Path(io.root)
    assert sampler == str(root / "run" / "sampler_weights" / "s")
    assert training == str(root / "run" / "weights" / "t")
    assert sorted(os.listdir(sampler)) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "checkpoint.json",
    ]
    assert sorted(os.listdir(training)) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "checkpoint.json",
        "training_state.json",
        "training_state.safetensors",
    ]
    assert json.loads((root / "run" / "run.json").read_text())["base_model"] == "tiny-qwen3"
    for ckpt in (sampler, training):
        assert set(safetensors.torch.load_file(f"{ckpt}/adapter_model.safetensors")) == ADAPTER_KEYS
    state = safetensors.torch.load_file(f"{training}/training_state.safetensors")
    moments = {
        f"optimizer_states.0.state.{i}.{k}" for i in range(len(ADAPTER_KEYS)) for k in ("step", "exp_avg", "exp_avg_sq")
    }
    assert set(state) == moments | {"rng_states.torch", "rng_states.numpy.1"}
    base_numel = {p.numel() for n, p in module.named_parameters() if "lora_" not in n}
    assert not any(t.numel() in base_numel and t.numel() > 64 for t in state.values())
    config = json.loads(Path(sampler, "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["base_model_name_or_path"] == "tiny-qwen3"
    manifest = read_manifest(training)
    assert manifest.checkpoint_type == "training" and manifest.step == 4 and manifest.lora_rank == 4
    assert manifest.base_model.name_or_path == "tiny-qwen3" and len(manifest.base_model.fingerprint) == 64


def test_no_file_is_a_pickle_and_loading_never_unpickles(trained, monkeypatch) -> None:
    module, io, _trainer = trained
    uri = module.save_state("t")
    for name in os.listdir(uri):
        head = Path(uri, name).read_bytes()[:2]
        assert head not in (b"\x80\x02", b"\x80\x04", b"\x80\x05", b"PK"), name

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used while loading a checkpoint")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    checkpoint = io.load_checkpoint(uri)
    assert checkpoint["global_step"] == 4 and set(checkpoint["state_dict"]) == ADAPTER_KEYS


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("flip:adapter_model.safetensors", "adapter_model.safetensors has"),
        ("truncate:training_state.safetensors", "training_state.safetensors has"),
        ("delete:training_state.json", "training_state.json is missing"),
        ("delete:checkpoint.json", "checkpoint.json is missing"),
        ("garbage:checkpoint.json", "not JSON"),
    ],
)
def test_damaged_checkpoints_fail_clearly(trained, damage: str, message: str) -> None:
    module, io, _ = trained
    uri = module.save_state("t")
    action, name = damage.split(":")
    path = Path(uri, name)
    data = path.read_bytes()
    if action == "flip":
        path.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])
    elif action == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif action == "delete":
        path.unlink()
    else:
        path.write_bytes(b"{not json")
    with pytest.raises(CheckpointFormatError, match=message):
        io.load_checkpoint(uri)
    if not name.startswith("training_state"):  # a weights-only start reads only the adapter and manifest
        with pytest.raises(CheckpointFormatError):
            LoRAModule.from_checkpoint(uri)


def test_memory_filesystem_roundtrip() -> None:
    MemoryFileSystem.store.clear()
    io = LoRACheckpointIO(root="memory://ckpts", run_id="mem", async_save=True)
    module = LoRAModule(**MODULE_KWARGS)
    trainer = make_trainer(io, max_steps=2)
    trainer.fit(module, batch_loader(2))
    uri = module.save_state("t", ttl_seconds=60)
    io.wait()
    assert uri == "memory://ckpts/mem/weights/t"
    restored = io.load_checkpoint("lora://mem/weights/t")
    assert restored["global_step"] == 2
    [checkpoint] = CheckpointStore("memory://ckpts").list_checkpoints("mem")
    assert checkpoint.checkpoint_id == "weights/t"
    assert timedelta(seconds=59) < checkpoint.expires_at - checkpoint.time <= timedelta(seconds=60)


def test_failed_upload_leaves_no_visible_checkpoint_and_surfaces_the_error(trained) -> None:
    module, _, trainer = trained
    io = LoRACheckpointIO(root="failingmem://bucket", run_id="run", async_save=True)
    checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
    module.adapter_binding.to_checkpoint(checkpoint)  # what the trainer's own plugin does with the dict
    for writes in range(5):  # fail at every point: run.json, each file, the manifest
        FailingMemoryFS.writes_left = writes
        io.save_checkpoint(checkpoint, f"t{writes}")
        with pytest.raises(OSError, match="injected upload failure"):
            io.wait()
        assert CheckpointStore("failingmem://bucket").list_checkpoints("run") == [] if writes else True
        with pytest.raises(CheckpointFormatError, match="missing"):
            io.load_checkpoint(f"t{writes}")
    FailingMemoryFS.writes_left = 100
    io.save_checkpoint(checkpoint, "t0")  # retrying over the leftovers of a failed save works
    io.wait()
    assert [c.checkpoint_id for c in CheckpointStore("failingmem://bucket").list_checkpoints("run")] == ["weights/t0"]


def test_async_errors_surface_on_next_save_and_teardown(trained) -> None:
    module, _, trainer = trained
    io = LoRACheckpointIO(root=trainer.strategy.checkpoint_io.root, run_id="async", async_save=True)
    checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
    module.adapter_binding.to_checkpoint(checkpoint)  # what the trainer's own plugin does with the dict
    keep = {"overwrite": False}
    io.save_checkpoint(checkpoint, "dup", keep)
    io.save_checkpoint(checkpoint, "dup", keep)  # committed in order: the second finds the first and fails
    time.sleep(0.5)
    with pytest.raises(RuntimeError, match="already exists"):
        io.save_checkpoint(checkpoint, "other")
    io.save_checkpoint(checkpoint, "dup", keep)
    with pytest.raises(FileExistsError):
        io.teardown()


def test_refusals(trained, tmp_path) -> None:
    module, io, trainer = trained
    module.save_state("t")
    with pytest.raises(FileExistsError, match=r"already exists.*'overwrite': True"):
        trainer.save_checkpoint("t", storage_options={"overwrite": False})
    with pytest.raises(ValueError, match="Invalid checkpoint name"):
        module.save_state("../escape")
    with pytest.raises(ValueError, match="folder is for training checkpoints"):
        trainer.save_checkpoint(f"{io.root}/run/weights/x", weights_only=True)
    with pytest.raises(ValueError, match="ttl_seconds must be a positive"):
        trainer.save_checkpoint("x", storage_options={"ttl_seconds": 0})
    with pytest.raises(ValueError, match="Unknown storage_options"):
        trainer.save_checkpoint("x", storage_options={"tll_seconds": 5})
    with pytest.raises(ValueError, match="user_metadata must be JSON"):
        trainer.save_checkpoint("x", storage_options={"user_metadata": {"a": object()}})


def test_user_metadata_and_ttl_in_manifest(trained) -> None:
    module, io, trainer = trained
    module.user_metadata = {"experiment": "a"}
    trainer.save_checkpoint("m", storage_options={"ttl_seconds": 3600, "user_metadata": {"note": "x"}})
    manifest = read_manifest(io.resolve("m", "training"))
    assert manifest.user_metadata == {"experiment": "a", "note": "x"}
    assert manifest.expires_at - manifest.created_at == timedelta(hours=1)
    Manifest.from_json(manifest.to_json(), "roundtrip")  # the written form parses back


CRASH_CHILD = textwrap.dedent(
    """
    import sys, torch
    from lightning_lora_ckpt import LoRACheckpointIO
    io = LoRACheckpointIO(root=sys.argv[1], run_id="crash", async_save=False)
    lora = {"adapter_config": {"r": 4}, "base_model": {"name_or_path": "x", "fingerprint": "f"}}
    big = {f"w{i}": torch.randn(256, 1024) for i in range(4)}
    print("ready", flush=True)
    for i in range(10000):
        io.save_checkpoint({"state_dict": big, "lora_ckpt": lora, "optimizer_states": [big], "global_step": i},
                           f"{i:06d}")
    """
)


def test_killed_writer_never_leaves_a_damaged_visible_checkpoint(tmp_path) -> None:
    for trial, delay in enumerate((0.3, 0.9, 1.7)):
        root = tmp_path / f"trial{trial}"
        child = subprocess.Popen([sys.executable, "-c", CRASH_CHILD, str(root)], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(delay)
        child.kill()
        child.wait()
        for checkpoint in CheckpointStore(str(root)).list_checkpoints("crash"):
            manifest = read_manifest(checkpoint.path)
            read_files(checkpoint.path, manifest, list(manifest.files))  # verifies sizes and sha256
        weights = root / "crash" / "weights"  # absent if it was killed before its first commit began
        leftovers = [n for n in os.listdir(weights) if n.startswith(".")] if weights.exists() else []
        assert all(".tmp-" in n for n in leftovers)


@pytest.mark.parametrize("sampler_dtype", [None, "float32"])
def test_sampler_weights_are_stored_at_serving_precision(tmp_path: Path, sampler_dtype: str | None) -> None:
    io = LoRACheckpointIO(root=str(tmp_path), run_id="run", async_save=False)
    module = LoRAModule(**{**MODULE_KWARGS, "dtype": "bfloat16", "sampler_dtype": sampler_dtype})
    make_trainer(io, max_steps=2).fit(module, batch_loader(2))
    sampler, training = module.save_weights_for_sampler("s"), module.save_state("t")
    served = safetensors.torch.load_file(f"{sampler}/adapter_model.safetensors")
    exact = safetensors.torch.load_file(f"{training}/adapter_model.safetensors")
    assert {t.dtype for t in exact.values()} == {torch.float32}  # training state: the adapter as trained
    want = torch.bfloat16 if sampler_dtype is None else torch.float32
    assert {t.dtype for t in served.values()} == {want}
    assert all(torch.equal(served[k], exact[k].to(want)) for k in exact)
    loaded = LoRAModule.from_checkpoint(sampler).adapter_state_dict()  # loads into the float32 adapter
    assert all(torch.equal(loaded[k], served[k].float()) for k in served)


def test_async_saves_hold_the_state_of_their_step_while_training_goes_on(tmp_path: Path, monkeypatch) -> None:
    """The copy runs beside the next step (slowed down here); that step's update waits for it."""
    from lightning.pytorch.callbacks import Callback

    from lightning_lora_ckpt.format.payload import CheckpointPayload

    stage = CheckpointPayload.map_tensors

    def slow_stage(self: CheckpointPayload, fn) -> None:
        time.sleep(0.3)  # far longer than a tiny training step: without the wait the next update lands first
        stage(self, fn)

    monkeypatch.setattr(CheckpointPayload, "map_tensors", slow_stage)
    expected: dict[int, dict[str, torch.Tensor]] = {}

    class SaveEveryStep(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            expected[trainer.global_step] = {k: v.clone() for k, v in module.adapter_state_dict().items()}
            module.save_state(f"step-{trainer.global_step}")

    io = LoRACheckpointIO(root=str(tmp_path), run_id="run", async_save=True)
    module = LoRAModule(**MODULE_KWARGS)
    make_trainer(io, max_steps=4, callbacks=[SaveEveryStep()]).fit(module, batch_loader(4))
    assert sorted(expected) == [1, 2, 3, 4]
    assert not torch.equal(
        *(expected[s]["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] for s in (1, 4))
    )
    for step, adapter in expected.items():
        saved = io.load_checkpoint(f"step-{step}")
        assert saved["global_step"] == step
        assert all(torch.equal(saved["state_dict"][k], adapter[k]) for k in adapter), f"step {step}"
