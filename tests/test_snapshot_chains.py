"""Snapshot chains of full-parameter sampler checkpoints (Fireworks' base / delta): the plugin writes a base, then
deltas against the previous snapshot, and a base again after ``max_deltas``; every reader rebuilds a delta's weights
bit-exactly; deletion refuses (or cascades) to remove a parent a delta needs; hostile chains are refused."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from transformers import AutoModelForCausalLM

from helpers.cli import cli, cli_json
from helpers.full_parameter import FULL_KWARGS, IDS, SHARDS, LogitsAfterEachStep, logits_of
from helpers.training import batch_loader, make_trainer
from lightning_lora_ckpt import (
    CheckpointConflictError,
    CheckpointStore,
    KeepLatest,
    LoRACheckpointIO,
    LoRAModule,
    PeriodicCheckpoint,
    SamplingClient,
    merge_adapter,
)
from lightning_lora_ckpt.format import snapshots
from lightning_lora_ckpt.format.digests import digest_hex
from lightning_lora_ckpt.format.manifest import Manifest
from lightning_lora_ckpt.format.snapshot_delta import MAGIC, encode_delta
from lightning_lora_ckpt.format.strict_json import CheckpointFormatError
from lightning_lora_ckpt.format.tensor_files import render_like
from lightning_lora_ckpt.policy.retention import NEEDED_BY_DELTA
from lightning_lora_ckpt.storage.loading import open_checkpoint

STEPS = ["000001", "000002", "000003", "000004"]


@pytest.fixture(scope="module")
def chain_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """4 full-parameter steps, a sampler snapshot after each, at most 2 deltas per chain (asynchronous saves)."""
    root = str(tmp_path_factory.mktemp("chain") / "ckpts")
    io = LoRACheckpointIO(root=root, run_id="chain", max_deltas=2)
    module, recorder = LoRAModule(**FULL_KWARGS), LogitsAfterEachStep()
    saver = PeriodicCheckpoint(every_n_train_steps=1, kind="sampler", save_final=False)
    make_trainer(io, max_steps=4, callbacks=[recorder, saver]).fit(module, batch_loader())
    return {"root": root, "logits": recorder.logits}


@pytest.fixture
def copy(chain_run: dict[str, Any], tmp_path: Path) -> Path:
    """A copy of the chain's root, to damage."""
    return Path(shutil.copytree(chain_run["root"], tmp_path / "copy"))


def folder(root: str | Path) -> Path:
    return Path(root) / "chain" / "sampler_weights"


def manifest_data(root: str | Path, name: str) -> dict[str, Any]:
    return json.loads((folder(root) / name / "checkpoint.json").read_text())


def write_manifest(root: str | Path, name: str, data: dict[str, Any]) -> None:
    (folder(root) / name / "checkpoint.json").write_text(json.dumps(data))


def test_a_base_then_deltas_then_a_base_again(chain_run: dict[str, Any]) -> None:
    store = CheckpointStore(chain_run["root"])
    listed = {c.checkpoint_id.split("/")[1]: c for c in store.list_checkpoints("chain")}
    assert [(listed[n].snapshot, listed[n].parent) for n in STEPS] == [
        ("base", None),
        ("delta", "000001"),
        ("delta", "000002"),
        ("base", None),  # max_deltas=2: the chain is compacted into a new base
    ]
    for name in ("000002", "000003"):
        files = set(manifest_data(chain_run["root"], name)["files"])
        assert {f"{s}.xor.zst" for s in SHARDS} <= files and not set(SHARDS) & files
        assert listed[name].size_bytes < 0.9 * listed["000001"].size_bytes
        assert set(store.manifest(listed[name].path).rebuilds) == set(SHARDS)


def test_every_snapshot_rebuilds_bit_exactly_and_loads_in_plain_transformers(
    chain_run: dict[str, Any], tmp_path: Path
) -> None:
    store = CheckpointStore(chain_run["root"])
    for step, name in enumerate(STEPS, start=1):
        out = Path(store.download(f"lora://chain/sampler_weights/{name}", tmp_path / name))
        assert {p.name for p in out.iterdir()} >= {*SHARDS, "config.json", "checkpoint.json"}
        assert not list(out.glob("*.xor.zst"))
        copied = Manifest.from_json((out / "checkpoint.json").read_bytes(), "copy")
        assert copied.snapshot == "base" and copied.parent is None and store.verify(str(out)).ok
        model = AutoModelForCausalLM.from_pretrained(out)  # a plain model directory, no PEFT
        torch.testing.assert_close(logits_of(model), chain_run["logits"][step], rtol=0, atol=0)
        opened = open_checkpoint(f"{folder(chain_run['root'])}/{name}")
        assert {s: bytes(opened.files[s]) for s in SHARDS} == {s: (out / s).read_bytes() for s in SHARDS}


def test_sampling_merge_and_the_command_line_read_deltas(chain_run: dict[str, Any], tmp_path: Path) -> None:
    uri, root = "lora://chain/sampler_weights/000003", chain_run["root"]
    client = SamplingClient.from_checkpoint(uri, root=root)
    expected = torch.log_softmax(chain_run["logits"][3][0, :-1], dim=-1).gather(-1, IDS[0, 1:, None])[:, 0]
    assert client.compute_logprobs(IDS[0].tolist())[1:] == pytest.approx(expected.tolist(), abs=1e-5)
    merged = merge_adapter(uri, tmp_path / "merged", dtype="float32", root=root)
    torch.testing.assert_close(
        logits_of(AutoModelForCausalLM.from_pretrained(merged)), chain_run["logits"][3], rtol=0, atol=0
    )
    info = cli_json("info", uri, "--root", root)
    assert (info["snapshot"], info["parent"]) == ("delta", "000002") and set(info["rebuilds"]) == set(SHARDS)
    assert cli_json("verify", uri, "--root", root)["ok"]


def test_verify_checks_the_whole_chain(copy: Path) -> None:
    shard = folder(copy) / "000001" / SHARDS[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    report = CheckpointStore(str(copy)).verify("lora://chain/sampler_weights/000003")
    assert not report.ok and any("000001" in p and SHARDS[0] in p for p in report.problems)
    assert CheckpointStore(str(copy)).verify("lora://chain/sampler_weights/000004").ok


def test_deleting_a_parent_a_delta_needs_is_refused_or_cascades(copy: Path) -> None:
    store = CheckpointStore(str(copy))
    with pytest.raises(CheckpointConflictError, match=r"Cannot delete .*000001: delta snapshot\(s\) \['000002'\]"):
        store.delete("lora://chain/sampler_weights/000001")
    refused = cli("delete", "lora://chain/sampler_weights/000002", "-y", "--root", str(copy))
    assert refused.returncode != 0 and "need it" in refused.stderr
    # expiry and retention leave needed parents alone too, soft-deleted deltas included
    for name in ("000001", "000002"):
        store.set_ttl(f"lora://chain/sampler_weights/{name}", 1)
    assert store.gc(now=store.get("lora://chain/sampler_weights/000004").time.replace(year=2100)) == []
    plan = store.prune("chain", KeepLatest(2))  # keeps 000003, whose chain needs 000002 and 000001
    assert plan.delete == [] and {plan.reasons[c.path] for c in plan.keep if c.step < 3} == {NEEDED_BY_DELTA}
    plan = store.prune("chain", KeepLatest(1))  # the whole chain goes, its newest delta first
    assert sorted(c.checkpoint_id for c in plan.delete) == [f"sampler_weights/{n}" for n in STEPS[:3]]
    store.restore("lora://chain/sampler_weights/000003")  # it rebuilds from its soft-deleted parents, which stay
    assert store.gc(grace=0) == [] and store.verify("lora://chain/sampler_weights/000003").ok
    assert sorted(p.name for p in folder(copy).iterdir()) == STEPS
    # with cascade, the deltas go first, then the parent; the next chain's base is untouched
    deleted = store.delete("lora://chain/sampler_weights/000001", cascade=True)
    assert deleted.checkpoint_id == "sampler_weights/000001"
    assert sorted(p.name for p in folder(copy).iterdir()) == ["000004"]


def test_gc_deletes_a_whole_expired_chain_in_one_pass(copy: Path) -> None:
    store = CheckpointStore(str(copy))
    for name in STEPS[:3]:
        store.set_ttl(f"lora://chain/sampler_weights/{name}", 1)
    later = store.get("lora://chain/sampler_weights/000004").time.replace(year=2100)
    assert sorted(c.checkpoint_id for c in store.gc(now=later)) == [f"sampler_weights/{n}" for n in STEPS[:3]]
    assert CheckpointStore(str(copy)).verify("lora://chain/sampler_weights/000004").ok


def test_compaction_rewrites_a_delta_as_a_base_with_the_same_weights(copy: Path) -> None:
    store, uri = CheckpointStore(str(copy)), "lora://chain/sampler_weights/000002"
    before = open_checkpoint(uri, str(copy))
    compacted = store.compact(uri)
    assert (compacted.snapshot, compacted.parent) == ("base", None)
    assert set(manifest_data(copy, "000002")["files"]) >= set(SHARDS)
    assert {s: bytes(before.files[s]) for s in SHARDS} == {
        s: (folder(copy) / "000002" / s).read_bytes() for s in SHARDS
    }
    assert store.verify("lora://chain/sampler_weights/000003").ok  # its delta still rebuilds from the new base
    store.delete("lora://chain/sampler_weights/000001")  # no longer needed by anything
    assert store.verify("lora://chain/sampler_weights/000003").ok
    refused = cli("compact", uri, "--root", str(copy))
    assert refused.returncode != 0 and "not a delta snapshot" in refused.stderr
    assert cli_json("compact", "lora://chain/sampler_weights/000003", "--root", str(copy))["snapshot"] == "base"


def _forge_cycle(root: Path) -> str:
    data = manifest_data(root, "000002")
    data["parent"] = "000003"
    data["parent_files"] = manifest_data(root, "000003")["rebuilds"]
    write_manifest(root, "000002", data)
    return "is a cycle"


def _forge_missing_parent(root: Path) -> str:
    shutil.rmtree(folder(root) / "000001")
    return r"delta of .*000001, which is missing"


def _forge_replaced_parent(root: Path) -> str:
    shutil.rmtree(folder(root) / "000001")
    shutil.copytree(folder(root) / "000004", folder(root) / "000001")
    data = manifest_data(root, "000001")
    data["name"] = "000001"
    write_manifest(root, "000001", data)
    return "is not the file the delta was taken against"


def _forge_other_base(root: Path) -> str:
    data = manifest_data(root, "000001")
    data["base_model"]["fingerprint"] = "0" * 64
    write_manifest(root, "000001", data)
    return "trained on base 'tiny-qwen3', another base"


def _forge_lying_delta(root: Path) -> str:
    """A delta whose frames state far more bytes than their chunks, with a manifest entry that matches it."""
    name = f"{SHARDS[0]}.xor.zst"
    data = manifest_data(root, "000002")
    size = data["rebuilds"][SHARDS[0]]["size"]
    bomb = encode_delta(bytes(size * 4), bytes(size * 4))
    assert bomb is not None
    header = json.dumps({"size": size, "chunk": size * 4, "frames": [len(bomb) - 100]}).encode()
    forged = MAGIC + len(header).to_bytes(4, "little") + header + bomb[-(len(bomb) - 100) :]
    (folder(root) / "000002" / name).write_bytes(forged)
    data["files"][name] = {"size": len(forged), "blake3": digest_hex(forged, "blake3")}
    write_manifest(root, "000002", data)
    return "Delta .* (is malformed|holds a frame)"


@pytest.mark.parametrize(
    "forge",
    [_forge_cycle, _forge_missing_parent, _forge_replaced_parent, _forge_other_base, _forge_lying_delta],
)
def test_hostile_chains_are_refused_by_every_reader(copy: Path, forge: Any, tmp_path: Path) -> None:
    message = forge(copy)
    uri, store = "lora://chain/sampler_weights/000003", CheckpointStore(str(copy))
    with pytest.raises(CheckpointFormatError, match=message):
        open_checkpoint(uri, str(copy))
    with pytest.raises(CheckpointFormatError, match=message):
        store.download(uri, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    report = store.verify(uri)
    assert not report.ok


def test_an_overlong_chain_is_refused(copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lightning_lora_ckpt.storage.chain.MAX_CHAIN", 1)
    with pytest.raises(CheckpointFormatError, match="longer than 1 links"):
        open_checkpoint("lora://chain/sampler_weights/000003", str(copy))
    open_checkpoint("lora://chain/sampler_weights/000002", str(copy))  # one link: fine


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(snapshot="full"), "unknown snapshot"),
        (lambda d: d.pop("parent"), "names its parent"),
        (lambda d: d.update(parent="000002"), "names its parent"),  # itself
        (lambda d: d.update(parent="../x"), "parent checkpoint name"),
        (lambda d: d.update(parent_files={}), "lists the weight files it rebuilds"),
        (lambda d: d["rebuilds"][SHARDS[0]].update(size=7), "rebuilds 7 bytes from a parent file of"),
        (lambda d: d["files"][f"{SHARDS[0]}.xor.zst"].update(size=1 << 40), "more than a delta of"),
        (lambda d: d["files"].update({SHARDS[0]: d["rebuilds"][SHARDS[0]]}), "and only so"),
        (lambda d: d.update(checkpoint_type="training"), "only full-parameter sampler checkpoints"),
    ],
)
def test_forged_snapshot_fields_are_refused(chain_run: dict[str, Any], change: Any, message: str) -> None:
    data = manifest_data(chain_run["root"], "000002")
    change(data)
    with pytest.raises(CheckpointFormatError, match=message):
        Manifest.from_dict(data, "forged")


def test_a_base_has_no_chain_fields(chain_run: dict[str, Any]) -> None:
    data = manifest_data(chain_run["root"], "000001")
    assert data["snapshot"] == "base" and not {"parent", "rebuilds", "parent_files"} & set(data)
    data["parent"] = "000002"
    with pytest.raises(CheckpointFormatError, match="only a delta snapshot"):
        Manifest.from_dict(data, "forged")


def test_max_deltas(tmp_path: Path) -> None:
    io = LoRACheckpointIO(root=str(tmp_path), run_id="bases", async_save=False, max_deltas=0)
    saver = PeriodicCheckpoint(every_n_train_steps=1, kind="sampler", save_final=False)
    make_trainer(io, max_steps=2, callbacks=[saver]).fit(LoRAModule(**FULL_KWARGS), batch_loader(2))
    listed = CheckpointStore(str(tmp_path)).list_checkpoints("bases")
    assert [c.snapshot for c in listed] == ["base", "base"]
    with pytest.raises(ValueError, match="max_deltas must be a non-negative integer"):
        LoRACheckpointIO(max_deltas=-1)
    assert snapshots.MAX_CHAIN >= 2


def test_chains_on_an_object_store(s3_server: dict[str, Any], tmp_path: Path) -> None:
    """Over S3 (moto on loopback): deltas written and rebuilt, a needed parent kept, a replaced parent refused."""
    root, options = f"s3://{s3_server['bucket']}/{uuid.uuid4().hex}", s3_server["storage_options"]
    io = LoRACheckpointIO(root=root, run_id="chain", async_save=False, storage_options=options)
    module, recorder = LoRAModule(**FULL_KWARGS), LogitsAfterEachStep()
    saver = PeriodicCheckpoint(every_n_train_steps=1, kind="sampler", save_final=False)
    make_trainer(io, max_steps=3, callbacks=[recorder, saver]).fit(module, batch_loader(3))
    store = CheckpointStore(root, options)
    assert [c.snapshot for c in store.list_checkpoints("chain")] == ["base", "delta", "delta"]
    out = store.download("lora://chain/sampler_weights/000003", tmp_path / "out")
    torch.testing.assert_close(logits_of(AutoModelForCausalLM.from_pretrained(out)), recorder.logits[3], rtol=0, atol=0)
    with pytest.raises(CheckpointConflictError, match=r"\['000003'\] need it"):
        store.delete("lora://chain/sampler_weights/000002")
    # saving over a parent would lose its deltas: refused before anything is written
    with pytest.raises(CheckpointConflictError, match=r"Cannot replace .*000001: delta snapshot\(s\) \['000002'\]"):
        module.save_weights_for_sampler("000001")
    assert store.verify("lora://chain/sampler_weights/000003").ok
    store.delete("lora://chain/sampler_weights/000001", cascade=True)
    assert [c.checkpoint_id for c in store.list_checkpoints("chain")] == []


def test_render_like_writes_what_safetensors_writes() -> None:
    """The writer lays a snapshot out in the last one's buffer: the very bytes safetensors would serialise."""
    first = {"b": torch.randn(3, 5).to(torch.bfloat16), "a": torch.arange(7.0), "c": torch.zeros(0)}
    template = safetensors.torch.save(first, metadata={"format": "pt"})
    later = {"a": torch.arange(7.0) * 2, "b": torch.randn(5, 3).to(torch.bfloat16).t(), "c": torch.zeros(0)}
    out = bytearray(len(template))
    assert render_like(template, later, out)
    assert bytes(out) == safetensors.torch.save(
        {k: v.contiguous() for k, v in later.items()}, metadata={"format": "pt"}
    )
    assert not render_like(template, {**later, "a": torch.arange(7)}, out)  # another dtype
    assert not render_like(template, {**later, "b": torch.zeros(5, 3, dtype=torch.bfloat16)}, out)  # another shape
    assert not render_like(template, {"a": later["a"]}, out)  # a tensor missing
