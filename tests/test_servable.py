"""What needs no vLLM server: ``check_servable`` and ``check``, and what happens when the server is down (the
real-server tests are tests/test_serving.py, ``make test-serving``)."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Qwen2Config

from helpers.checkpoints import fake_checkpoint
from helpers.cli import cli
from helpers.training import MODULE_KWARGS, batch_loader, make_trainer
from lightning_lora_ckpt import (
    CheckpointStore,
    DeploymentSampler,
    LoRACheckpointIO,
    LoRAModule,
    NotServableError,
    PeriodicCheckpoint,
    SamplingParams,
    VLLMHotload,
    VLLMServerError,
    check_servable,
    hotload,
)
from lightning_lora_ckpt.modeling.base import config_fingerprint, load_config


@pytest.fixture
def closed_port_url() -> str:
    """An address where nothing listens (a port bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def save_adapter(
    tmp_path: Path, name: str, base: str = "tiny-qwen3", modules: tuple[str, ...] = ("q_proj",), **config: Any
) -> str:
    """A sampler checkpoint whose adapter targets ``modules`` of layer 0 (``model.embed_tokens`` an embedding)."""
    checkpoint = fake_checkpoint(1, training=False, base=base)
    state: dict[str, torch.Tensor] = {}
    rank = config.get("r", 4)
    for module in modules:
        prefix = (
            f"base_model.model.{module}" if "." in module else f"base_model.model.model.layers.0.self_attn.{module}"
        )
        half = "lora_embedding_" if module.endswith("embed_tokens") else "lora_"
        state[f"{prefix}.{half}A{'' if half == 'lora_embedding_' else '.weight'}"] = torch.zeros(rank, 8)
        state[f"{prefix}.{half}B{'' if half == 'lora_embedding_' else '.weight'}"] = torch.zeros(8, rank)
    checkpoint["state_dict"] = state
    lora = checkpoint["lora_ckpt"]
    lora["adapter_config"] = {
        **lora["adapter_config"],
        "target_modules": [m.rsplit(".", 1)[-1] for m in modules],
        **config,
    }
    lora["base_model"]["fingerprint"] = config_fingerprint(load_config(base))
    io = LoRACheckpointIO(root=str(tmp_path / "ckpts"), run_id="run", async_save=False)
    io.save_checkpoint(checkpoint, name)
    return str(tmp_path / "ckpts" / "run" / "sampler_weights" / name)


def test_a_trained_adapter_is_servable(trained) -> None:
    module, _, _ = trained
    report = check_servable(module.save_weights_for_sampler("s"), max_lora_rank=16)
    assert report.ok and report.architecture == "Qwen3ForCausalLM" and report.lora_rank == MODULE_KWARGS["rank"]
    assert set(report.modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert report.notes == ()


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"use_dora": True}, "vLLM does not support DoRA"),
        ({"lora_bias": True}, "LoRA bias"),
        ({"r": 32}, "rank 32 is above the server's --max-lora-rank 16"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights"),
    ],
)
def test_what_vllm_cannot_serve_is_refused_with_the_reason(tmp_path: Path, config: dict[str, Any], reason: str) -> None:
    uri = save_adapter(tmp_path, "bad", **config)
    with pytest.raises(NotServableError, match=reason) as refused:
        check_servable(uri, max_lora_rank=16)
    assert not refused.value.report.ok
    result = cli("check", uri, "--max-lora-rank", "16")
    assert result.returncode == 2 and "NOT servable" in result.stdout and reason in result.stdout.replace("\n", " ")


def test_embedding_lora_only_where_vllm_has_embedding_modules(tmp_path: Path) -> None:
    assert check_servable(save_adapter(tmp_path, "qwen3", modules=("model.embed_tokens",))).ok  # Qwen3 has them
    base = tmp_path / "tiny-qwen2"
    Qwen2Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    ).save_pretrained(base)
    uri = save_adapter(tmp_path, "qwen2", base=str(base), modules=("q_proj", "model.embed_tokens"))
    with pytest.raises(NotServableError, match=r"LoRA on model\.embed_tokens.*Qwen2ForCausalLM has no LoRA embedding"):
        check_servable(uri)
    assert check_servable(save_adapter(tmp_path, "plain", base=str(base))).ok


def test_a_base_not_available_here_is_noted_not_refused(tmp_path: Path) -> None:
    checkpoint = save_adapter(tmp_path, "elsewhere")
    manifest_path = Path(checkpoint) / "checkpoint.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["base_model"]["name_or_path"] = str(tmp_path / "no-such-base")
    manifest_path.write_text(json.dumps(manifest))
    report = check_servable(checkpoint)
    assert report.ok and report.architecture is None and "not checked" in report.notes[0]
    payload = json.loads(cli("check", checkpoint, "--json").stdout)
    assert payload["ok"] and payload["notes"] == list(report.notes)


def test_a_server_that_is_down_is_a_clear_error_and_nothing_unservable_is_sent(
    tmp_path: Path, closed_port_url: str
) -> None:
    with pytest.raises(VLLMServerError, match=f"vLLM at {closed_port_url} is unreachable"):
        hotload(save_adapter(tmp_path, "ok"), closed_port_url, timeout_s=2)
    with pytest.raises(NotServableError, match="DoRA"):  # refused before any request
        hotload(save_adapter(tmp_path, "dora", use_dora=True), closed_port_url)
    pushed = cli("push-hf", save_adapter(tmp_path, "dora2", use_dora=True), "--repo-id", "tester/x")  # before the Hub
    assert (
        pushed.returncode == 1
        and "vLLM does not support DoRA" in pushed.stderr
        and "--no-servable-check" not in pushed.stdout
    )
    result = cli("hotload", save_adapter(tmp_path, "ok2"), "--url", closed_port_url)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and last.startswith("error: vLLM at") and "unreachable" in last


def test_the_max_seq_len_prefilter_makes_no_request(closed_port_url: str) -> None:
    sampler = DeploymentSampler(closed_port_url, "any", max_seq_len=3)
    assert sampler.sample([1, 2, 3], SamplingParams(max_tokens=2)).sequences == []
    with pytest.raises(ValueError, match="pass tokenizer="):
        sampler.sample("a text prompt")
    with pytest.raises(VLLMServerError, match="unreachable"):
        DeploymentSampler(closed_port_url, "any", timeout_s=2).sample([1, 2])


def run_with_hotload(tmp_path: Path, hotloader: VLLMHotload) -> CheckpointStore:
    io = LoRACheckpointIO(root=str(tmp_path / "ckpts"), run_id="run", async_save=True)
    callbacks = [hotloader, PeriodicCheckpoint(every_n_train_steps=2, kind="sampler")]
    make_trainer(io, max_steps=4, callbacks=callbacks).fit(LoRAModule(**MODULE_KWARGS), batch_loader())
    return CheckpointStore(str(tmp_path / "ckpts"))


def test_training_goes_on_when_the_server_is_down(
    tmp_path: Path, closed_port_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="lightning_lora_ckpt.lightning.vllm_hotload"):
        store = run_with_hotload(tmp_path / "logged", VLLMHotload(closed_port_url, timeout_s=2))
    warnings = [r.getMessage() for r in caplog.records if r.name == "lightning_lora_ckpt.lightning.vllm_hotload"]
    assert warnings and all("unreachable" in w for w in warnings)
    assert [c.checkpoint_id for c in store.list_checkpoints("run")][-1] == "sampler_weights/final"
    with pytest.raises(VLLMServerError, match=f"VLLMHotload could not hotload into {closed_port_url}"):
        run_with_hotload(tmp_path / "raised", VLLMHotload(closed_port_url, fail_on_error=True, timeout_s=2))
    assert all(
        store.verify(c.path).ok for c in CheckpointStore(str(tmp_path / "raised" / "ckpts")).list_checkpoints("run")
    )


def test_invalid_settings(closed_port_url: str) -> None:
    with pytest.raises(ValueError, match="keep must be at least 1"):
        VLLMHotload(closed_port_url, keep=0)
    with pytest.raises(ValueError, match="not an http"):
        DeploymentSampler("127.0.0.1:8000", "m")
    with pytest.raises(ValueError, match="target must be one of vllm"):
        check_servable("lora://run/sampler_weights/x", target="sglang")
