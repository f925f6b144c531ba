"""merge_adapter and `lightning-lora-ckpt merge`: merged models against the PEFT adapter model they come from."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from helpers.training import MODULE_KWARGS, batch_loader, make_trainer, token_batches
from lightning_lora_ckpt import LoRACheckpointIO, LoRAModule, load_base_model, merge_adapter
from lightning_lora_ckpt.modeling.base import config_fingerprint
from lightning_lora_ckpt.tools import base_stream
from lightning_lora_ckpt.tools import export as export_module
from lightning_lora_ckpt.tools.cli import main

IDS = token_batches(1)[0]["input_ids"]


@torch.no_grad()
def model_logits(model: torch.nn.Module) -> torch.Tensor:
    return model.eval()(input_ids=IDS).logits.float()


def merged_logits(path: str | Path, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return model_logits(AutoModelForCausalLM.from_pretrained(path, dtype=dtype))


def saved_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(path, name)))
    return tensors


def train(base_model: str, io: LoRACheckpointIO, steps: int = 4, **kwargs: Any) -> LoRAModule:
    module = LoRAModule(**{**MODULE_KWARGS, "base_model": base_model, **kwargs})
    make_trainer(io, max_steps=steps).fit(module, batch_loader(steps))
    return module


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny-qwen3 adapter trained 4 steps: its sampler and training checkpoints and reference logits."""
    root = str(tmp_path_factory.mktemp("merge") / "ckpts")
    io = LoRACheckpointIO(root=root, run_id="run", async_save=False)
    module = train("tiny-qwen3", io)
    return {
        "root": root,
        "sampler": module.save_weights_for_sampler("s"),
        "training": module.save_state("t"),
        "adapter_logits": model_logits(module.model),
        "base_logits": model_logits(load_base_model("tiny-qwen3")),
    }


@pytest.fixture(scope="module")
def local_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-qwen3 saved as a local HF directory in several safetensors shards, with its tokenizer."""
    path = tmp_path_factory.mktemp("bases") / "tiny-qwen3"
    load_base_model("tiny-qwen3").save_pretrained(path, max_shard_size="100KB")
    LoRAModule(**MODULE_KWARGS).get_tokenizer().save_pretrained(path)
    return path


def test_fp32_merge_equals_the_adapter_model(ckpts: dict[str, Any], tmp_path: Path) -> None:
    out = merge_adapter(ckpts["sampler"], tmp_path / "merged", dtype="float32")
    assert out == str(tmp_path / "merged")
    files = set(os.listdir(out))
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= files
    assert "model.safetensors.index.json" not in files and "adapter_config.json" not in files
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["dtype"] == "float32" and config["architectures"] == ["Qwen3ForCausalLM"]
    tensors = saved_tensors(out)
    assert "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors  # tied embeddings
    assert not any("lora" in k for k in tensors)
    logits = merged_logits(out)
    torch.testing.assert_close(logits, ckpts["adapter_logits"], atol=1e-4, rtol=1e-4)
    assert (logits - ckpts["base_logits"]).abs().max() > 0.1  # the adapter was folded in
    assert AutoTokenizer.from_pretrained(out).vocab_size == LoRAModule(**MODULE_KWARGS).get_tokenizer().vocab_size


def test_bf16_merge_of_a_training_checkpoint_by_lora_uri(ckpts: dict[str, Any], tmp_path: Path) -> None:
    out = merge_adapter("lora://run/weights/t", tmp_path / "bf16", root=ckpts["root"])
    assert json.loads(Path(out, "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in saved_tensors(out).values()} == {torch.bfloat16}
    logits, adapter = merged_logits(out, torch.bfloat16), ckpts["adapter_logits"]
    error = (logits - adapter).norm() / adapter.norm()
    assert error < 0.03, error
    assert error < 0.25 * (ckpts["base_logits"] - adapter).norm() / adapter.norm()


def test_sharded_output_with_index_reloads(ckpts: dict[str, Any], tmp_path: Path) -> None:
    out = merge_adapter(ckpts["sampler"], tmp_path / "sharded", dtype="float32", max_shard_size="100KB")
    shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads(Path(out, "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    tensors = saved_tensors(out)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    for shard in shards:
        in_shard = [tensors[k] for k, f in index["weight_map"].items() if f == shard]
        assert len(in_shard) == 1 or sum(t.nbytes for t in in_shard) <= 100_000
    torch.testing.assert_close(merged_logits(out), ckpts["adapter_logits"], atol=1e-4, rtol=1e-4)


def test_base_from_a_local_directory_is_streamed_from_its_files(
    ckpts: dict[str, Any], local_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    io = LoRACheckpointIO(root=str(tmp_path / "ckpts"), run_id="local", async_save=False)
    module = train(str(local_base), io, steps=2)
    uri = module.save_weights_for_sampler("s")

    def no_in_memory_base(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a base with safetensors files must be streamed, not loaded")

    monkeypatch.setattr(base_stream, "load_base_model", no_in_memory_base)
    out = merge_adapter(uri, tmp_path / "merged", dtype="float32", max_shard_size="150KB")
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) >= 2
    assert "tokenizer.json" in os.listdir(out)
    torch.testing.assert_close(merged_logits(out), model_logits(module.model), atol=1e-4, rtol=1e-4)
    # base_model= a local copy of the recorded built-in base: the same merge, streamed from the copy.
    copy = merge_adapter(ckpts["sampler"], tmp_path / "copy", dtype="float32", base_model=str(local_base))
    torch.testing.assert_close(merged_logits(copy), ckpts["adapter_logits"], atol=1e-4, rtol=1e-4)


def test_fan_in_fan_out_conv1d_layers(tmp_path: Path) -> None:
    base = tmp_path / "tiny-gpt2"
    config = GPT2Config(vocab_size=1024, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(base)  # no tokenizer: the merge is written without one
    io = LoRACheckpointIO(root=str(tmp_path / "ckpts"), run_id="gpt2", async_save=False)
    module = train(str(base), io, target_modules=["c_attn", "c_fc"])
    assert module.adapter_config()["fan_in_fan_out"] is True  # GPT-2's Conv1D stores weights (in, out)
    out = merge_adapter(module.save_weights_for_sampler("s"), tmp_path / "merged", dtype="float32")
    assert not any(f.startswith("tokenizer") for f in os.listdir(out))
    torch.testing.assert_close(merged_logits(out), model_logits(module.model), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_a_delta_folded_block_by_block_equals_the_whole_update(fan_in_fan_out: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    lora_A, lora_B = torch.randn(4, 24, generator=generator), torch.randn(10, 4, generator=generator)
    delta = export_module.LoRADelta(lora_A, lora_B, 0.5, fan_in_fan_out)
    weight = torch.randn(delta.shape, generator=generator)
    original = weight.clone()
    update = lora_B @ lora_A
    expected = weight + 0.5 * (update.T if fan_in_fan_out else update)
    # One block for the whole weight; then blocks of 3 rows, the last one shorter.
    for scratch in (torch.empty(weight.numel()), torch.empty(3 * weight.shape[1] + 1)):
        torch.testing.assert_close(delta.merged(weight, torch.float32, scratch), expected, atol=1e-6, rtol=0)
        rounded = delta.merged(weight.bfloat16(), torch.bfloat16, scratch)
        assert rounded.dtype == torch.bfloat16
        reference = weight.bfloat16().float() + 0.5 * (update.T if fan_in_fan_out else update)
        assert torch.equal(rounded, reference.bfloat16())  # summed in float32, rounded once
    assert torch.equal(weight, original)


def save_peft_adapter(tmp_path: Path, config: LoraConfig, name: str) -> tuple[str, torch.Tensor]:
    """Save a PEFT model built directly (random lora_B) as a sampler checkpoint; return its URI and logits."""
    base = load_base_model("tiny-qwen3")
    torch.manual_seed(1)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "lora_B" in param_name or "lora_embedding_B" in param_name:
                param.normal_(0, 0.05)
    config_dict = json.loads(json.dumps(model.peft_config["default"].to_dict(), default=sorted))
    checkpoint = {
        "state_dict": get_peft_model_state_dict(model, save_embedding_layers=False),
        "lora_ckpt": {
            "adapter_config": config_dict,
            "base_model": {"name_or_path": "tiny-qwen3", "fingerprint": config_fingerprint(base.config)},
        },
        "global_step": 0,
        "epoch": 0,
    }
    io = LoRACheckpointIO(root=str(tmp_path / "ckpts"), run_id="peft", async_save=False)
    io.save_checkpoint(checkpoint, name)
    return io.resolve(name, "sampler"), model_logits(model)


def test_rslora_and_rank_and_alpha_patterns_match_peft(tmp_path: Path) -> None:
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"down_proj": 2},
        alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3},
    )
    uri, peft_logits = save_peft_adapter(tmp_path, config, "rslora")
    deltas = export_module.lora_deltas(*_adapter(uri))
    assert deltas["model.layers.0.mlp.down_proj.weight"].scale == pytest.approx(8 / math.sqrt(2))
    assert deltas["model.layers.1.self_attn.q_proj.weight"].scale == pytest.approx(3 / 2)
    assert deltas["model.layers.0.self_attn.q_proj.weight"].scale == pytest.approx(8 / 2)
    out = merge_adapter(uri, tmp_path / "merged", dtype="float32")
    torch.testing.assert_close(merged_logits(out), peft_logits, atol=1e-4, rtol=1e-4)


def _adapter(uri: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    return load_file(f"{uri}/adapter_model.safetensors"), json.loads(Path(uri, "adapter_config.json").read_text()), uri


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), "DoRA"),
        (LoraConfig(r=4, target_modules=["embed_tokens"]), "linear layers only"),
    ],
    ids=["dora", "embedding"],
)
def test_unsupported_adapters_are_refused(tmp_path: Path, config: LoraConfig, message: str) -> None:
    uri, _ = save_peft_adapter(tmp_path, config, "unsupported")
    with pytest.raises(ValueError, match=message):
        merge_adapter(uri, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_another_base_and_bad_arguments_are_refused(ckpts: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "merged"
    with pytest.raises(ValueError, match=r"'tiny-qwen3'.*'tiny-llama'"):
        merge_adapter(ckpts["sampler"], out, base_model="tiny-llama")
    with pytest.raises(ValueError, match="dtype='int8' is not supported"):
        merge_adapter(ckpts["sampler"], out, dtype="int8")
    with pytest.raises(ValueError, match="max_shard_size='2 lots'"):
        merge_adapter(ckpts["sampler"], out, max_shard_size="2 lots")
    assert os.listdir(tmp_path) == []


def test_existing_output_is_refused_unless_overwrite(ckpts: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    merge_adapter(ckpts["sampler"], out)  # an empty directory is fine
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        merge_adapter(ckpts["sampler"], out)
    assert (out / "notes.txt").read_text() == "keep me"
    merge_adapter(ckpts["sampler"], out, dtype="float32", overwrite=True)
    assert not (out / "notes.txt").exists()
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert os.listdir(tmp_path) == ["merged"]  # no temporary or swapped-out directories left


def test_an_interrupted_merge_leaves_nothing(ckpts: dict[str, Any], tmp_path: Path) -> None:
    def interrupt(label: str, done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        merge_adapter(ckpts["sampler"], tmp_path / "merged", max_shard_size="100KB", progress=interrupt)
    assert os.listdir(tmp_path) == []


def test_merge_command_end_to_end(ckpts: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "merged"
    args = ["merge", "lora://run/sampler_weights/s", str(out), "--root", ckpts["root"], "--dtype", "float32"]
    done = subprocess.run(
        [sys.executable, "-m", "lightning_lora_ckpt", *args, "--max-shard-size", "100KB", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["path"] == str(out)
    # A fresh interpreter loads it with transformers alone: peft is never imported.
    load = (
        "import json, sys, torch; from transformers import AutoModelForCausalLM; "
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}); "
        f"logits = m(input_ids=torch.tensor({IDS.tolist()})).logits; "
        "assert 'peft' not in sys.modules, 'peft was imported'; print(json.dumps(logits.tolist()))"
    )
    loaded = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    logits = torch.tensor(json.loads(loaded.stdout))
    torch.testing.assert_close(logits, ckpts["adapter_logits"], atol=1e-4, rtol=1e-4)

    assert main(args) == 1
    assert "is not empty; pass overwrite=True (--overwrite)" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert f"merged {ckpts['sampler']} into {out}" in capsys.readouterr().out.replace("\n", "")
