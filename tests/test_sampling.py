"""SamplingClient: greedy equals transformers' generate, logprobs, seeds, stops, max_seq_len, snapshots, hotload."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from transformers import GenerationConfig

from helpers.training import MODULE_KWARGS, batch_loader, make_trainer
from lightning_lora_ckpt import LoRACheckpointIO, LoRAModule, SamplingClient, SamplingParams, load_base_model
from lightning_lora_ckpt.modeling import sampling
from lightning_lora_ckpt.storage.read import read_manifest

PROMPT = [5, 17, 99, 250, 3]
NO_STOP = SamplingParams(max_tokens=8, temperature=0, stop=[])


@pytest.fixture
def sampler_uri(trained) -> str:
    module, _io, _ = trained
    return module.save_weights_for_sampler("s")


def test_greedy_matches_transformers_generate_and_logprobs_match_a_forward_pass(sampler_uri: str) -> None:
    client = SamplingClient.from_checkpoint(sampler_uri)
    [seq] = client.sample(PROMPT, NO_STOP).sequences
    reference = PeftModel.from_pretrained(load_base_model("tiny-qwen3"), sampler_uri).eval()
    config = GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    generated = reference.generate(input_ids=torch.tensor([PROMPT]), generation_config=config)[0, len(PROMPT) :]
    assert seq.tokens == generated.tolist() and seq.finish_reason == "length"
    scored = client.compute_logprobs(PROMPT + seq.tokens)
    assert scored[0] is None
    torch.testing.assert_close(torch.tensor(scored[len(PROMPT) :]), torch.tensor(seq.logprobs), atol=1e-4, rtol=0)
    assert client.identity.content_sha256 == read_manifest(sampler_uri).content_sha256


def test_seeded_batched_sampling_is_deterministic(sampler_uri: str) -> None:
    client = SamplingClient.from_checkpoint(sampler_uri)
    params = SamplingParams(max_tokens=6, temperature=1.0, top_k=50, top_p=0.9, stop=[], seed=7)
    first, again = client.sample(PROMPT, params, num_samples=4), client.sample(PROMPT, params, num_samples=4)
    assert [s.tokens for s in first.sequences] == [s.tokens for s in again.sequences]
    assert len({tuple(s.tokens) for s in first.sequences}) > 1  # the batch holds different samples
    other = client.sample(PROMPT, SamplingParams(max_tokens=6, stop=[], seed=8), num_samples=4)
    assert [s.tokens for s in other.sequences] != [s.tokens for s in first.sequences]
    for seq in first.sequences:  # logprobs are the model's, not the filtered distribution's
        scored = client.compute_logprobs(PROMPT + seq.tokens)[len(PROMPT) :]
        torch.testing.assert_close(torch.tensor(scored), torch.tensor(seq.logprobs), atol=1e-4, rtol=0)


def test_stop_tokens_and_strings(sampler_uri: str) -> None:
    client = SamplingClient.from_checkpoint(sampler_uri)
    [greedy] = client.sample(PROMPT, NO_STOP).sequences
    [by_id] = client.sample(PROMPT, SamplingParams(max_tokens=8, temperature=0, stop=greedy.tokens[2])).sequences
    assert by_id.tokens == greedy.tokens[:3] and by_id.finish_reason == "stop"
    stop_text = client.tokenizer.decode(greedy.tokens[3:5])
    [by_text] = client.sample(PROMPT, SamplingParams(max_tokens=8, temperature=0, stop=[stop_text])).sequences
    assert by_text.finish_reason == "stop" and stop_text not in by_text.text and len(by_text.tokens) <= 5
    assert client.tokenizer.decode(greedy.tokens).startswith(by_text.text)


def test_max_seq_len_filter(sampler_uri: str) -> None:
    client = SamplingClient.from_checkpoint(sampler_uri, max_seq_len=len(PROMPT))
    assert client.sample(PROMPT, NO_STOP).sequences == []  # at the limit: no model call, no samples
    client.max_seq_len = len(PROMPT) + 3
    assert client.sample(PROMPT, NO_STOP, num_samples=2).sequences == []  # completions over it are dropped
    assert (
        len(client.sample(PROMPT, SamplingParams(max_tokens=3, temperature=0, stop=[]), num_samples=2).sequences) == 2
    )


def test_snapshot_client_is_immutable(trained) -> None:
    module, io, _trainer = trained
    snapshot = module.save_weights_and_get_sampling_client()
    before = snapshot.compute_logprobs([*PROMPT, 7, 8])
    make_trainer(io, max_steps=8).fit(module, batch_loader(), ckpt_path=None)  # keep training the module
    assert snapshot.compute_logprobs([*PROMPT, 7, 8]) == before
    assert module.save_weights_and_get_sampling_client().compute_logprobs([*PROMPT, 7, 8]) != before
    assert snapshot.identity.uri is None and len(snapshot.identity.content_sha256) == 64


def test_hotload_equals_a_fresh_client_and_refuses_another_base(trained, tmp_path) -> None:
    module, io, _ = trained
    first = module.save_weights_for_sampler("first")
    wider = LoRAModule(**{**MODULE_KWARGS, "rank": 8, "seed": 3})
    make_trainer(io, max_steps=3).fit(wider, batch_loader())
    second = wider.save_weights_for_sampler("second")
    client = SamplingClient.from_checkpoint(first)
    base_params = [p for n, p in client.model.named_parameters() if "lora_" not in n]
    identity = client.load_adapter(second)
    assert identity.name == "second" and identity.content_sha256 == read_manifest(second).content_sha256
    assert all(
        a is b
        for a, b in zip(base_params, [p for n, p in client.model.named_parameters() if "lora_" not in n], strict=True)
    )
    fresh = SamplingClient.from_checkpoint(second)
    params = SamplingParams(max_tokens=6, stop=[], seed=1)
    assert client.sample(PROMPT, params, 3) == fresh.sample(PROMPT, params, 3)
    llama_io = LoRACheckpointIO(root=str(tmp_path / "llama"), run_id="llama", async_save=False)
    llama = LoRAModule(**{**MODULE_KWARGS, "base_model": "tiny-llama"})
    make_trainer(llama_io, max_steps=1).fit(llama, batch_loader(1))
    with pytest.raises(ValueError, match=r"'tiny-llama'.*'tiny-qwen3'"):
        client.load_adapter(llama.save_weights_for_sampler("other-base"))
    assert client.identity == identity


def test_a_failed_hotload_leaves_the_client_as_it_was(trained, monkeypatch) -> None:
    module, io, _ = trained
    first = module.save_weights_for_sampler("first")
    wider = LoRAModule(**{**MODULE_KWARGS, "rank": 8, "seed": 3})
    make_trainer(io, max_steps=1).fit(wider, batch_loader(1))
    second = wider.save_weights_for_sampler("second")
    client = SamplingClient.from_checkpoint(first)
    params = SamplingParams(max_tokens=6, stop=[], seed=1)
    before, adapters, identity = client.sample(PROMPT, params, 2), set(client.model.peft_config), client.identity

    def fail(*args, **kwargs):
        raise RuntimeError("injected failure while loading the adapter tensors")

    monkeypatch.setattr(sampling, "set_peft_model_state_dict", fail)
    with pytest.raises(RuntimeError, match="injected failure"):
        client.load_adapter(second)
    assert set(client.model.peft_config) == adapters and client.identity == identity
    assert client.sample(PROMPT, params, 2) == before


def test_hotload_of_an_adapter_with_the_same_config_copies_it_in_place(trained) -> None:
    module, io, _ = trained
    before = module.save_weights_for_sampler("before")
    make_trainer(io, max_steps=2).fit(module, batch_loader(2), ckpt_path=None)
    after = module.save_weights_for_sampler("after")
    client = SamplingClient.from_checkpoint(before)
    parameters = dict(client.model.named_parameters())
    old_logprobs = client.compute_logprobs([*PROMPT, 7, 8])
    assert client.load_adapter(after).name == "after"
    assert all(p is parameters[n] for n, p in client.model.named_parameters())  # no new adapter: copied into it
    fresh = SamplingClient.from_checkpoint(after)
    assert client.compute_logprobs([*PROMPT, 7, 8]) == fresh.compute_logprobs([*PROMPT, 7, 8]) != old_logprobs
    params = SamplingParams(max_tokens=6, stop=[], seed=1)
    assert client.sample(PROMPT, params, 3) == fresh.sample(PROMPT, params, 3)


def test_sample_command(sampler_uri: str) -> None:
    args = ["sample", sampler_uri, "--prompt", "The capital of France", "--max-tokens", "5", "--seed", "0", "--json"]
    out = subprocess.run([sys.executable, "-m", "lightning_lora_ckpt", *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert len(result["sequences"]) == 1 and len(result["sequences"][0]["tokens"]) <= 5
    assert result["identity"]["name"] == "s"
