"""Hotloading full-parameter checkpoints into a ``SamplingClient`` (``modeling.snapshot_hotload``): a delta of the
served snapshot is applied to the model's tensors in place and checked before anything changes; anything else is
read whole and copied into the same tensors. The model is never rebuilt, and the logits are exactly the trained
ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers.full_parameter import SHARDS, LogitsAfterEachStep, logits_of
from helpers.training import batch_loader, make_trainer
from lightning_lora_ckpt import LoRACheckpointIO, LoRAModule, PeriodicCheckpoint, SamplingClient
from lightning_lora_ckpt.format.strict_json import CheckpointFormatError

STEPS = ["000001", "000002", "000003"]


@pytest.fixture(scope="module", params=["single", "sharded"])
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """3 full-parameter steps with a sampler snapshot after each (a base, then 2 deltas), in one weight file or two."""
    root = tmp_path_factory.mktemp("hot") / "ckpts"
    io = LoRACheckpointIO(root=str(root), run_id="hot", async_save=False, max_deltas=3)
    shards = {"max_shard_size": "300KB"} if request.param == "sharded" else {}
    module = LoRAModule(base_model="tiny-qwen3", rank=0, learning_rate=1e-3, **shards)
    recorder = LogitsAfterEachStep()
    saver = PeriodicCheckpoint(every_n_train_steps=1, kind="sampler", save_final=False)
    make_trainer(io, max_steps=3, callbacks=[recorder, saver]).fit(module, batch_loader())
    weights = SHARDS if shards else ["model.safetensors"]
    return {"root": root, "logits": recorder.logits, "weights": weights}


def uri(root: Path, name: str) -> str:
    return str(root / "hot" / "sampler_weights" / name)


def storages(client: SamplingClient) -> list[int]:
    return [t.data_ptr() for t in client.model.state_dict().values()]


def test_the_chain_is_a_base_then_deltas(run: dict[str, Any]) -> None:
    manifests = [json.loads(Path(uri(run["root"], n), "checkpoint.json").read_text()) for n in STEPS]
    assert [(m["snapshot"], m.get("parent")) for m in manifests] == [
        ("base", None),
        ("delta", "000001"),
        ("delta", "000002"),
    ]
    assert all(set(m["rebuilds"]) == set(run["weights"]) for m in manifests[1:])


def test_deltas_of_the_served_snapshot_are_applied_in_place(run: dict[str, Any]) -> None:
    client = SamplingClient.from_checkpoint(uri(run["root"], "000001"))
    model, before = client.model, storages(client)
    torch.testing.assert_close(logits_of(client.model), run["logits"][1], rtol=0, atol=0)
    for step, name in enumerate(STEPS[1:], start=2):
        identity = client.load_adapter(uri(run["root"], name))
        assert client.last_hotload is not None and client.last_hotload.in_place
        assert (identity.name, client.identity) == (name, identity)
        assert client.model is model and storages(client) == before
        fresh = SamplingClient.from_checkpoint(uri(run["root"], name))
        assert identity == fresh.identity
        torch.testing.assert_close(logits_of(client.model), run["logits"][step], rtol=0, atol=0)
        torch.testing.assert_close(logits_of(client.model), logits_of(fresh.model), rtol=0, atol=0)


def test_any_other_snapshot_is_copied_in_and_the_chain_goes_on_from_it(run: dict[str, Any]) -> None:
    client = SamplingClient.from_checkpoint(uri(run["root"], "000001"))
    model, before = client.model, storages(client)
    for name, step, in_place in [("000003", 3, False), ("000001", 1, False), ("000002", 2, True)]:
        # 000003 is a delta of 000002, not of the served 000001; 000001 is a base; 000002 a delta of 000001 again.
        assert client.load_adapter(uri(run["root"], name)).name == name
        assert client.last_hotload is not None and client.last_hotload.in_place is in_place
        assert client.model is model and storages(client) == before
        torch.testing.assert_close(logits_of(client.model), run["logits"][step], rtol=0, atol=0)


def test_a_delta_that_rebuilds_another_file_changes_nothing(run: dict[str, Any], tmp_path: Path) -> None:
    root = Path(shutil.copytree(run["root"], tmp_path / "copy"))
    manifest = Path(uri(root, "000002"), "checkpoint.json")
    data = json.loads(manifest.read_text())
    lied = run["weights"][-1]  # of two shards the second: the first rebuilds right and must not be written either
    digest = data["rebuilds"][lied]["blake3"]
    data["rebuilds"][lied]["blake3"] = ("0" if digest[0] != "0" else "1") + digest[1:]
    manifest.write_text(json.dumps(data))
    client = SamplingClient.from_checkpoint(uri(root, "000001"))
    identity, before = client.identity, logits_of(client.model)
    with pytest.raises(CheckpointFormatError, match=rf"{uri(root, '000002')}: its {lied}.*digest mismatch"):
        client.load_adapter(uri(root, "000002"))
    assert client.identity == identity and client.last_hotload is None
    torch.testing.assert_close(logits_of(client.model), before, rtol=0, atol=0)
    torch.testing.assert_close(before, run["logits"][1], rtol=0, atol=0)
    client.load_adapter(uri(run["root"], "000002"))  # the genuine delta still fits: 000001's weights, exactly
    assert client.last_hotload is not None and client.last_hotload.in_place
    torch.testing.assert_close(logits_of(client.model), run["logits"][2], rtol=0, atol=0)


def test_a_client_in_another_dtype_than_the_files_copies_them_in(run: dict[str, Any]) -> None:
    client = SamplingClient.from_checkpoint(uri(run["root"], "000001"), dtype="bfloat16")
    model = client.model
    for name in STEPS[1:]:
        assert client.load_adapter(uri(run["root"], name)).name == name
        assert client.last_hotload is not None and not client.last_hotload.in_place
        assert client.model is model and next(model.parameters()).dtype == torch.bfloat16
        fresh = SamplingClient.from_checkpoint(uri(run["root"], name), dtype="bfloat16")
        torch.testing.assert_close(logits_of(client.model), logits_of(fresh.model), rtol=0, atol=0)


def test_lora_and_full_parameter_clients_and_checkpoints_do_not_mix(run: dict[str, Any], trained: Any) -> None:
    lora_uri = trained[0].save_state("t")
    full = SamplingClient.from_checkpoint(uri(run["root"], "000001"))
    with pytest.raises(ValueError, match=r"full-parameter checkpoint .* has no adapter to swap"):
        full.load_adapter(lora_uri)
    torch.testing.assert_close(logits_of(full.model), run["logits"][1], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"full-parameter checkpoint .* has no adapter to swap"):
        SamplingClient.from_checkpoint(lora_uri).load_adapter(uri(run["root"], "000002"))
