"""Resume semantics: exact resume in a new process, weights-only starts, base and config checks."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from peft import PeftModel

from helpers.resume import adapter, train
from helpers.training import MODULE_KWARGS, batch_loader, make_trainer, token_batches
from lightning_lora_ckpt import LoRACheckpointIO, LoRAModule, PeriodicCheckpoint, load_base_model

RESUME_CHILD = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from helpers.resume import train
    from lightning_lora_ckpt import LoRACheckpointIO
    io = LoRACheckpointIO(root=sys.argv[2], run_id="resume", async_save=True)
    module, losses = train(io, ckpt_path=sys.argv[3], stateful=sys.argv[4] == "1")
    module.save_weights_for_sampler("end")
    io.teardown()
    print(json.dumps(losses))
    """
)


@pytest.mark.parametrize(
    ("k", "stateful"),
    [
        (8, False),
        (11, True),
    ],  # at an epoch boundary; mid-epoch, where only a StatefulDataLoader resumes exactly
)
def test_resume_with_optimizer_in_new_process_is_bit_identical(tmp_path: Path, k: int, stateful: bool) -> None:
    root = str(tmp_path / "ckpts")
    straight, straight_losses = train(LoRACheckpointIO(root=root, run_id="straight"), stateful=stateful)
    io = LoRACheckpointIO(root=root, run_id="resume")
    saver = PeriodicCheckpoint(every_n_train_steps=k, kind="state", save_final=False)
    first, first_losses = train(io, stop_at=k, callbacks=[saver], stateful=stateful)
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            RESUME_CHILD,
            str(Path(__file__).parent),
            root,
            f"lora://resume/weights/{k:06d}",
            str(int(stateful)),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    resumed_losses = json.loads(out.stdout.strip().splitlines()[-1])
    assert first_losses + resumed_losses == straight_losses
    resumed = LoRAModule.from_checkpoint("lora://resume/sampler_weights/end", root=root)
    expected = adapter(straight)
    assert all(torch.equal(expected[k], v) for k, v in adapter(resumed).items())
    assert not all(torch.equal(expected[k], v) for k, v in adapter(first).items())  # training moved it


class OptimizerProbe(L.Callback):
    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.step_at_start = trainer.global_step
        self.state = {
            i: {k: v.clone() for k, v in s.items()} for i, s in enumerate(trainer.optimizers[0].state.values())
        }


def test_weights_only_start_restores_adapter_with_fresh_optimizer(trained) -> None:
    module, _io, _ = trained
    uri = module.save_state("t")
    restored = LoRAModule.from_checkpoint(uri)
    expected = adapter(module)
    assert all(torch.equal(expected[k], v) for k, v in adapter(restored).items())
    probe = OptimizerProbe()
    make_trainer(max_steps=2, callbacks=[probe]).fit(restored, batch_loader(2))
    assert probe.step_at_start == 0 and probe.state == {}
    assert restored.trainer.global_step == 2


def test_from_checkpoint_with_optimizer_restores_moments(trained) -> None:
    module, _io, trainer = trained
    uri = module.save_state("t")
    exp_avg = [s["exp_avg"].clone() for s in trainer.optimizers[0].state.values()]
    restored = LoRAModule.from_checkpoint(uri, with_optimizer=True, learning_rate=5e-3)
    assert restored.hparams.learning_rate == 5e-3 and restored.hparams.rank == 4
    probe = OptimizerProbe()
    make_trainer(max_steps=1, callbacks=[probe]).fit(restored, batch_loader(1))
    assert probe.step_at_start == 0
    assert all(torch.equal(a, probe.state[i]["exp_avg"]) for i, a in enumerate(exp_avg))
    with pytest.raises(ValueError, match="sampler checkpoint"):
        LoRAModule.from_checkpoint(module.save_weights_for_sampler("s"), with_optimizer=True)


def test_sampler_checkpoint_loads_with_plain_peft(trained) -> None:
    module, _io, _ = trained
    uri = module.save_weights_for_sampler("s")
    peft_model = PeftModel.from_pretrained(load_base_model("tiny-qwen3"), uri).eval()
    ids = token_batches(1)[0]["input_ids"]
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, module(ids), rtol=0, atol=0)


def test_another_base_or_lora_config_is_refused(trained) -> None:
    module, io, _ = trained
    uri = module.save_state("t")
    with pytest.raises(ValueError, match=r"trained on base model 'tiny-qwen3'.*onto 'tiny-llama'"):
        LoRAModule.from_checkpoint(uri, base_model="tiny-llama")
    other = LoRAModule(**{**MODULE_KWARGS, "base_model": "tiny-llama"})
    with pytest.raises(ValueError, match=r"'tiny-qwen3'.*'tiny-llama'"):
        make_trainer(io, max_steps=5).fit(other, batch_loader(1), ckpt_path=uri)
    wider = LoRAModule(**{**MODULE_KWARGS, "rank": 8})
    with pytest.raises(ValueError, match="LoRA r=4 but this module has r=8"):
        make_trainer(io, max_steps=5).fit(wider, batch_loader(1), ckpt_path=uri)


def test_local_hf_directory_is_the_same_base_as_its_builtin_name(trained, tmp_path: Path) -> None:
    module, _io, _ = trained
    uri = module.save_weights_for_sampler("s")
    local = tmp_path / "tiny-qwen3-local"
    load_base_model("tiny-qwen3").save_pretrained(local)
    module.get_tokenizer().save_pretrained(local)
    restored = LoRAModule.from_checkpoint(uri, base_model=str(local))
    assert restored.get_tokenizer().vocab_size == module.get_tokenizer().vocab_size
    ids = token_batches(1)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(restored.eval()(ids), module.eval()(ids))
