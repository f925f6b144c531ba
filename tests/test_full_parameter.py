"""Full-parameter mode (``LoRAModule(rank=0)``, Fireworks' ``lora_rank=0``): every weight trained, with no PEFT;
sampler checkpoints are Hugging Face model directories plain transformers loads, training checkpoints add the
optimizer state and resume exactly; sampling, weights-only starts, merge, download and verify read them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from helpers.cli import cli_json
from helpers.full_parameter import FULL_KWARGS, IDS, SHARDS, LogitsAfterEachStep, logits_of
from helpers.resume import FULL_RESUME_KWARGS, adapter, train
from helpers.training import MODULE_KWARGS, batch_loader, make_trainer
from lightning_lora_ckpt import (
    CheckpointStore,
    LoRACheckpointIO,
    LoRAModule,
    NotServableError,
    PeriodicCheckpoint,
    SamplingClient,
    check_servable,
    merge_adapter,
)
from lightning_lora_ckpt.format.manifest import Manifest
from lightning_lora_ckpt.format.model_files import decode_model
from lightning_lora_ckpt.format.strict_json import CheckpointFormatError
from lightning_lora_ckpt.tools.convert import convert_layout, read_adapter


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """4 full-parameter steps with sampler and training checkpoints every 2 steps (asynchronous saves); every
    snapshot a base (``max_deltas=0``: tests/test_snapshot_chains.py has the chains)."""
    root = str(tmp_path_factory.mktemp("full") / "ckpts")
    io = LoRACheckpointIO(root=root, run_id="full", max_deltas=0)
    module, recorder = LoRAModule(**FULL_KWARGS), LogitsAfterEachStep()
    saver = PeriodicCheckpoint(every_n_train_steps=2, kind="both", save_final=False)
    make_trainer(io, max_steps=4, callbacks=[recorder, saver]).fit(module, batch_loader())
    return {"root": root, "module": module, "logits": recorder.logits}


def test_rank_zero_trains_every_parameter_with_no_peft(full_run: dict[str, Any]) -> None:
    module = full_run["module"]
    assert not any(isinstance(m, PeftModel) for m in module.modules())
    assert all(p.requires_grad for p in module.parameters()) and module.adapter_config() == {}
    with pytest.raises(ValueError, match=r"rank=0.*quantization=None"):
        LoRAModule("tiny-qwen3", rank=0, quantization="nf4")
    with pytest.raises(ValueError, match="rank=-1"):
        LoRAModule("tiny-qwen3", rank=-1)


def test_every_snapshot_loads_in_plain_transformers_with_the_trained_logits(full_run: dict[str, Any]) -> None:
    store = CheckpointStore(full_run["root"])
    checkpoints = store.list_checkpoints("full")
    assert sorted((c.checkpoint_type, c.step) for c in checkpoints) == [
        ("sampler", 2),
        ("sampler", 4),
        ("training", 2),
        ("training", 4),
    ]
    assert full_run["logits"][2].ne(full_run["logits"][4]).any()  # training moved the weights
    for checkpoint in checkpoints:
        path = Path(checkpoint.path)
        state = (
            {"training_state.json", "training_state.safetensors"} if checkpoint.checkpoint_type == "training" else set()
        )
        expected = {"checkpoint.json", "config.json", "generation_config.json", "model.safetensors.index.json", *SHARDS}
        expected |= {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", *state}
        assert {p.name for p in path.iterdir()} == expected
        assert checkpoint.lora_rank == 0 and store.verify(checkpoint.path).ok
        model = AutoModelForCausalLM.from_pretrained(path)  # no PEFT: a Hugging Face model directory
        torch.testing.assert_close(logits_of(model), full_run["logits"][checkpoint.step], rtol=0, atol=0)


def test_download_gives_the_same_model_directory(full_run: dict[str, Any], tmp_path: Path) -> None:
    uri = f"{full_run['root']}/full/sampler_weights/000004"
    out = CheckpointStore(full_run["root"]).download(uri, tmp_path / "copy")
    torch.testing.assert_close(logits_of(AutoModelForCausalLM.from_pretrained(out)), full_run["logits"][4])


def test_sampling_client_serves_the_checkpoints_own_model(full_run: dict[str, Any]) -> None:
    uri = "lora://full/sampler_weights/000002"
    client = SamplingClient.from_checkpoint(uri, root=full_run["root"])
    manifest = CheckpointStore(full_run["root"]).get(uri)
    assert (client.identity.run_id, client.identity.name) == ("full", "000002")
    assert client.identity.uri == manifest.path
    expected = torch.log_softmax(full_run["logits"][2][0, :-1], dim=-1).gather(-1, IDS[0, 1:, None])[:, 0]
    assert client.compute_logprobs(IDS[0].tolist())[1:] == pytest.approx(expected.tolist(), abs=1e-5)
    assert client.sample([1, 2, 3]).sequences[0].tokens
    model = client.model  # another full-parameter checkpoint goes into the same model's tensors
    assert client.load_adapter("lora://full/sampler_weights/000004", root=full_run["root"]).name == "000004"
    assert client.model is model
    torch.testing.assert_close(logits_of(client.model), full_run["logits"][4], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"trained on base model 'tiny-qwen3'.*onto 'tiny-llama'"):
        SamplingClient.from_checkpoint(uri, base_model="tiny-llama", root=full_run["root"])


def test_vllm_adapter_checks_refuse_a_full_checkpoint(full_run: dict[str, Any]) -> None:
    uri = f"{full_run['root']}/full/sampler_weights/000002"
    with pytest.raises(NotServableError, match=r"full-parameter checkpoint .* serve it as a model"):
        check_servable(uri)


def test_convert_a_full_checkpoint_stacked_and_back(full_run: dict[str, Any], tmp_path: Any) -> None:
    """A full training checkpoint -> stacked (one [L, ...] tensor per kind of layer weight, the config and tokenizer
    files beside it) -> a Hugging Face model directory again: bit-exact, loadable with the trained logits."""
    uri = f"{full_run['root']}/full/weights/000004"
    stacked = convert_layout(uri, tmp_path / "stacked", "stacked")
    weights = safetensors.torch.load_file(tmp_path / "stacked" / "model.stacked.safetensors")
    layers = full_run["module"].model.config.num_hidden_layers
    assert stacked.num_layers == {"model.layers": layers}
    assert weights["model.layers.{layers}.self_attn.q_proj.weight"].shape[0] == layers
    assert {"config.json", "layout.json"} <= set(os.listdir(tmp_path / "stacked"))
    back = convert_layout(tmp_path / "stacked", tmp_path / "hf", "unstacked", max_shard_size="300KB")
    original, _, _, files = read_adapter(uri)
    again, _, _, files_again = read_adapter(str(tmp_path / "stacked"))
    assert list(again) == list(original) and all(torch.equal(again[k], original[k]) for k in original)
    assert files_again == files and back.tensors == len(original)
    assert sorted(n for n in os.listdir(tmp_path / "hf") if n.startswith("model-")) == SHARDS
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    torch.testing.assert_close(logits_of(hf_model), full_run["logits"][4], rtol=0, atol=0)
    (tmp_path / "stacked" / "config.json").write_text("{}")
    with pytest.raises(CheckpointFormatError, match=r"config\.json differs from the sha256 layout\.json records"):
        convert_layout(tmp_path / "stacked", tmp_path / "hf2", "unstacked")


def test_weights_only_start_and_optimizer_restore(full_run: dict[str, Any]) -> None:
    uri = "lora://full/weights/000004"
    restored = LoRAModule.from_checkpoint(uri, root=full_run["root"])
    assert restored.hparams.rank == 0
    torch.testing.assert_close(logits_of(restored.model), full_run["logits"][4], rtol=0, atol=0)
    with_optimizer = LoRAModule.from_checkpoint(uri, with_optimizer=True, root=full_run["root"])
    make_trainer(max_steps=1).fit(with_optimizer, batch_loader(1))
    assert with_optimizer.trainer.optimizers[0].state  # the saved moments, stepped once
    started = LoRAModule(**FULL_KWARGS, init_from=f"{full_run['root']}/full/sampler_weights/000002")
    make_trainer(max_steps=1, callbacks=[probe := LogitsAfterEachStep()]).fit(started, batch_loader(1))
    assert torch.equal(probe.logits[0], full_run["logits"][2]) and started.trainer.global_step == 1
    snapshot = started.save_weights_and_get_sampling_client()  # in memory: later training does not change it
    expected = snapshot.compute_logprobs(IDS[0].tolist())
    make_trainer(max_steps=1).fit(started, batch_loader(1))
    assert snapshot.compute_logprobs(IDS[0].tolist()) == expected


def test_lora_and_full_checkpoints_refuse_each_other(full_run: dict[str, Any], trained: Any) -> None:
    lora_module, io, _ = trained
    lora_uri = lora_module.save_state("t")
    full_uri = f"{full_run['root']}/full/weights/000004"
    with pytest.raises(ValueError, match=r"full-parameter checkpoint .* build the module with rank=0"):
        make_trainer(io, max_steps=5).fit(LoRAModule(**MODULE_KWARGS), batch_loader(1), ckpt_path=full_uri)
    with pytest.raises(ValueError, match=r"holds a LoRA adapter \(rank 4\) .* \(rank=0\)"):
        make_trainer(io, max_steps=5).fit(LoRAModule(**FULL_KWARGS), batch_loader(1), ckpt_path=lora_uri)


def test_merge_writes_the_model_in_the_chosen_dtype(full_run: dict[str, Any], tmp_path: Path) -> None:
    uri = "lora://full/sampler_weights/000004"
    out = Path(merge_adapter(uri, tmp_path / "bf16", dtype="bfloat16", max_shard_size="100KB", root=full_run["root"]))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and (out / "tokenizer.json").is_file()
    merged = {k: v for s in shards for k, v in safetensors.torch.load_file(s).items()}
    source = Path(full_run["root"]) / "full" / "sampler_weights" / "000004"
    trained = {k: v for s in SHARDS for k, v in safetensors.torch.load_file(source / s).items()}
    assert merged.keys() == trained.keys()
    assert all(torch.equal(merged[k], v.to(torch.bfloat16)) for k, v in trained.items())  # cast once, nothing folded
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"trained on base model 'tiny-qwen3'.*onto 'tiny-llama'"):
        merge_adapter(uri, tmp_path / "other", base_model="tiny-llama", root=full_run["root"])
    same = merge_adapter(uri, tmp_path / "fp32", dtype="float32", root=full_run["root"])
    torch.testing.assert_close(
        logits_of(AutoModelForCausalLM.from_pretrained(same)), full_run["logits"][4], rtol=0, atol=0
    )


def test_command_line_reads_full_checkpoints(full_run: dict[str, Any], tmp_path: Path) -> None:
    root = ["--root", full_run["root"]]
    assert cli_json("info", "lora://full/weights/000004", *root)["lora_rank"] == 0
    assert cli_json("verify", "lora://full/weights/000004", *root)["ok"]
    cli_json("merge", "lora://full/sampler_weights/000004", str(tmp_path / "merged"), "--dtype", "float32", *root)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits_of(merged), full_run["logits"][4], rtol=0, atol=0)


def test_sampler_dtype_applies_to_sampler_checkpoints_only(tmp_path: Path) -> None:
    io = LoRACheckpointIO(root=str(tmp_path), run_id="bf16", async_save=False)
    module = LoRAModule(**{**FULL_KWARGS, "max_shard_size": "2GB"}, sampler_dtype="bfloat16")
    make_trainer(io, max_steps=1).fit(module, batch_loader(1))
    for name, dtype in ((module.save_weights_for_sampler("s"), "bfloat16"), (module.save_state("t"), "float32")):
        assert json.loads((Path(name) / "config.json").read_text())["dtype"] == dtype
        weights = safetensors.torch.load_file(Path(name) / "model.safetensors")
        assert {str(t.dtype) for t in weights.values()} == {f"torch.{dtype}"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: f.update({"../evil.json": f["config.json"]}), "does not hold"),
        (lambda f: f.update({"pytorch_model.bin": f["config.json"]}), "does not hold"),
        (lambda f: f.pop(SHARDS[1]), "every shard"),
        (lambda f: f.pop("model.safetensors.index.json"), "every shard"),
        (lambda f: f.update({"model.safetensors": f[SHARDS[0]]}), "every shard"),
        (lambda f: f.pop("config.json"), "no config.json"),
        (lambda f: f.pop("training_state.json"), "must list"),
        (lambda f: f["config.json"].update(size=2 << 20), "more than the 1048576 allowed"),
    ],
)
def test_manifest_refuses_a_full_checkpoint_that_is_not_a_model_directory(
    full_run: dict[str, Any], change: Any, message: str
) -> None:
    raw = (Path(full_run["root"]) / "full" / "weights" / "000004" / "checkpoint.json").read_bytes()
    data = json.loads(raw)
    change(data["files"])
    with pytest.raises(CheckpointFormatError, match=message):
        Manifest.from_dict(data, "forged")


def test_shards_that_do_not_match_their_index_are_refused(full_run: dict[str, Any]) -> None:
    path = Path(full_run["root"]) / "full" / "sampler_weights" / "000004"
    files = {p.name: p.read_bytes() for p in path.iterdir() if p.name != "checkpoint.json"}
    tensors, metadata = decode_model(files, str(path))
    assert "lm_head.weight" not in tensors and set(metadata) >= {"config.json", "tokenizer.json"}
    index = json.loads(files["model.safetensors.index.json"])
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = SHARDS[1] if index["weight_map"][name] == SHARDS[0] else SHARDS[0]
    with pytest.raises(CheckpointFormatError, match=f"does not match the shards for .*{name}"):
        decode_model({**files, "model.safetensors.index.json": json.dumps(index).encode()}, str(path))


RESUME_CHILD = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from helpers.resume import FULL_RESUME_KWARGS, train
    from lightning_lora_ckpt import LoRACheckpointIO
    io = LoRACheckpointIO(root=sys.argv[2], run_id="resume")
    module, losses = train(io, ckpt_path=sys.argv[3], module_kwargs=FULL_RESUME_KWARGS)
    module.save_weights_for_sampler("end")
    io.teardown()
    print(json.dumps(losses))
    """
)


def test_resume_in_a_new_process_is_bit_identical(tmp_path: Path) -> None:
    root = str(tmp_path / "ckpts")
    straight, straight_losses = train(LoRACheckpointIO(root=root, run_id="straight"), module_kwargs=FULL_RESUME_KWARGS)
    saver = PeriodicCheckpoint(every_n_train_steps=8, kind="state", save_final=False)
    io = LoRACheckpointIO(root=root, run_id="resume")
    first, first_losses = train(io, stop_at=8, callbacks=[saver], module_kwargs=FULL_RESUME_KWARGS)
    args = [sys.executable, "-c", RESUME_CHILD, str(Path(__file__).parent), root, "lora://resume/weights/000008"]
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    assert first_losses + json.loads(out.stdout.strip().splitlines()[-1]) == straight_losses
    resumed = LoRAModule.from_checkpoint("lora://resume/sampler_weights/end", root=root)
    expected = adapter(straight)
    assert set(adapter(resumed)) == set(expected)
    assert all(torch.equal(expected[k], v) for k, v in adapter(resumed).items())
    assert not all(torch.equal(expected[k], v) for k, v in adapter(first).items())  # training moved it
