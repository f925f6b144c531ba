"""Resuming checks the whole training state against the live module and optimizers before changing anything;
``allow_pickle`` is the caller's choice for a base the caller names, never a checkpoint's."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers.training import MODULE_KWARGS, batch_loader, make_trainer
from helpers.user_module import UserLoRAModule, data, trainer
from lightning_lora_ckpt import (
    CheckpointFormatError,
    CheckpointStore,
    LoRACheckpointIO,
    LoRAModule,
    SamplingClient,
    load_base_model,
    load_tokenizer,
    merge_adapter,
)
from lightning_lora_ckpt.lightning.resume_checks import check_optimizer_states

STATE = "training_state.safetensors"
FIX = "configure the optimizers, their parameter groups"


# -- forging a checkpoint whose checksums stay valid ------------------------------------------------------
def forge_state_tensor(ckpt: Path, key: str, tensor: torch.Tensor) -> None:
    """Replace one tensor of training_state.safetensors and list the new file's size and sha256 in the manifest."""
    path = ckpt / STATE
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    assert key in tensors, sorted(tensors)[:5]
    tensors[key] = tensor
    save_file(tensors, str(path), metadata)
    body = path.read_bytes()
    manifest = json.loads((ckpt / "checkpoint.json").read_text())
    manifest["files"][STATE] = {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    (ckpt / "checkpoint.json").write_text(json.dumps(manifest))


def trainable(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def assert_unchanged(before: dict[str, torch.Tensor], module: torch.nn.Module) -> None:
    after = trainable(module)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.fixture
def lora_checkpoint(tmp_path: Path) -> tuple[Path, LoRACheckpointIO]:
    """A training checkpoint of LoRAModule after 2 steps, and a plugin on its run."""
    io = LoRACheckpointIO(root=str(tmp_path / "ckpts"), run_id="run", async_save=False)
    module = LoRAModule(**MODULE_KWARGS)
    make_trainer(io, max_steps=2).fit(module, batch_loader(2))
    return Path(module.save_state("t")), io


def test_a_wrong_shape_moment_that_verifies_is_refused_before_the_module_changes(lora_checkpoint) -> None:
    ckpt, io = lora_checkpoint
    forge_state_tensor(ckpt, "optimizer_states.0.state.3.exp_avg", torch.zeros(4, 8))
    assert CheckpointStore(str(ckpt.parent.parent.parent)).verify(str(ckpt)).ok  # sizes and checksums match
    module = LoRAModule(**MODULE_KWARGS)
    before, rng = trainable(module), torch.get_rng_state()
    fit = make_trainer(io, max_steps=4)
    message = (
        rf"^Checkpoint {ckpt}: optimizer_states\[0\]\.state\[3\]\.exp_avg has shape \(4, 8\), the live parameter "
        rf"model\.base_model\.model\.\S+\.lora_B\.default\.weight has \(\d+, 4\); {FIX}"
    )
    with pytest.raises(ValueError, match=message) as caught:
        fit.fit(module, batch_loader(2), ckpt_path=str(ckpt))
    assert "\n" not in str(caught.value)
    assert_unchanged(before, module)
    assert torch.equal(torch.get_rng_state(), rng)  # the checkpoint's RNG states were not restored either
    assert fit.global_step == 0


def test_a_moment_that_is_no_floating_tensor_is_refused(lora_checkpoint) -> None:
    ckpt, io = lora_checkpoint
    shape = load_file(str(ckpt / STATE))["optimizer_states.0.state.0.exp_avg_sq"].shape
    forge_state_tensor(ckpt, "optimizer_states.0.state.0.exp_avg_sq", torch.zeros(shape, dtype=torch.int32))
    module = LoRAModule(**MODULE_KWARGS)
    before = trainable(module)
    with pytest.raises(CheckpointFormatError, match=r"state\[0\]\.exp_avg_sq is a int32 tensor .*not a floating"):
        make_trainer(io, max_steps=4).fit(module, batch_loader(2), ckpt_path=str(ckpt))
    assert_unchanged(before, module)


def test_a_sampler_checkpoint_cannot_resume_a_fit(lora_checkpoint) -> None:
    ckpt, io = lora_checkpoint
    module = LoRAModule(**MODULE_KWARGS)
    sampler = ckpt.parent.parent / "sampler_weights" / "s"
    LoRACheckpointIO(str(ckpt.parent.parent.parent), async_save=False).save_checkpoint(
        {k: v for k, v in io.load_checkpoint(str(ckpt)).items() if k not in ("optimizer_states", "lr_schedulers")},
        str(sampler),
    )
    before = trainable(module)
    with pytest.raises(ValueError, match=r"holds no optimizer state \(a sampler checkpoint\)"):
        make_trainer(io, max_steps=4).fit(module, batch_loader(2), ckpt_path=str(sampler))
    assert_unchanged(before, module)


def test_from_checkpoint_with_optimizer_refuses_the_forged_moment(lora_checkpoint) -> None:
    ckpt, _io = lora_checkpoint
    forge_state_tensor(ckpt, "optimizer_states.0.state.3.exp_avg", torch.zeros(4, 8))
    module = LoRAModule.from_checkpoint(str(ckpt), with_optimizer=True)
    with pytest.raises(ValueError, match=r"optimizer_states\[0\]\.state\[3\]\.exp_avg has shape \(4, 8\)"):
        make_trainer(max_steps=1).fit(module, batch_loader(1))


# -- a user's own LightningModule: the plugin and its callback --------------------------------------------
class TwoGroups(UserLoRAModule):
    """The user module with lora_A and lora_B in two parameter groups (``swap``: lora_B's group first)."""

    swap = False

    def configure_optimizers(self) -> Any:
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        groups = [[p for n, p in named if "lora_A" in n], [p for n, p in named if "lora_B" in n]]
        if self.swap:
            groups.reverse()
        optimizer = torch.optim.AdamW([{"params": groups[0]}, {"params": groups[1], "lr": 1e-3}], lr=self.hparams.lr)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, step_size=3)}


class Swapped(TwoGroups):
    swap = True


class NoScheduler(UserLoRAModule):
    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)


def user_checkpoint(root: Path, module: L.LightningModule) -> tuple[str, LoRACheckpointIO]:
    io = LoRACheckpointIO(root=str(root), run_id="u", async_save=False)
    fit = trainer(io, max_steps=2, enable_checkpointing=False)
    fit.fit(module, data(2))
    fit.save_checkpoint("t")
    return io.resolve("t", "training"), io


@pytest.mark.parametrize(
    ("saved", "resumed", "message"),
    [
        (TwoGroups, UserLoRAModule, r"optimizer_states\[0\]\.param_groups has 2 groups, the live AdamW has 1"),
        (UserLoRAModule, TwoGroups, r"optimizer_states\[0\]\.param_groups has 1 groups, the live AdamW has 2"),
        (TwoGroups, Swapped, r"optimizer_states\[0\]\.state\[0\]\.exp_avg has shape \(4, 64\), the live parameter "
                             r"net\.base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_B\.default\.weight "
                             r"has \(64, 4\)"),
        (UserLoRAModule, NoScheduler, r"lr_schedulers holds 1 scheduler states, the module configures 0"),
    ],
    ids=["fewer groups", "more groups", "groups swapped", "no scheduler"],
)  # fmt: skip
def test_a_user_module_resumes_only_into_the_same_optimizer_setup(
    tmp_path: Path, saved: type[UserLoRAModule], resumed: type[UserLoRAModule], message: str
) -> None:
    uri, io = user_checkpoint(tmp_path, saved())
    module = resumed()
    before = trainable(module)
    fit = trainer(io, max_steps=4, enable_checkpointing=False)
    with pytest.raises(ValueError, match=rf"^Checkpoint {uri}: {message}; {FIX}"):
        fit.fit(module, data(2), ckpt_path=uri)
    assert_unchanged(before, module)
    assert fit.global_step == 0


def test_a_user_module_resumes_its_own_checkpoint(tmp_path: Path) -> None:
    uri, io = user_checkpoint(tmp_path, TwoGroups())
    module = TwoGroups()
    fit = trainer(io, max_steps=3, enable_checkpointing=False)
    fit.fit(module, data(2), ckpt_path=uri)
    assert fit.global_step == 3 and len(fit.optimizers[0].param_groups) == 2


# -- the check itself, without a Trainer ----------------------------------------------------------------
def stepped(optimizer_class: type[torch.optim.Optimizer], **kwargs: Any) -> tuple[torch.nn.Module, Any]:
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    optimizer = optimizer_class(layer.parameters(), lr=0.1, **kwargs)
    layer(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    return layer, optimizer


def check(layer: torch.nn.Module, optimizer: Any, state: dict[str, Any], schedulers: int = 0) -> None:
    checkpoint = {"optimizer_states": [state], "lr_schedulers": [{}] * schedulers}
    check_optimizer_states(checkpoint, [optimizer], schedulers, layer, "mem://c")


def test_the_states_torch_optimizers_write_pass() -> None:
    for optimizer_class, kwargs in [
        (torch.optim.AdamW, {"amsgrad": True}),
        (torch.optim.SGD, {"momentum": 0.9}),
        (torch.optim.SGD, {}),
        (torch.optim.Adagrad, {}),
    ]:
        layer, optimizer = stepped(optimizer_class, **kwargs)
        check(layer, optimizer, optimizer.state_dict())
        check(layer, optimizer, {"state": {}, "param_groups": optimizer.state_dict()["param_groups"]})


def edited(optimizer: Any, change: Any) -> dict[str, Any]:
    state = optimizer.state_dict()
    state = {"state": {k: dict(v) for k, v in state["state"].items()}, "param_groups": state["param_groups"]}
    change(state)
    return state


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (lambda s: s["state"][0].update(step=torch.zeros(2)), CheckpointFormatError,
         r"state\[0\]\.step is a float32 tensor of shape \(2,\), not a count of steps"),
        (lambda s: s["state"][1].update(step=-1), CheckpointFormatError, r"state\[1\]\.step is -1, not a count"),
        (lambda s: s["state"][0].update(exp_avg="x"), CheckpointFormatError,
         r"state\[0\]\.exp_avg is a str, not a floating tensor"),
        (lambda s: s["state"][1].update(max_exp_avg_sq=torch.zeros(3, 1)), ValueError,
         r"state\[1\]\.max_exp_avg_sq has shape \(3, 1\), the live parameter bias has \(3,\)"),
        (lambda s: s["state"].update({7: {}}), CheckpointFormatError,
         r"state\[7\] is not the state of a parameter optimizer_states\[0\]\.param_groups lists"),
        (lambda s: s["param_groups"][0].update(params=[0, 0]), CheckpointFormatError,
         r"param_groups\[0\]\.params is not a list of new parameter ids"),
        (lambda s: s["param_groups"][0].update(params=[0]), ValueError,
         r"param_groups\[0\] lists 1 parameters, the live group has 2"),
        (lambda s: s["param_groups"].append(s["param_groups"][0]), ValueError,
         r"param_groups has 2 groups, the live AdamW has 1"),
    ],
    ids=["step not scalar", "negative step", "moment not a tensor", "moment shape", "unknown id", "id twice",
         "group size", "group count"],
)  # fmt: skip
def test_malformed_or_misfitting_states_are_refused(change: Any, error: type[Exception], message: str) -> None:
    layer, optimizer = stepped(torch.optim.AdamW, amsgrad=True)
    with pytest.raises(error, match=rf"^Checkpoint mem://c: optimizer_states\[0\]\.{message}"):
        check(layer, optimizer, edited(optimizer, change))


def test_optimizer_and_scheduler_counts_must_match() -> None:
    layer, optimizer = stepped(torch.optim.SGD, momentum=0.9)
    state = optimizer.state_dict()
    with pytest.raises(ValueError, match=r"optimizer_states holds 2 optimizer states, the module configures 1"):
        check_optimizer_states({"optimizer_states": [state, state], "lr_schedulers": []}, [optimizer], 0, layer, "c")
    with pytest.raises(ValueError, match=r"lr_schedulers holds 0 scheduler states, the module configures 1"):
        check_optimizer_states({"optimizer_states": [state], "lr_schedulers": []}, [optimizer], 1, layer, "c")


class QuantizedState(torch.optim.Optimizer):
    """Stands for bitsandbytes' 8-bit AdamW: state entries of its own (uint8 moments, absmax of other shapes)."""

    def __init__(self, params: Any, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    def step(self, closure: Any = None) -> None:
        for p in self.param_groups[0]["params"]:
            self.state[p] = {"state1": torch.zeros(p.numel(), dtype=torch.uint8), "absmax1": torch.zeros(1),
                             "exp_avg": torch.zeros(5), "step": 1}  # fmt: skip


def test_entries_of_other_optimizers_are_left_to_them() -> None:
    layer, optimizer = stepped(QuantizedState)
    check(layer, optimizer, optimizer.state_dict())  # an exp_avg of another shape: not torch.optim's


# -- allow_pickle: the caller's choice for a base the caller names --------------------------------------------
@pytest.fixture
def pickle_base(tmp_path: Path) -> Path:
    """The built-in tiny Qwen3 saved with pickled weights only (pytorch_model.bin), with its tokenizer."""
    base = tmp_path / "bin-base"
    model = load_base_model("tiny-qwen3")
    model.config.save_pretrained(base)
    torch.save(model.state_dict(), base / "pytorch_model.bin")
    load_tokenizer("tiny-qwen3").save_pretrained(base)
    return base


def test_allow_pickle_is_for_a_base_the_caller_names(pickle_base: Path, tmp_path: Path) -> None:
    kwargs = {**MODULE_KWARGS, "base_model": str(pickle_base)}
    with pytest.raises(CheckpointFormatError, match=r"bin-base.* has no safetensors weights .*allow_pickle=True"):
        LoRAModule(**kwargs)
    module = LoRAModule(**kwargs, allow_pickle=True)
    assert "allow_pickle" not in module.hparams  # never recorded in a checkpoint
    io = LoRACheckpointIO(root=str(tmp_path / "ckpts"), run_id="run", async_save=False)
    make_trainer(io, max_steps=1).fit(module, batch_loader(1))
    uri = module.save_state("t")
    # The manifest names the pickle-only base: loading it by that name stays safetensors-only.
    for refused in (
        lambda: LoRAModule.from_checkpoint(uri),
        lambda: SamplingClient.from_checkpoint(uri),
        lambda: merge_adapter(uri, tmp_path / "refused"),
    ):
        with pytest.raises(CheckpointFormatError, match="has no safetensors weights"):
            refused()
    for without_base in (
        lambda: LoRAModule.from_checkpoint(uri, allow_pickle=True),
        lambda: SamplingClient.from_checkpoint(uri, allow_pickle=True),
        lambda: merge_adapter(uri, tmp_path / "refused", allow_pickle=True),
    ):
        with pytest.raises(ValueError, match=r"allow_pickle=True is for a base you name yourself: pass base_model="):
            without_base()
    assert not (tmp_path / "refused").exists()
    # Named by the caller, with the opt-in: it loads.
    restored = LoRAModule.from_checkpoint(uri, base_model=str(pickle_base), allow_pickle=True)
    expected = module.adapter_state_dict()
    assert all(torch.equal(expected[k], v) for k, v in restored.adapter_state_dict().items())
    client = SamplingClient.from_checkpoint(uri, base_model=str(pickle_base), allow_pickle=True)
    assert client.base_model.name_or_path == str(pickle_base)
    out = merge_adapter(uri, tmp_path / "merged", base_model=str(pickle_base), allow_pickle=True)
    assert (Path(out) / "model.safetensors").is_file()
