"""Publishing to the Hub: ``push_to_hub`` and ``HubPublisher`` against a local Hub through the real client."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from huggingface_hub import ModelCard, constants, snapshot_download
from peft import PeftModel
from transformers import AutoModelForCausalLM

from helpers.training import MODULE_KWARGS, batch_loader, make_trainer, token_batches
from lightning_lora_ckpt import (
    CheckpointStore,
    HubPublisher,
    HubPublishError,
    LoRACheckpointIO,
    LoRAModule,
    PeriodicCheckpoint,
    load_base_model,
    push_to_hub,
)
from support.hub_server import HubServer

TOKEN = "hf_local_test_token"
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]


def _set_endpoint(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    # huggingface_hub reads HF_ENDPOINT into its constants once, at import: the environment alone is not enough.
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A local Hub that huggingface_hub talks to, with HF_TOKEN set to its token and a fresh HF_HOME."""
    server = HubServer(TOKEN).start()
    _set_endpoint(monkeypatch, server.url)
    home = tmp_path / "hf_home"
    for name, value in {"HF_HUB_OFFLINE": "0", "HF_HOME": str(home), "HF_TOKEN": TOKEN}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    yield server
    server.stop()


class AwaitPublish(L.Callback):
    """Lets each publish finish before the next save, so which checkpoints get published is deterministic."""

    def __init__(self, publisher: HubPublisher) -> None:
        self.publisher = publisher

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.publisher.wait()


def fit_with_publisher(
    tmp_path: Path, publisher: HubPublisher, max_steps: int = 4, async_save: bool = False
) -> LoRACheckpointIO:
    io = LoRACheckpointIO(root=str(tmp_path / "ckpts"), run_id="run", async_save=async_save)
    callbacks = [publisher, AwaitPublish(publisher), PeriodicCheckpoint(every_n_train_steps=2, kind="both")]
    make_trainer(io, max_steps=max_steps, callbacks=callbacks).fit(LoRAModule(**MODULE_KWARGS), batch_loader())
    return io


def commit_files(server: HubServer, repo_id: str, revision: str) -> dict[str, bytes]:
    commit = server.repos[repo_id].resolve(revision)
    assert commit is not None, f"{repo_id} has no revision {revision}"
    return commit.files


def test_pushed_sampler_checkpoint_loads_with_peft_from_the_hub(trained, hub: HubServer) -> None:
    module, io, _ = trained
    uri = module.save_weights_for_sampler("s")
    url = push_to_hub(uri, "tester/adapter", metrics={"val_loss": 1.25})

    repo = hub.repos["tester/adapter"]
    assert repo.private and list(repo.tags) == ["run-s"] and url.endswith(repo.tags["run-s"])
    local = CheckpointStore(io.root).verify(uri)
    assert local.ok
    folder = Path(snapshot_download("tester/adapter", revision="run-s"))
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", *ADAPTER_FILES]
    for name in ADAPTER_FILES:
        assert (folder / name).read_bytes() == (Path(uri) / name).read_bytes()

    peft_model = PeftModel.from_pretrained(load_base_model("tiny-qwen3"), str(folder)).eval()
    ids = token_batches(1)[0]["input_ids"]
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, module(ids), rtol=0, atol=0)

    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == "tiny-qwen3" and card.data.library_name == "peft"
    assert {"lora", "lightning-lora-ckpt"} <= set(card.data.tags)
    for text in ("`run`", "`s`", "step 4", "LoRA rank: 4", "val_loss: 1.25"):
        assert text in card.text


def test_training_checkpoint_pushes_only_the_adapter_and_tags_follow_new_saves(trained, hub: HubServer) -> None:
    module, _, _ = trained
    first = push_to_hub(module.save_state("t"), "tester/adapter", revision_tag="latest", private=False)
    assert sorted(commit_files(hub, "tester/adapter", "latest")) == ["README.md", *ADAPTER_FILES]
    assert not hub.repos["tester/adapter"].private
    second = push_to_hub(module.save_weights_for_sampler("s"), "tester/adapter", revision_tag="latest")
    repo = hub.repos["tester/adapter"]
    assert first != second and len(repo.commits) == 2 and second.endswith(repo.tags["latest"])
    assert b"`s`" in commit_files(hub, "tester/adapter", "latest")["README.md"]
    with pytest.raises(ValueError, match="not a valid git tag"):
        push_to_hub(module.save_weights_for_sampler("u"), "tester/adapter", revision_tag="bad..tag")


def test_pushed_full_parameter_checkpoint_loads_with_transformers_from_the_hub(tmp_path: Path, hub: HubServer) -> None:
    io = LoRACheckpointIO(root=str(tmp_path / "ckpts"), run_id="full", async_save=False)
    module = LoRAModule("tiny-qwen3", rank=0, learning_rate=1e-3)
    make_trainer(io, max_steps=1).fit(module, batch_loader(1))
    uri = module.save_state("t")  # a training checkpoint: its model directory is pushed, not its optimizer state
    push_to_hub(uri, "tester/full")
    folder = Path(snapshot_download("tester/full", revision="full-t"))
    assert "config.json" in os.listdir(folder) and "training_state.safetensors" not in os.listdir(folder)
    ids = token_batches(1)[0]["input_ids"]
    with torch.no_grad():
        expected = module.eval()(ids)
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(folder)(input_ids=ids).logits, expected)
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers" and "AutoModelForCausalLM" in card.text
    # a delta snapshot is pushed as its full model directory, bit-exact
    module.save_weights_for_sampler("s0")
    make_trainer(io, max_steps=2).fit(module, batch_loader(2), ckpt_path=uri)
    delta = module.save_weights_for_sampler("s1")
    assert CheckpointStore(str(tmp_path / "ckpts")).get(delta).snapshot == "delta"
    push_to_hub(delta, "tester/full", revision_tag="delta")
    pushed = Path(snapshot_download("tester/full", revision="delta"))
    assert not list(pushed.glob("*.xor.zst"))
    with torch.no_grad():
        expected = module.eval()(ids)
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(pushed)(input_ids=ids).logits, expected)


def test_push_errors_name_the_repo_and_the_cause(trained, hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    module, _, _ = trained
    uri = module.save_weights_for_sampler("s")
    with pytest.raises(HubPublishError, match=r"tester/adapter.*token was refused"):
        push_to_hub(uri, "tester/adapter", token="wrong")
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubPublishError, match=r"tester/adapter: no Hugging Face token"):
        push_to_hub(uri, "tester/adapter")
    with socket.socket() as probe:  # a port nothing listens on once the socket is closed
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    _set_endpoint(monkeypatch, closed)
    with pytest.raises(HubPublishError, match=r"tester/adapter: the Hub at .* is unreachable"):
        push_to_hub(uri, "tester/adapter", token=TOKEN)
    assert hub.repos == {}


def test_final_strategy_publishes_once_at_the_end(tmp_path: Path, hub: HubServer) -> None:
    publisher = HubPublisher("tester/final")
    fit_with_publisher(tmp_path, publisher, async_save=True)
    repo = hub.repos["tester/final"]
    assert list(repo.tags) == ["run-final"] and len(repo.commits) == 1
    assert b"`final`" in commit_files(hub, "tester/final", "run-final")["README.md"]
    assert len(publisher.published) == 1


def test_every_save_publishes_each_sampler_save_and_a_resumed_run_does_not_republish(
    tmp_path: Path, hub: HubServer
) -> None:
    publisher = HubPublisher("tester/every", strategy="every_save")
    io = fit_with_publisher(tmp_path, publisher, max_steps=6)
    repo = hub.repos["tester/every"]
    assert list(repo.tags) == ["run-000002", "run-000004", "run-000006", "run-final"]
    assert len(repo.commits) == 4 and len(set(repo.tags.values())) == 4
    for tag in repo.tags:
        assert f"`{tag.removeprefix('run-')}`".encode() in commit_files(hub, "tester/every", tag)["README.md"]

    resumed = HubPublisher("tester/every", strategy="every_save")
    resumed.load_state_dict(publisher.state_dict())
    make_trainer(io, max_steps=2, callbacks=[resumed]).fit(LoRAModule(**MODULE_KWARGS), batch_loader())
    assert len(repo.commits) == 4
    fresh = HubPublisher("tester/every", strategy="every_save")
    make_trainer(io, max_steps=2, callbacks=[fresh]).fit(LoRAModule(**MODULE_KWARGS), batch_loader())
    assert len(repo.commits) == 5


class ScriptedScore(L.Callback):
    """Logs ``score`` from a script by step: the metric ``strategy="best"`` watches."""

    def __init__(self, script: dict[int, float]) -> None:
        self.script = script

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        pl_module.log("score", self.script[trainer.global_step])


def test_best_publishes_only_when_the_monitored_metric_improves(tmp_path: Path, hub: HubServer) -> None:
    publisher = HubPublisher("tester/best", strategy="best", monitor="score", mode="min")
    io = LoRACheckpointIO(root=str(tmp_path / "ckpts"), run_id="run", async_save=False)
    script = {1: 9.0, 2: 2.0, 3: 2.0, 4: 3.0, 5: 3.0, 6: 1.0}
    callbacks = [
        ScriptedScore(script),
        publisher,
        AwaitPublish(publisher),
        PeriodicCheckpoint(every_n_train_steps=2, kind="sampler"),
    ]
    make_trainer(io, max_steps=6, callbacks=callbacks).fit(LoRAModule(**MODULE_KWARGS), batch_loader())
    # 000002 at 2.0, not 000004 at 3.0, 000006 at 1.0, not final (saved at step 6: 1.0 again).
    assert list(hub.repos["tester/best"].tags) == ["run-000002", "run-000006"] and publisher.best == 1.0
    assert b"score: 2" in commit_files(hub, "tester/best", "run-000002")["README.md"]


def test_wrong_token_raises_at_the_end_of_fit_and_keeps_the_checkpoints(tmp_path: Path, hub: HubServer) -> None:
    publisher = HubPublisher("tester/denied", token="wrong", fail_on_error=True)
    with pytest.raises(HubPublishError, match=r"tester/denied.*token was refused"):
        fit_with_publisher(tmp_path, publisher)
    store = CheckpointStore(str(tmp_path / "ckpts"))
    checkpoints = store.list_checkpoints("run")
    names = sorted(c.checkpoint_id for c in checkpoints)
    assert names == sorted(
        f"{kind}/{n}" for kind in ("weights", "sampler_weights") for n in ("000002", "000004", "final")
    )
    assert all(store.verify(c.path).ok for c in checkpoints)
    assert hub.repos == {}


def test_failures_are_logged_without_fail_on_error(
    tmp_path: Path, hub: HubServer, caplog: pytest.LogCaptureFixture
) -> None:
    publisher = HubPublisher("tester/denied", strategy="every_save", token="wrong")
    with caplog.at_level(logging.WARNING, logger="lightning_lora_ckpt.lightning.hub_publisher"):
        fit_with_publisher(tmp_path, publisher)
    warnings = [r.getMessage() for r in caplog.records if r.name == "lightning_lora_ckpt.lightning.hub_publisher"]
    assert warnings and all("tester/denied" in w and "token was refused" in w for w in warnings)
    assert len(warnings) == 3  # 000002, 000004 and final, each tried once
    assert hub.repos == {} and not publisher.published
    assert CheckpointStore(str(tmp_path / "ckpts")).last_checkpoint("run", "sampler").checkpoint_id.endswith("final")


def test_invalid_settings() -> None:
    with pytest.raises(ValueError, match="strategy"):
        HubPublisher("tester/x", strategy="sometimes")
    with pytest.raises(ValueError, match="monitor"):
        HubPublisher("tester/x", strategy="best")
    with pytest.raises(ValueError, match="mode"):
        HubPublisher("tester/x", mode="lowest")


def test_push_hf_command(trained, hub: HubServer) -> None:
    module, io, _ = trained
    module.save_weights_for_sampler("s")
    args = ["push-hf", "lora://run/sampler_weights/s", "--repo-id", "tester/cli", "--tag", "v1", "--root", io.root]
    out = subprocess.run([sys.executable, "-m", "lightning_lora_ckpt", *args, "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["commit_url"].endswith(hub.repos["tester/cli"].tags["v1"])
    assert set(commit_files(hub, "tester/cli", "v1")) == {*ADAPTER_FILES, "README.md"}
    env_without_token = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    refused = subprocess.run(
        [sys.executable, "-m", "lightning_lora_ckpt", *args], capture_output=True, text=True, env=env_without_token
    )
    assert refused.returncode == 1 and "no Hugging Face token" in refused.stderr
