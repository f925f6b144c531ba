"""Serving through a real vLLM server (CPU build, ``make test-serving``): hotload, ``DeploymentSampler`` against
``SamplingClient``, the ``VLLMHotload`` callback in training, refusals and a remote root."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers.cli import cli_json
from helpers.serving import SERVED_BASE, train_sampler
from helpers.training import MODULE_KWARGS, batch_loader, make_trainer
from lightning_lora_ckpt import (
    DeploymentSampler,
    LoRACheckpointIO,
    LoRAModule,
    NotServableError,
    PeriodicCheckpoint,
    SamplingClient,
    SamplingParams,
    ServedIdentityError,
    VLLMHotload,
    VLLMServerError,
    hotload,
)
from lightning_lora_ckpt.storage.read import read_manifest
from support.vllm_server import VLLMServer
from test_docs import REPO, SERVING_DOCS, run_page

pytestmark = pytest.mark.serving

PROMPT = [5, 17, 99, 250, 3]
GREEDY = SamplingParams(max_tokens=8, temperature=0, stop=[])


def served_ids(server: VLLMServer) -> set[str]:
    status, body = server.request("GET", "/v1/models")
    assert status == 200
    return {card["id"] for card in body["data"]}


def test_hotload_serves_what_sampling_client_samples(vllm: VLLMServer, tmp_path: Path) -> None:
    _, uri = train_sampler(str(tmp_path / "ckpts"), "run", "s1")
    served = hotload(uri, vllm.base_url, max_lora_rank=16)
    digest = read_manifest(uri).content_sha256
    assert served.vllm_name == f"run/sampler_weights/s1@{digest[:12]}" and served.content_sha256 == digest
    assert served.vllm_name in served_ids(vllm) and served.lora_path == uri
    local = SamplingClient.from_checkpoint(uri)
    remote = DeploymentSampler(vllm.base_url, served, tokenizer=local.tokenizer)
    assert remote.check_identity()["root"] == uri
    for params in (
        GREEDY,
        SamplingParams(max_tokens=8, temperature=0, stop=[local.sample(PROMPT, GREEDY).sequences[0].tokens[3]]),
    ):
        [ours] = local.sample(PROMPT, params).sequences
        [theirs] = remote.sample(PROMPT, params).sequences
        assert theirs.tokens == ours.tokens and theirs.finish_reason == ours.finish_reason
        assert theirs.prompt_len == len(PROMPT) and theirs.completion_len == len(ours.tokens)
        torch.testing.assert_close(torch.tensor(theirs.logprobs), torch.tensor(ours.logprobs), atol=1e-4, rtol=0)
    twice = remote.sample(PROMPT, GREEDY, num_samples=2).sequences  # vLLM takes n=1 only for greedy: one request
    assert [s.tokens for s in twice] == [local.sample(PROMPT, GREEDY).sequences[0].tokens] * 2
    seeded = SamplingParams(max_tokens=6, temperature=1.0, top_k=50, top_p=0.9, stop=[], seed=7)
    first, again = (
        remote.sample("hello there", seeded, num_samples=3),
        remote.sample("hello there", seeded, num_samples=3),
    )
    assert len(first.sequences) == 3 and [s.tokens for s in first.sequences] == [s.tokens for s in again.sequences]
    assert len({tuple(s.tokens) for s in first.sequences}) > 1
    assert hotload(uri, vllm.base_url).vllm_name == served.vllm_name  # already served: not loaded twice


def test_a_new_checkpoint_gets_a_new_name_and_the_old_one_is_unloaded(vllm: VLLMServer, tmp_path: Path) -> None:
    _, first_uri = train_sampler(str(tmp_path / "ckpts"), "swap", "s")
    first = hotload(first_uri, vllm.base_url)
    _, second_uri = train_sampler(str(tmp_path / "ckpts"), "swap", "s", steps=4)  # the same name, new content
    assert second_uri == first_uri
    second = hotload(second_uri, vllm.base_url, unload=[first.vllm_name])
    assert second.vllm_name != first.vllm_name and second.content_sha256 != first.content_sha256
    names = served_ids(vllm)
    assert second.vllm_name in names and first.vllm_name not in names
    with pytest.raises(ServedIdentityError, match="does not serve"):
        DeploymentSampler(vllm.base_url, first).sample(PROMPT, GREEDY)
    expected = SamplingClient.from_checkpoint(second_uri).sample(PROMPT, GREEDY).sequences[0].tokens
    assert DeploymentSampler(vllm.base_url, second).sample(PROMPT, GREEDY).sequences[0].tokens == expected


def test_the_callback_hotloads_every_sampler_checkpoint_of_a_run(vllm: VLLMServer, tmp_path: Path) -> None:
    io = LoRACheckpointIO(root=str(tmp_path / "ckpts"), run_id="cb", async_save=True)
    hotloader = VLLMHotload(vllm.base_url, keep=2, max_lora_rank=16, fail_on_error=True)
    callbacks = [hotloader, PeriodicCheckpoint(every_n_train_steps=2, kind="sampler")]
    module = LoRAModule(**{**MODULE_KWARGS, "base_model": SERVED_BASE})
    make_trainer(io, max_steps=6, callbacks=callbacks).fit(module, batch_loader(6))
    assert len(hotloader.served) == 2 and hotloader.identity is not None
    newest = hotloader.identity
    assert newest.checkpoint_id == "sampler_weights/final"
    names = served_ids(vllm)
    assert {a.vllm_name for a in hotloader.served} <= names
    assert not any(n.startswith("cb/") and n not in {a.vllm_name for a in hotloader.served} for n in names)  # keep=2
    assert hotloader.latencies and all(0 <= s < 60 for s in hotloader.latencies)
    expected = SamplingClient.from_checkpoint(newest.uri).sample(PROMPT, GREEDY).sequences[0].tokens
    assert DeploymentSampler(vllm.base_url, newest).sample(PROMPT, GREEDY).sequences[0].tokens == expected


def test_refusals(vllm: VLLMServer, tmp_path: Path) -> None:
    io = LoRACheckpointIO(root=str(tmp_path / "ckpts"), run_id="big", async_save=False)
    module = LoRAModule(**{**MODULE_KWARGS, "base_model": SERVED_BASE, "rank": 32})
    make_trainer(io, max_steps=1).fit(module, batch_loader(1))
    big = module.save_weights_for_sampler("r32")
    with pytest.raises(NotServableError, match="rank 32 is above the server's --max-lora-rank 16"):
        hotload(big, vllm.base_url, max_lora_rank=16)
    with pytest.raises(VLLMServerError, match=r"refused /v1/load_lora_adapter \(HTTP \d+\).*max_lora_rank"):
        hotload(big, vllm.base_url)  # vLLM's own refusal
    _, other_base = train_sampler(str(tmp_path / "ckpts"), "other", "s", base_model="tiny-qwen3")
    with pytest.raises(
        ValueError, match=r"was trained on base model 'tiny-qwen3'.*start vLLM with the checkpoint's base"
    ):
        hotload(other_base, vllm.base_url)
    assert not any(n.startswith(("big/", "other/")) for n in served_ids(vllm))


def test_a_checkpoint_on_s3_is_downloaded_verified_and_served(
    vllm: VLLMServer, s3_server: dict[str, Any], tmp_path: Path
) -> None:
    options = s3_server["storage_options"]
    _, uri = train_sampler(f"s3://{s3_server['bucket']}/serving", "s3run", "s", storage_options=options)
    result = cli_json(
        "hotload",
        uri,
        "--url",
        vllm.base_url,
        "--cache-dir",
        str(tmp_path / "cache"),
        "--storage-options",
        json.dumps(options),
    )
    digest = read_manifest(uri, options).content_sha256
    assert result["lora_path"] == str(tmp_path / "cache" / digest) and result["vllm_name"].endswith(digest[:12])
    assert (tmp_path / "cache" / digest / "adapter_model.safetensors").is_file()
    expected = SamplingClient.from_checkpoint(uri, storage_options=options).sample(PROMPT, GREEDY).sequences[0].tokens
    assert (
        DeploymentSampler(vllm.base_url, result["vllm_name"], expect_sha256=digest)
        .sample(PROMPT, GREEDY)
        .sequences[0]
        .tokens
        == expected
    )


def test_the_serving_page_runs_against_the_server(vllm: VLLMServer, tmp_path: Path) -> None:
    [page] = SERVING_DOCS
    stand_ins = [(r'"Qwen/Qwen3-0\.6B"', f'"{SERVED_BASE}"'), (r'"http://127\.0\.0\.1:8000"', f'"{vllm.base_url}"')]
    result = run_page(page, tmp_path, stand_ins=stand_ins)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_example_hotloads_and_evaluates_through_the_server(vllm: VLLMServer, tmp_path: Path) -> None:
    command = [sys.executable, "examples/serve_and_evaluate.py", "--url", vllm.base_url, "--steps", "20"]
    result = subprocess.run(
        [*command, "--root", str(tmp_path / "ckpts")], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    scored = [line for line in result.stdout.splitlines() if "mean logprob" in line]
    assert len(scored) == 2 and all(line.endswith("same tokens as SamplingClient: True") for line in scored)
    assert scored[-1].startswith("served/sampler_weights/final@")
