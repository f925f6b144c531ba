"""QLoRA: training on a bitsandbytes-quantized base (nf4, int8) and bitsandbytes' 8-bit AdamW."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from helpers.compare import assert_same_state
from helpers.resume import LossRecorder, StopAt, adapter, shuffled_loader
from helpers.training import MODULE_KWARGS, batch_loader, make_trainer, token_batches
from lightning_lora_ckpt import (
    LoRACheckpointIO,
    LoRAModule,
    PeriodicCheckpoint,
    SamplingClient,
    SamplingParams,
    load_base_model,
    merge_adapter,
)
from lightning_lora_ckpt.format.manifest import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from lightning_lora_ckpt.modeling.base import config_fingerprint
from lightning_lora_ckpt.storage.read import read_manifest

bnb = pytest.importorskip("bitsandbytes")

# rank 32 makes some adapter tensors big enough (>= 4096 elements) for 8-bit optimizer state.
QLORA_KWARGS = {**MODULE_KWARGS, "rank": 32, "dropout": 0.1, "warmup_steps": 2, "lr_schedule": "linear"}
LAYER_TYPES = {"nf4": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt}
IDS = token_batches(1)[0]["input_ids"]


def train(
    io: LoRACheckpointIO | None,
    quantization: str,
    optimizer: str,
    stop_at: int | None = None,
    ckpt_path: str | None = None,
    callbacks: list[Any] = (),
    accelerator: str = "cpu",
) -> tuple[LoRAModule, list[float]]:
    """4 steps of QLoRA on shuffled batches, as test_resume.train does in full precision."""
    import lightning as L

    L.seed_everything(0)
    module = LoRAModule(**QLORA_KWARGS, quantization=quantization, optimizer=optimizer)
    recorder = LossRecorder()
    callbacks = [recorder, *callbacks, *([StopAt(stop_at)] if stop_at else [])]
    trainer = make_trainer(io, max_steps=4, callbacks=callbacks, accelerator=accelerator)
    # Stateful: the resume at step 2 is mid-epoch, where only a StatefulDataLoader continues at the next batch.
    trainer.fit(module, shuffled_loader(stateful=True), ckpt_path=ckpt_path)
    return module, recorder.losses


RESUME_CHILD = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from test_qlora import train
    from lightning_lora_ckpt import LoRACheckpointIO
    io = LoRACheckpointIO(root=sys.argv[2], run_id="resume", async_save=False)
    module, losses = train(io, sys.argv[4], sys.argv[5], ckpt_path=sys.argv[3], accelerator=sys.argv[6])
    module.save_weights_for_sampler("end")
    print(json.dumps(losses))
    """
)


def logprobs(module: LoRAModule, ids: torch.Tensor = IDS[:1]) -> torch.Tensor:
    """The module's log-probability of each next token, computed in eval mode (its mode is kept)."""
    training = module.training
    module.eval()
    with torch.no_grad():
        logits = module(ids.to(module.device)).float().cpu()
    module.train(training)
    return torch.log_softmax(logits[0, :-1], dim=-1).gather(-1, ids[0, 1:, None])[:, 0]


def bnb_layers(model: torch.nn.Module, quantization: str) -> int:
    return sum(isinstance(m, LAYER_TYPES[quantization]) for m in model.modules())


def resume_in_new_process(tmp_path: Path, quantization: str, optimizer: str, accelerator: str = "cpu") -> str:
    """Train 4 steps straight, and 2 + save + resume in a new process + 2; both must match exactly."""
    root = str(tmp_path / "ckpts")
    straight, straight_losses = train(
        LoRACheckpointIO(root=root, run_id="straight"), quantization, optimizer, accelerator=accelerator
    )
    io = LoRACheckpointIO(root=root, run_id="resume", async_save=False)
    saver = PeriodicCheckpoint(every_n_train_steps=2, kind="state", save_final=False)
    first, first_losses = train(io, quantization, optimizer, stop_at=2, callbacks=[saver], accelerator=accelerator)
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    args = [str(Path(__file__).parent), root, "lora://resume/weights/000002", quantization, optimizer, accelerator]
    out = subprocess.run([sys.executable, "-c", RESUME_CHILD, *args], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert first_losses + json.loads(out.stdout.strip().splitlines()[-1]) == straight_losses
    end = f"{root}/resume/sampler_weights/end"
    resumed = LoRAModule.from_checkpoint(end)
    expected = adapter(straight)
    assert all(torch.equal(expected[k].cpu(), v) for k, v in adapter(resumed).items())
    assert not all(torch.equal(expected[k], v) for k, v in adapter(first).items())  # training moved it
    return end


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_quantized_builtin_base_is_deterministic_and_keeps_the_fp_identity(quantization: str) -> None:
    first, second = (load_base_model("tiny-qwen3", quantization=quantization) for _ in range(2))
    assert bnb_layers(first, quantization) == 14  # every linear layer of both decoder layers, not the head
    assert type(first.lm_head) is torch.nn.Linear and first.lm_head.weight is first.model.embed_tokens.weight
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert config_fingerprint(first.config) == config_fingerprint(load_base_model("tiny-qwen3").config)
    # An eval pass without grad (validation, sampling) must not change what training computes: bitsandbytes
    # repacks 4-bit weights in place for a bf16 CPU kernel unless told not to.
    with torch.no_grad():
        before = first(IDS).logits
        first.eval()
        evaluated = first(IDS).logits
        first.train()
        after = first(IDS).logits
    assert torch.equal(before, after)
    # On the CPU int8 layers dequantize their weights in training and quantize activations too in eval
    # (LLM.int8()); 4-bit layers compute the same either way.
    assert torch.equal(before, evaluated) == (quantization == "nf4")


@pytest.mark.parametrize(("quantization", "optimizer"), [("nf4", "adamw8bit"), ("int8", "paged_adamw8bit")])
def test_qlora_resumes_exactly_in_new_process_and_samples(tmp_path: Path, quantization: str, optimizer: str) -> None:
    end = resume_in_new_process(tmp_path, quantization, optimizer)
    client = SamplingClient.from_checkpoint(end)
    assert bnb_layers(client.model, quantization) == 14  # rebuilt on the base quantized as in training
    reference = LoRAModule.from_checkpoint(end)
    assert reference.hparams.quantization == quantization
    ids = IDS[0, :8].tolist()
    assert client.compute_logprobs(ids)[1:] == logprobs(reference, IDS[:1, :8]).tolist()
    params = SamplingParams(max_tokens=4, temperature=1.0, seed=3)
    runs = [client.sample(ids, params, num_samples=2).sequences for _ in range(2)]
    assert runs[0] == runs[1] and all(len(s.tokens) == 4 for s in runs[0])


def test_adamw8bit_state_round_trips_exactly(tmp_path: Path) -> None:
    io = LoRACheckpointIO(root=str(tmp_path), run_id="run", async_save=False)
    module = LoRAModule(**QLORA_KWARGS, quantization="nf4", optimizer="adamw8bit")
    trainer = make_trainer(io, max_steps=3)
    trainer.fit(module, batch_loader(3))
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    saved = copy.deepcopy(optimizer.state_dict())  # state_dict() holds the live moments
    uri = module.save_state("t")
    loaded = io.load_checkpoint(uri)["optimizer_states"][0]
    assert_same_state(loaded, saved)
    quant = [s["__bnb_optimizer_quant_state__"] for s in saved["state"].values()]
    assert {q["state1"].dtype for q in quant} == {torch.uint8, torch.float32}  # both kinds of moments covered
    assert any("absmax1" in q and "qmap1" in q for q in quant)

    class Probe(LossRecorder):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self.state = copy.deepcopy(trainer.optimizers[0].state_dict())

    restored, probe = LoRAModule.from_checkpoint(uri, with_optimizer=True), Probe()
    assert restored.hparams.optimizer == "adamw8bit" and restored.hparams.quantization == "nf4"
    make_trainer(max_steps=1, callbacks=[probe]).fit(restored, batch_loader(1))
    assert_same_state(probe.state, saved)


def train_sampler(tmp_path_factory: pytest.TempPathFactory, quantization: str) -> tuple[LoRAModule, str]:
    """A rank-4 adapter trained 2 steps on the quantized base, and its sampler checkpoint."""
    io = LoRACheckpointIO(root=str(tmp_path_factory.mktemp(quantization)), run_id="run", async_save=False)
    module = LoRAModule(**MODULE_KWARGS, quantization=quantization)
    make_trainer(io, max_steps=2).fit(module, batch_loader(2))
    return module, module.save_weights_for_sampler(quantization)


@pytest.fixture(scope="module")
def nf4_sampler(tmp_path_factory: pytest.TempPathFactory) -> tuple[LoRAModule, str]:
    return train_sampler(tmp_path_factory, "nf4")


@pytest.fixture(scope="module")
def int8_sampler(tmp_path_factory: pytest.TempPathFactory) -> tuple[LoRAModule, str]:
    return train_sampler(tmp_path_factory, "int8")


def test_qlora_checkpoint_is_peft_format_and_loads_on_the_fp_base(nf4_sampler, trained) -> None:
    module, uri = nf4_sampler
    fp_module = trained[0]
    manifest = read_manifest(uri)
    assert set(manifest.files) == {ADAPTER_WEIGHTS, ADAPTER_CONFIG}
    assert manifest.base_model.quantization == "nf4"
    assert manifest.base_model.fingerprint == fp_module.base_model_ref.fingerprint
    peft_model = PeftModel.from_pretrained(load_base_model("tiny-qwen3"), uri).eval()
    full_precision = LoRAModule.from_checkpoint(uri, quantization=None)
    assert bnb_layers(full_precision.model, "nf4") == 0
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=IDS).logits, full_precision.eval()(IDS), rtol=0, atol=0)
    assert torch.equal(logprobs(LoRAModule.from_checkpoint(uri)), logprobs(module))  # nf4 again by default
    client = SamplingClient.from_checkpoint(uri, quantization=None)
    assert bnb_layers(client.model, "nf4") == 0
    assert client.compute_logprobs(IDS[0].tolist())[1:] == logprobs(full_precision, IDS[:1]).tolist()
    # ... and the other way round: an adapter trained in full precision onto an nf4 base.
    on_nf4 = LoRAModule.from_checkpoint(fp_module.save_weights_for_sampler("fp"), quantization="nf4")
    assert bnb_layers(on_nf4.model, "nf4") == 14
    expected = adapter(fp_module)
    assert all(torch.equal(expected[k], v) for k, v in adapter(on_nf4).items())


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_merging_a_qlora_checkpoint_folds_it_into_the_fp_base(
    quantization: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    module, uri = request.getfixturevalue(f"{quantization}_sampler")
    out = merge_adapter(uri, tmp_path / "merged", dtype="float32")
    assert "quantization_config" not in json.loads(Path(out, "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert bnb_layers(merged, quantization) == 0
    full_precision = LoRAModule.from_checkpoint(uri, quantization=None).eval()
    with torch.no_grad():
        logits = merged(input_ids=IDS).logits
        torch.testing.assert_close(logits, full_precision(IDS), atol=1e-4, rtol=1e-4)
        assert (logits - module.eval()(IDS)).abs().max() > 0.1  # not the quantized model's


def test_in_memory_snapshot_on_int8_base_shares_it_and_stays_fixed() -> None:
    module = LoRAModule(**MODULE_KWARGS, quantization="int8", optimizer="adamw8bit")
    make_trainer(max_steps=2).fit(module, batch_loader(2))
    client = module.save_weights_and_get_sampling_client()

    def base_storage(model: torch.nn.Module) -> set[int]:
        layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
        return {t.data_ptr() for m in layers for t in (m.weight, m.state.CB, m.state.SCB) if t is not None}

    ids = IDS[0].tolist()
    before = client.compute_logprobs(ids)
    assert before[1:] == logprobs(module, IDS[:1]).tolist()
    assert base_storage(client.model) == base_storage(module.model)  # the int8 weights are not copied
    make_trainer(max_steps=2).fit(module, batch_loader(2))
    assert client.compute_logprobs(ids) == before
    assert logprobs(module, IDS[:1]).tolist() != before[1:]


def test_unknown_quantization_or_optimizer_is_refused() -> None:
    with pytest.raises(ValueError, match=r"quantization='fp8' is not supported; use one of \('nf4', 'int8'\)"):
        LoRAModule(**MODULE_KWARGS, quantization="fp8")
    with pytest.raises(ValueError, match=r"optimizer='sgd' is not supported; use one of"):
        LoRAModule(**MODULE_KWARGS, optimizer="sgd")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nf4_on_cuda_resumes_exactly_in_new_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, which deterministic=True needs
    end = resume_in_new_process(tmp_path, "nf4", "paged_adamw8bit", accelerator="cuda")
    client = SamplingClient.from_checkpoint(end)
    client.model.cuda()
    assert len(client.sample("hello", SamplingParams(max_tokens=4, temperature=0)).sequences[0].tokens) == 4


@pytest.mark.slow
def test_example_config_trains_qlora(tmp_path: Path) -> None:
    repo = Path(__file__).parents[1]
    config = (repo / "examples" / "qlora.yaml").read_text()
    config = config.replace("root: ./checkpoints", f"root: {tmp_path}").replace(
        "examples/data/", f"{repo}/examples/data/"
    )
    (tmp_path / "qlora.yaml").write_text(config)
    command = [sys.executable, "-m", "lightning_lora_ckpt", "fit", "-c", str(tmp_path / "qlora.yaml")]
    short = ["--trainer.max_steps=2", "--trainer.val_check_interval=2", "--data.init_args.batch_size=4"]
    out = subprocess.run([*command, *short], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    checkpoint = LoRACheckpointIO(root=str(tmp_path)).load_checkpoint("lora://qlora/weights/final")
    assert checkpoint["lora_ckpt"]["base_model"]["quantization"] == "nf4"
    assert checkpoint["hyper_parameters"]["optimizer"] == "adamw8bit"
    moments = [
        s["__bnb_optimizer_quant_state__"]["state1"] for s in checkpoint["optimizer_states"][0]["state"].values()
    ]
    assert torch.uint8 in {m.dtype for m in moments}
