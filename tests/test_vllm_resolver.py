"""The vLLM LoRA resolver plugin in a real vLLM server (CPU build, ``make test-serving``): a request naming
``<run_id>/sampler_weights/<name>`` is served from ``LORA_CKPT_ROOT`` (a local root, and an S3 one on moto),
with the tokens our ``SamplingClient`` gives (a local checkpoint loaded from its own directory, an S3 one from the
verified copy in the cache, reused for the next name of the same content); unknown, damaged, deleted and other-base checkpoints get vLLM's
404 and one warning line in the server's log naming the reason.

Requests go one at a time: on the CPU, vLLM serves a base request batched with an adapter one with the adapter.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

import pytest

from helpers.serving import resolver_env, s3_env, train_sampler
from lightning_lora_ckpt import SamplingClient, SamplingParams
from lightning_lora_ckpt.format.manifest import ADAPTER_WEIGHTS
from lightning_lora_ckpt.storage.commit import retire_checkpoint
from lightning_lora_ckpt.storage.read import read_manifest
from support.vllm_server import VLLMServer, vllm_server

pytestmark = pytest.mark.serving

PROMPT = [11, 22, 33, 44, 55]  # token ids: no tokenizer differences between vLLM and SamplingClient
GREEDY = SamplingParams(max_tokens=8, temperature=0, stop=[])


def our_tokens(uri: str, storage_options: dict[str, Any] | None = None) -> list[int]:
    """What SamplingClient generates greedily from the checkpoint at ``uri``."""
    client = SamplingClient.from_checkpoint(uri, storage_options=storage_options)
    return client.sample(PROMPT, GREEDY).sequences[0].tokens


def served_tokens(server: VLLMServer, model: str) -> list[int]:
    """What the server generates greedily for ``model`` (asserting it answers 200)."""
    status, body = server.complete(model, PROMPT, max_tokens=GREEDY.max_tokens)
    assert status == 200, f"{model}: {status} {body}\n{server.log_tail()}"
    return list(body["choices"][0]["token_ids"])


def assert_not_served(server: VLLMServer, model: str, reason: str) -> None:
    """``model`` gets vLLM's 404, and the server logged one warning naming it and matching ``reason``."""
    status, body = server.complete(model, PROMPT, max_tokens=2)
    assert status == 404, f"{model}: {status} {body}"
    assert "does not exist" in body["error"]["message"]
    lines = [line for line in server.log_text().splitlines() if f"not serving {model!r}" in line]
    assert len(lines) == 1, server.log_tail()
    assert "WARNING" in lines[0] and re.search(reason, lines[0]), lines[0]


@pytest.fixture(scope="module")
def checkpoints(vllm_root: str) -> dict[str, str]:
    """Checkpoints under the session server's root: a sampler and a training checkpoint of the served base, a
    sampler checkpoint damaged after its commit, a soft-deleted one, and one trained on another base."""
    module, sampler = train_sampler(vllm_root, "resolver", "s1")
    training = module.save_state("t1")
    damaged_module, damaged = train_sampler(vllm_root, "resolver", "damaged", steps=1)  # content of its own
    deleted = damaged_module.save_weights_for_sampler("deleted")
    with open(os.path.join(damaged, ADAPTER_WEIGHTS), "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    retire_checkpoint(deleted)
    _, other = train_sampler(vllm_root, "resolver", "other-base", base_model="tiny-qwen3", steps=1)
    return {"sampler": sampler, "training": training, "other": other}


def test_a_sampler_checkpoint_is_served_by_name_with_our_tokens(vllm: VLLMServer, checkpoints: dict[str, str]) -> None:
    expected = our_tokens(checkpoints["sampler"])
    base = served_tokens(vllm, vllm.model)
    assert base != expected  # the adapter changes the greedy continuation: the test below sees it applied
    assert served_tokens(vllm, "resolver/sampler_weights/s1") == expected
    digest = read_manifest(checkpoints["sampler"]).content_sha256
    # The lora:// form, pinned to its content, and the training checkpoint of the same adapter, by name.
    assert served_tokens(vllm, f"lora://resolver/sampler_weights/s1@{digest[:12]}") == expected
    assert served_tokens(vllm, "resolver/weights/t1") == expected
    status, models = vllm.request("GET", "/v1/models")
    assert status == 200, models
    listed = {m["id"]: m["root"] for m in models["data"]}
    assert listed["resolver/sampler_weights/s1"] == checkpoints["sampler"]  # a local root: verified in place
    assert served_tokens(vllm, vllm.model) == base  # the base, alone in its batch, is unchanged


def test_unknown_damaged_deleted_and_mismatched_names_get_404(vllm: VLLMServer, checkpoints: dict[str, str]) -> None:
    assert_not_served(vllm, "resolver/sampler_weights/missing", "unknown or unreadable checkpoint: No checkpoint at")
    assert_not_served(vllm, "no-such-model", "malformed name")
    assert_not_served(vllm, "resolver/sampler_weights/damaged", r"damaged: .*adapter_model\.safetensors has")
    assert_not_served(vllm, "resolver/sampler_weights/deleted", "deleted: Checkpoint .* was deleted at")
    assert_not_served(vllm, "resolver/sampler_weights/s1@00000000", "content mismatch")


def test_a_checkpoint_of_another_base_gets_404(vllm: VLLMServer, checkpoints: dict[str, str]) -> None:
    assert_not_served(vllm, "resolver/sampler_weights/other-base", r"other base: .* trained on 'tiny-qwen3'")


@pytest.fixture(scope="module")
def s3_vllm(
    vllm_base_dir: str, s3_server: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[VLLMServer, str, str]]:
    """A second, short-lived server whose root is a bucket on the moto S3 server (LORA_CKPT_ROOT is one root per
    server); s3fs in the server reads the endpoint and credentials from the ``AWS_*`` variables."""
    root = f"s3://{s3_server['bucket']}/vllm-root"
    logs = tmp_path_factory.mktemp("vllm-s3")
    env = {**resolver_env(root, logs / "cache"), **s3_env(s3_server["storage_options"])}
    with vllm_server(vllm_base_dir, env=env, log_dir=logs) as server:
        yield server, root, str(logs / "cache")


def test_a_checkpoint_on_s3_is_served_by_name(s3_vllm: tuple[VLLMServer, str, str], s3_server: dict[str, Any]) -> None:
    server, root, cache = s3_vllm
    options = s3_server["storage_options"]
    _, uri = train_sampler(root, "s3run", "s1", storage_options=options)
    assert uri.startswith("s3://")
    expected = our_tokens(uri, options)
    assert served_tokens(server, "s3run/sampler_weights/s1") == expected
    digest = read_manifest(uri, options).content_sha256
    copy = os.path.join(cache, digest)
    status, models = server.request("GET", "/v1/models")
    assert status == 200, models
    assert {m["id"]: m["root"] for m in models["data"]}["s3run/sampler_weights/s1"] == copy
    assert os.listdir(cache) == [digest]
    inode = os.stat(copy).st_ino
    # Another name of the same content (a name vLLM resolves anew) is served from the same cached copy.
    assert served_tokens(server, f"s3run/sampler_weights/s1@{digest[:12]}") == expected
    assert os.listdir(cache) == [digest] and os.stat(copy).st_ino == inode  # reused, not downloaded again
    assert_not_served(server, "s3run/sampler_weights/missing", "unknown or unreadable checkpoint")
