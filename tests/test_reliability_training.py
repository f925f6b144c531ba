"""Reliability holes of training and serving, each reproduced for real.

1. Hotload never changes the base: a saved PEFT config whose initialisation or options would make PEFT
   rewrite the frozen base weights is refused (or, for an initialisation that only chooses how training
   starts, neutralised) on every path that adds an adapter, and a refused load changes nothing.
2. A full disk (a real tmpfs) with ``keep_last=1``: a failed training save followed by a sampler save that
   succeeds never deletes the only committed training checkpoint.
3. A step replayed after a resume skips a checkpoint the user published meanwhile (neither replaced nor
   given a new TTL), and rotations never delete a published checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors

from helpers.storage import small_tmpfs
from helpers.training import MODULE_KWARGS, batch_loader, make_trainer
from lightning_lora_ckpt import (
    CheckpointStore,
    CheckpointTTL,
    LoRACheckpointIO,
    LoRAModule,
    PeriodicCheckpoint,
    SamplingClient,
)
from lightning_lora_ckpt.format.manifest import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST

TOKENS = [5, 17, 99, 250, 3, 7, 8, 41]


# -- 1. hotload never changes the base ----------------------------------------------------------------------
def base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the base (everything but the LoRA layers), as raw bytes."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {
        name: t.detach().cpu().contiguous().flatten().view(torch.uint8).clone()
        for name, t in tensors.items()
        if "lora_" not in name
    }


def assert_same_base(before: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    after = base_state(model)
    assert after.keys() == before.keys()
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert not changed, f"base tensors changed: {changed[:5]}"


def replace_file(ckpt: Path, name: str, data: bytes) -> None:
    """Swap a file's content and list the new content's size and sha256 in the manifest (a valid forgery)."""
    (ckpt / name).write_bytes(data)
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / MANIFEST).write_text(json.dumps(manifest))


def forge(
    src: str, dst_root: Path, settings: dict[str, Any] | None = None, extra: dict[str, torch.Tensor] | None = None
) -> str:
    """A copy of the checkpoint ``src`` (same run, kind and name under ``dst_root``) with its adapter config
    updated by ``settings`` and ``extra`` tensors added to its adapter file, the manifest kept valid."""
    source = Path(src)
    dst = dst_root / source.parent.parent.name / source.parent.name / source.name
    shutil.copytree(source, dst)
    if settings:
        config = json.loads((dst / ADAPTER_CONFIG).read_text())
        config.update(settings)
        replace_file(dst, ADAPTER_CONFIG, json.dumps(config).encode())
    if extra:
        tensors = {**load_file(dst / ADAPTER_WEIGHTS), **extra}
        replace_file(dst, ADAPTER_WEIGHTS, save_tensors(tensors, metadata={"format": "pt"}))
    return str(dst)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Sampler checkpoints of one base: ``a`` and ``b`` (same LoRA config: hotload copies into the active
    adapter), ``wide`` (rank 8: hotload adds an adapter and switches to it), and the module they came from."""
    root = tmp_path_factory.mktemp("adapters")
    io = LoRACheckpointIO(root=str(root), run_id="run", async_save=False)
    module = LoRAModule(**MODULE_KWARGS)
    make_trainer(io, max_steps=2).fit(module, batch_loader(2))
    a = module.save_weights_for_sampler("a")
    make_trainer(io, max_steps=2).fit(module, batch_loader(2), ckpt_path=None)
    b = module.save_weights_for_sampler("b")
    wider = LoRAModule(**{**MODULE_KWARGS, "rank": 8, "seed": 3})
    make_trainer(io, max_steps=2).fit(wider, batch_loader(2))
    return {"a": a, "b": b, "wide": wider.save_weights_for_sampler("wide"), "module": module}


def test_the_base_comparison_sees_what_pissa_does_to_a_base(adapters: dict[str, Any]) -> None:
    """Without the refusal, adding a PiSSA adapter rewrites the base weights: the check below would catch it."""
    client = SamplingClient.from_checkpoint(adapters["a"])
    before = base_state(client.model)
    client.model.add_adapter("pissa", LoraConfig(r=4, target_modules="all-linear", init_lora_weights="pissa"))
    with pytest.raises(AssertionError, match="base tensors changed"):
        assert_same_base(before, client.model)


CONVERT = r"path_initial_model_for_weight_conversion"
#: case -> (settings written into adapter_config.json, the refusal's message)
REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "pissa": ({"init_lora_weights": "pissa"}, rf"init_lora_weights=pissa: .*PiSSA/OLoRA adapter .*{CONVERT}"),
    "pissa_niter_4": ({"init_lora_weights": "pissa_niter_4"}, rf"init_lora_weights=pissa_niter_4: .*{CONVERT}"),
    "olora": ({"init_lora_weights": "olora"}, rf"init_lora_weights=olora: .*{CONVERT}"),
    "corda": ({"init_lora_weights": "corda"}, r"init_lora_weights=corda: "),
    "loftq": (
        {"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4, "loftq_iter": 1}},
        r"init_lora_weights=loftq: ",
    ),
    "lora_ga": ({"init_lora_weights": "lora_ga"}, r"init_lora_weights=lora_ga: "),
    "unknown init": ({"init_lora_weights": "kaiming"}, r"init_lora_weights=kaiming: .*unknown initialisation"),
    "init not a bool": ({"init_lora_weights": 1}, r"init_lora_weights=1: "),
    "dora + pissa": ({"use_dora": True, "init_lora_weights": "pissa"}, r"init_lora_weights=pissa: "),
    "dora + olora": ({"use_dora": True, "init_lora_weights": "olora"}, r"init_lora_weights=olora: "),
    "kasa": ({"kasa_config": {}}, r"kasa_config=\{\}: KaSA truncates the frozen base weights"),
    "layer_replication": ({"layer_replication": [[0, 2]]}, r"layer_replication=\[\[0, 2\]\]: PEFT would duplicate"),
    "bias": ({"bias": "all"}, r"bias=all: the adapter carries bias vectors of the base"),
    "modules_to_save": ({"modules_to_save": ["lm_head"]}, r"modules_to_save=\['lm_head'\]: copies of base modules"),
    "trainable_token_indices": ({"trainable_token_indices": [1, 2]}, r"trainable_token_indices=\[1, 2\]: "),
}


@pytest.mark.parametrize(("settings", "message"), list(REFUSED.values()), ids=list(REFUSED))
def test_a_config_that_would_change_the_base_is_refused_everywhere_and_changes_nothing(
    adapters: dict[str, Any], tmp_path: Path, settings: dict[str, Any], message: str
) -> None:
    same = forge(adapters["b"], tmp_path / "same", settings)  # the copy-into-active path
    wide = forge(adapters["wide"], tmp_path / "wide", settings)  # the add-and-switch path
    client = SamplingClient.from_checkpoint(adapters["a"])
    before, identity = base_state(client.model), client.identity
    logprobs, adapters_before = client.compute_logprobs(TOKENS), set(client.model.peft_config)
    for uri in (same, wide):
        with pytest.raises(ValueError, match=message):
            client.load_adapter(uri)
        assert_same_base(before, client.model)
        assert client.identity == identity and set(client.model.peft_config) == adapters_before
        assert client.compute_logprobs(TOKENS) == logprobs

    module: LoRAModule = adapters["module"]
    module_base, module_logprobs = base_state(module.model), module(torch.tensor([TOKENS])).detach()
    snapshot = module.save_weights_and_get_sampling_client()
    snapshot_identity, snapshot_logprobs = snapshot.identity, snapshot.compute_logprobs(TOKENS)
    for uri in (same, wide):
        with pytest.raises(ValueError, match=message):
            snapshot.load_adapter(uri)
    assert_same_base(module_base, module.model)  # the snapshot shares the module's frozen base
    assert_same_base(module_base, snapshot.model)
    assert torch.equal(module(torch.tensor([TOKENS])).detach(), module_logprobs)
    assert snapshot.identity == snapshot_identity and snapshot.compute_logprobs(TOKENS) == snapshot_logprobs

    for uri in (same, wide):
        with pytest.raises(ValueError, match=message):
            SamplingClient.from_checkpoint(uri)
        with pytest.raises(ValueError, match=message):
            LoRAModule.from_checkpoint(uri)


#: init_lora_weights values that only choose how training starts: served exactly as the plain checkpoint.
NEUTRALISED: dict[str, dict[str, Any]] = {
    "true": {"init_lora_weights": True},
    "false": {"init_lora_weights": False},
    "gaussian": {"init_lora_weights": "gaussian"},
    "eva": {"init_lora_weights": "eva", "eva_config": {"rho": 2.0}},
    "orthogonal": {"init_lora_weights": "orthogonal"},
    "mica": {"init_lora_weights": "mica"},
    "init configs of another init": {"init_lora_weights": True, "corda_config": {}, "lora_ga_config": {}},
}


@pytest.mark.parametrize("settings", list(NEUTRALISED.values()), ids=list(NEUTRALISED))
def test_an_initialisation_that_only_starts_training_is_neutralised_and_the_base_never_changes(
    adapters: dict[str, Any], tmp_path: Path, settings: dict[str, Any]
) -> None:
    forged = {name: forge(adapters[name], tmp_path / name, settings) for name in ("b", "wide")}
    reference = {name: SamplingClient.from_checkpoint(adapters[name]).compute_logprobs(TOKENS) for name in forged}
    client = SamplingClient.from_checkpoint(adapters["a"])
    before = base_state(client.model)
    parameters = dict(client.model.named_parameters())
    assert client.load_adapter(forged["b"]).name == "b"
    assert all(p is parameters[n] for n, p in client.model.named_parameters())  # copied into the active adapter
    assert_same_base(before, client.model)
    assert client.compute_logprobs(TOKENS) == reference["b"]
    assert client.load_adapter(forged["wide"]).name == "wide"  # added, switched to, the old one deleted
    assert_same_base(before, client.model)
    assert client.compute_logprobs(TOKENS) == reference["wide"]

    module: LoRAModule = adapters["module"]
    module_base, module_out = base_state(module.model), module(torch.tensor([TOKENS])).detach()
    snapshot = module.save_weights_and_get_sampling_client()
    snapshot.load_adapter(forged["wide"])
    assert snapshot.compute_logprobs(TOKENS) == reference["wide"]
    snapshot.load_adapter(forged["b"])
    assert snapshot.compute_logprobs(TOKENS) == reference["b"]
    assert_same_base(module_base, module.model)
    assert torch.equal(module(torch.tensor([TOKENS])).detach(), module_out)

    fresh = SamplingClient.from_checkpoint(forged["wide"])
    assert_same_base(before, fresh.model)
    assert fresh.compute_logprobs(TOKENS) == reference["wide"]
    rebuilt = LoRAModule.from_checkpoint(forged["b"])
    assert_same_base(base_state(LoRAModule(**MODULE_KWARGS).model), rebuilt.model)


def test_an_adapter_file_carrying_a_base_weight_is_refused_on_every_path(
    adapters: dict[str, Any], tmp_path: Path
) -> None:
    """PEFT's set_peft_model_state_dict loads any key it is given: a base weight in the adapter file would
    overwrite the base when hotload adds an adapter."""
    key = "base_model.model.model.embed_tokens.weight"
    zeros = {key: torch.zeros(1024, 64)}
    same = forge(adapters["b"], tmp_path / "same", extra=zeros)
    wide = forge(adapters["wide"], tmp_path / "wide", extra=zeros)
    client = SamplingClient.from_checkpoint(adapters["a"])
    before, identity, logprobs = base_state(client.model), client.identity, client.compute_logprobs(TOKENS)
    module: LoRAModule = adapters["module"]
    module_base = base_state(module.model)
    snapshot = module.save_weights_and_get_sampling_client()
    for uri in (same, wide):
        for target in (client, snapshot):
            with pytest.raises(ValueError, match=rf"unexpected \['{key}'\]"):
                target.load_adapter(uri)
        with pytest.raises(ValueError, match=r"unexpected"):
            SamplingClient.from_checkpoint(uri)
        with pytest.raises(ValueError, match=r"unexpected"):
            LoRAModule.from_checkpoint(uri)
    assert_same_base(before, client.model)
    assert client.identity == identity and client.compute_logprobs(TOKENS) == logprobs
    assert_same_base(module_base, module.model)


# -- 2. a full disk with keep_last=1 ------------------------------------------------------------------------
#: The tmpfs: a training checkpoint of tiny-qwen3 at rank 4 takes 36 pages (144 KiB: its state file is 80 KiB),
#: a sampler one 11 (44 KiB), run.json one. 300 KiB holds one of each (192 KiB) and another sampler one, never
#: a second training one: every training save after the first fails for lack of space, every sampler save fits.
DISK_SIZE = "300k"


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A real small filesystem (tmpfs), unmounted afterwards; skipped where mounting is not permitted."""
    with small_tmpfs(tmp_path / "disk", DISK_SIZE) as disk:
        yield disk


class TrainingCheckpointsSeen(L.Callback):
    """After each step's saves and deletions, the committed training checkpoints of the run."""

    def __init__(self, io: LoRACheckpointIO, root: Path) -> None:
        self.io, self.root = io, root
        self.seen: dict[int, list[str]] = {}

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.io.wait()  # on_error="warn": a failed write is logged, not raised
        store = CheckpointStore(str(self.root))
        self.seen[trainer.global_step] = sorted(
            c.checkpoint_id for c in store.list_checkpoints("run") if c.checkpoint_type == "training"
        )


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_full_disk_with_keep_last_never_deletes_the_only_training_checkpoint(
    full_disk: Path, async_save: bool, caplog: pytest.LogCaptureFixture
) -> None:
    io = LoRACheckpointIO(root=str(full_disk), run_id="run", async_save=async_save, on_error="warn")
    saver = PeriodicCheckpoint(every_n_train_steps=2, kind="both", keep_last=1)
    seen = TrainingCheckpointsSeen(io, full_disk)
    trainer = make_trainer(io, max_steps=8, callbacks=[saver, seen])
    with caplog.at_level(logging.WARNING, logger="lightning_lora_ckpt.lightning.checkpoint_io"):
        trainer.fit(LoRAModule(**MODULE_KWARGS), batch_loader())
    assert trainer.global_step == 8
    assert all(names for step, names in seen.seen.items() if step >= 2), seen.seen  # never without a resume point
    messages = [r.getMessage() for r in caplog.records]
    failed = [m for m in messages if "Could not write checkpoint" in m and "No space left" in m]
    assert any("weights/000004" in m for m in failed) and not any("sampler_weights" in m for m in failed)
    assert any("Not deleting checkpoint" in m and "weights/000002" in m and "training" in m for m in messages)
    store = CheckpointStore(str(full_disk))
    listed = {c.checkpoint_id for c in store.list_checkpoints("run")}
    assert "weights/000002" in listed and "sampler_weights/000008" in listed and "sampler_weights/final" in listed
    assert not {"sampler_weights/000002", "sampler_weights/000004", "sampler_weights/000006"} & listed  # pruned
    assert all(store.verify(c.path).ok for c in store.list_checkpoints("run"))

    started: list[int] = []

    class Started(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            started.append(trainer.global_step)

    resumed = make_trainer(
        LoRACheckpointIO(root=str(full_disk), run_id="run", async_save=False), max_steps=4, callbacks=[Started()]
    )
    resumed.fit(LoRAModule(**MODULE_KWARGS), batch_loader(), ckpt_path="last")
    assert started == [2] and resumed.global_step == 4


# -- 3. a replayed step and a published checkpoint ----------------------------------------------------------
def files_of(uri: str) -> dict[str, bytes]:
    return {name: (Path(uri) / name).read_bytes() for name in sorted(os.listdir(uri))}


def fit(root: Path, max_steps: int, saver: PeriodicCheckpoint, ttl: CheckpointTTL, **fit_kwargs: Any) -> L.Trainer:
    io = LoRACheckpointIO(root=str(root), run_id="run")
    trainer = make_trainer(io, max_steps=max_steps, callbacks=[saver, ttl])
    trainer.fit(LoRAModule(**MODULE_KWARGS), batch_loader(), **fit_kwargs)
    return trainer


def test_a_replayed_step_skips_a_published_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fit(tmp_path, 3, PeriodicCheckpoint(every_n_train_steps=1, kind="both"), CheckpointTTL(periodic_ttl="7d"))
    store = CheckpointStore(str(tmp_path))
    published = {kind: store.publish(f"lora://run/{kind}/000002") for kind in ("weights", "sampler_weights")}
    before = {kind: files_of(c.path) for kind, c in published.items()}
    replaced_before = store.get("lora://run/weights/000003")

    saver = PeriodicCheckpoint(every_n_train_steps=1, kind="both", keep_last=2)
    with caplog.at_level(logging.WARNING, logger="lightning_lora_ckpt.lightning.callbacks"):
        trainer = fit(
            tmp_path, 4, saver, CheckpointTTL(periodic_ttl="1h"), ckpt_path=store.get("lora://run/weights/000001").path
        )
    assert trainer.global_step == 4  # no CheckpointConflictError: the published name was skipped
    for kind, checkpoint in published.items():
        assert files_of(checkpoint.path) == before[kind]  # byte-identical, manifest included
        now = store.get(checkpoint.path)
        assert now.public and now.expires_at == checkpoint.expires_at and now.step == 2
    messages = [r.getMessage() for r in caplog.records]
    for kind in ("training", "sampler"):
        assert any(f"not saving {kind} checkpoint 000002" in m and "is published" in m for m in messages)
    replaced = store.get("lora://run/weights/000003")  # an unpublished replayed name is still replaced
    assert replaced.time > replaced_before.time and replaced.expires_at != replaced_before.expires_at
    assert saver.saved == {"training": ["000003", "000004"], "sampler": ["000003", "000004"]}  # 000002 never listed


def test_rotations_never_delete_a_published_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ttl = CheckpointTTL(sweep=False)
    fit(tmp_path, 3, PeriodicCheckpoint(every_n_train_steps=1, kind="both", save_final=False), ttl)
    fit(tmp_path, 4, PeriodicCheckpoint(rolling_every_n_steps=2, save_final=False), ttl)
    store = CheckpointStore(str(tmp_path))
    for uri in ("lora://run/weights/000002", "lora://run/sampler_weights/000002", "lora://run/weights/rolling-000004"):
        store.publish(uri)
    before = {c.checkpoint_id for c in store.list_checkpoints("run")}
    assert "weights/rolling-000004" in before

    keep_last = PeriodicCheckpoint(every_n_train_steps=1, kind="both", keep_last=1, save_final=False)
    with caplog.at_level(logging.WARNING, logger="lightning_lora_ckpt.lightning.checkpoint_io"):
        fit(tmp_path, 4, keep_last, ttl, ckpt_path=store.get("lora://run/weights/000003").path)  # prunes 1, 2, 3
        rolling = PeriodicCheckpoint(rolling_every_n_steps=2, save_final=False)
        last = store.get("lora://run/weights/rolling-000004").path
        fit(tmp_path, 6, rolling, ttl, ckpt_path=last)  # saves rolling-000006, would delete rolling-000004
    listed = {c.checkpoint_id: c.public for c in store.list_checkpoints("run")}
    assert listed["weights/000002"] and listed["sampler_weights/000002"] and listed["weights/rolling-000004"]
    assert "weights/rolling-000006" in listed
    assert not {"weights/000001", "weights/000003", "sampler_weights/000001", "sampler_weights/000003"} & set(listed)
    messages = [r.getMessage() for r in caplog.records]
    published_skips = [m for m in messages if "Not deleting checkpoint" in m and "is published" in m]
    assert len(published_skips) == 3 and any("rolling-000004" in m for m in published_skips)
