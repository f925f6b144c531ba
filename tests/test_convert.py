"""``convert_layout`` / ``convert``: a checkpoint's adapter stacked over layers (MaxText's scan layout) and back
to a PEFT directory, bit-exact; refusals of layers that cannot be stacked."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import safetensors.torch
import torch
from peft import PeftModel

from helpers.checkpoints import fake_checkpoint
from helpers.cli import cli, cli_json
from lightning_lora_ckpt import (
    CheckpointFormatError,
    LoRACheckpointIO,
    SamplingClient,
    convert_layout,
    load_base_model,
)
from lightning_lora_ckpt.format.layouts import (
    LAYOUT_FILE,
    PLACEHOLDER,
    STACKED_WEIGHTS,
    StackedAdapter,
    stack_layers,
    unstack_layers,
)
from lightning_lora_ckpt.storage.loading import open_checkpoint

PREFIX = "base_model.model.model.layers"


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def _peft_dir(path: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = safetensors.torch.load_file(os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json")) as f:
        return tensors, json.load(f)


@pytest.mark.parametrize("kind", ["sampler", "training"])
def test_round_trip_is_bit_exact_and_loads_in_peft(trained: Any, tmp_path: Any, kind: str) -> None:
    module = trained[0]
    uri = module.save_weights_for_sampler("s") if kind == "sampler" else module.save_state("t")
    original = open_checkpoint(uri)

    stacked = convert_layout(uri, tmp_path / "stacked", "stacked")
    assert sorted(os.listdir(stacked.path)) == sorted([STACKED_WEIGHTS, LAYOUT_FILE])
    assert stacked.num_layers == {PREFIX: 2}
    tensors = safetensors.torch.load_file(os.path.join(stacked.path, STACKED_WEIGHTS))
    q_a = f"{PREFIX}.{PLACEHOLDER}.self_attn.q_proj.lora_A.weight"
    assert tensors[q_a].shape == (2, 4, 64)
    assert tensors[f"{PREFIX}.{PLACEHOLDER}.mlp.down_proj.lora_B.weight"].shape == (2, 64, 4)
    assert len(tensors) == len(original.adapter) // 2
    assert torch.equal(tensors[q_a][1], original.adapter[f"{PREFIX}.1.self_attn.q_proj.lora_A.weight"])
    with open(os.path.join(stacked.path, LAYOUT_FILE)) as f:
        layout = json.load(f)
    assert layout["layout"] == "stacked" and layout["placeholder"] == PLACEHOLDER
    assert layout["num_layers"] == {PREFIX: 2} and layout["keys"] == list(original.adapter)
    assert layout["adapter_config"] == original.adapter_config
    source = layout["source"]
    assert (source["run_id"], source["name"], source["checkpoint_type"]) == ("run", uri.rsplit("/", 1)[1], kind)
    assert source["content_sha256"] == original.manifest.content_sha256

    out = convert_layout(stacked.path, tmp_path / "unstacked", "unstacked")
    assert sorted(os.listdir(out.path)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert out.source == stacked.source
    adapter, config = _peft_dir(out.path)
    _assert_same(adapter, original.adapter)
    assert config == original.adapter_config

    # straight from the checkpoint: its PEFT files (a training checkpoint's state dropped)
    direct = convert_layout(uri, tmp_path / "direct", "unstacked")
    assert sorted(os.listdir(direct.path)) == ["adapter_config.json", "adapter_model.safetensors"]
    _assert_same(_peft_dir(direct.path)[0], original.adapter)

    # PEFT loads the rebuilt directory as is, and it computes what the checkpoint's adapter does
    ids = torch.tensor([[1, 5, 9, 200, 31, 7]])
    peft = PeftModel.from_pretrained(load_base_model("tiny-qwen3"), out.path).eval()
    reference = SamplingClient.from_checkpoint(uri).model
    with torch.no_grad():
        logits = peft(input_ids=ids).logits
        assert torch.equal(logits, reference(input_ids=ids).logits)
        with peft.disable_adapter():
            assert not torch.equal(peft(input_ids=ids).logits, logits)  # the adapter is not a no-op


def _sampler_with(tmp_path: Any, state_dict: dict[str, torch.Tensor]) -> str:
    io = LoRACheckpointIO(root=str(tmp_path / "ckpts"), run_id="odd", async_save=False)
    checkpoint = fake_checkpoint(1, training=False)
    checkpoint["state_dict"] = state_dict
    checkpoint["lora_ckpt"]["adapter_config"]["target_modules"] = ["q_proj"]
    io.save_checkpoint(checkpoint, "s")
    return str(tmp_path / "ckpts" / "odd" / "sampler_weights" / "s")


def _layers(shapes: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    tensors = {}
    for i, (rows, cols) in enumerate(shapes):
        tensors[f"{PREFIX}.{i}.self_attn.q_proj.lora_A.weight"] = torch.ones(4, cols)
        tensors[f"{PREFIX}.{i}.self_attn.q_proj.lora_B.weight"] = torch.ones(rows, 4)
    return tensors


def test_layers_of_different_shapes_are_refused(tmp_path: Any) -> None:
    uri = _sampler_with(tmp_path, _layers([(8, 8), (16, 8)]))
    with pytest.raises(ValueError, match=r"Cannot stack '.*layers\.1\.self_attn\.q_proj\.lora_B\.weight'.*unstacked"):
        convert_layout(uri, tmp_path / "out", "stacked")
    assert not os.path.exists(tmp_path / "out") and not [n for n in os.listdir(tmp_path) if "convert" in n]
    # the per-layer layout still converts
    convert_layout(uri, tmp_path / "out", "unstacked")


def test_a_missing_layer_tensor_is_refused(tmp_path: Any) -> None:
    tensors = _layers([(8, 8), (8, 8), (8, 8)])
    del tensors[f"{PREFIX}.1.self_attn.q_proj.lora_B.weight"]
    uri = _sampler_with(tmp_path, tensors)
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.q_proj\.lora_B\.weight'.*layer 1 has no"):
        convert_layout(uri, tmp_path / "out", "stacked")


def test_stack_keeps_non_layer_tensors_and_dtypes() -> None:
    adapter = {
        "base_model.model.model.embed_tokens.lora_embedding_A": torch.randn(4, 10),
        f"{PREFIX}.0.mlp.up_proj.lora_A.weight": torch.randn(4, 8, dtype=torch.bfloat16),
        "base_model.model.lm_head.lora_A.weight": torch.randn(4, 8),
        f"{PREFIX}.1.mlp.up_proj.lora_A.weight": torch.randn(4, 8, dtype=torch.bfloat16),
    }
    stacked = stack_layers(adapter)
    assert set(stacked.tensors) == {
        "base_model.model.model.embed_tokens.lora_embedding_A",
        "base_model.model.lm_head.lora_A.weight",
        f"{PREFIX}.{PLACEHOLDER}.mlp.up_proj.lora_A.weight",
    }
    assert stacked.tensors[f"{PREFIX}.{PLACEHOLDER}.mlp.up_proj.lora_A.weight"].dtype == torch.bfloat16
    _assert_same(unstack_layers(stacked), adapter)
    with pytest.raises(ValueError, match="num_layers"):
        unstack_layers(StackedAdapter(stacked.tensors, {PREFIX: 3}, stacked.keys))


def test_output_dir_not_empty_and_damaged_stacked_dir(trained: Any, tmp_path: Any) -> None:
    uri = trained[0].save_weights_for_sampler("s")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        convert_layout(uri, busy, "stacked")
    assert os.listdir(busy) == ["keep.txt"]
    convert_layout(uri, busy, "stacked", overwrite=True)
    assert LAYOUT_FILE in os.listdir(busy)
    with pytest.raises(ValueError, match="Unknown layout"):
        convert_layout(uri, tmp_path / "x", "scan")  # type: ignore[arg-type]
    weights = busy / STACKED_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointFormatError, match="damaged"):
        convert_layout(busy, tmp_path / "back", "unstacked")


def test_cli_convert(trained: Any, tmp_path: Any) -> None:
    uri = trained[0].save_state("t")
    root = str(tmp_path / "ckpts")
    out = cli_json("convert", "lora://run/weights/t", str(tmp_path / "st"), "--layout", "stacked", "--root", root)
    assert out["layout"] == "stacked" and out["num_layers"] == {PREFIX: 2}
    assert out["source"]["checkpoint_type"] == "training"
    back = cli_json("convert", str(tmp_path / "st"), str(tmp_path / "un"), "--layout", "unstacked")
    assert back["path"] == str(tmp_path / "un")
    _assert_same(_peft_dir(tmp_path / "un")[0], open_checkpoint(uri).adapter)
    again = cli("convert", uri, str(tmp_path / "un"), "--layout", "unstacked")
    assert again.returncode == 1
    assert again.stderr.startswith("error: ") and "not empty" in again.stderr and len(again.stderr.splitlines()) == 1
    assert cli("convert", uri, str(tmp_path / "z")).returncode == 2  # --layout is required
