"""Shared fixtures: tiny offline models, synthetic token batches, quiet trainers."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import fsspec
import lightning as L
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_lora_ckpt import LoRACheckpointIO, LoRAModule

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODULE_KWARGS: dict[str, Any] = {"base_model": "tiny-qwen3", "rank": 4, "alpha": 8, "learning_rate": 1e-2}


def token_batches(n: int = 8, batch_size: int = 2, length: int = 16, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Random next-token batches in the LoRAModule batch format, with some zero weights."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, 1024, (batch_size, length + 1), generator=g)
        weights = (torch.rand(batch_size, length, generator=g) > 0.2).float()
        batches.append({"input_ids": ids[:, :-1], "target_tokens": ids[:, 1:], "weights": weights})
    return batches


def batch_loader(n: int = 8, shuffle: bool = False) -> DataLoader:
    return DataLoader(token_batches(n), batch_size=None, shuffle=shuffle)


def make_trainer(io: LoRACheckpointIO | None = None, **kwargs: Any) -> L.Trainer:
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "deterministic": True,
    }
    # Lightning refuses a ModelCheckpoint (PeriodicCheckpoint is one) when checkpointing is disabled.
    defaults["enable_checkpointing"] = any(isinstance(c, ModelCheckpoint) for c in kwargs.get("callbacks", []))
    return L.Trainer(plugins=[io] if io else None, **{**defaults, **kwargs})


@pytest.fixture
def trainer_factory() -> Callable[..., L.Trainer]:
    return make_trainer


@pytest.fixture
def trained(tmp_path: Any) -> tuple[LoRAModule, LoRACheckpointIO, L.Trainer]:
    """A tiny module trained for 4 steps with a synchronous LoRACheckpointIO under tmp_path."""
    io = LoRACheckpointIO(root=str(tmp_path / "ckpts"), run_id="run", async_save=False)
    module = LoRAModule(**MODULE_KWARGS)
    trainer = make_trainer(io, max_steps=4)
    trainer.fit(module, batch_loader())
    return module, io, trainer


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, Any]]:
    """A real S3-protocol HTTP server (moto) on loopback; yields the s3fs storage_options that reach it."""
    boto3 = pytest.importorskip("boto3")
    server_module = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket="ckpts")
    yield {"storage_options": options, "client": client, "bucket": "ckpts"}
    server.stop()


@pytest.fixture(params=["local", "memory", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Any) -> tuple[str, dict[str, Any]]:
    """(root URI, storage_options) of a fresh checkpoint root on each kind of storage."""
    if request.param == "local":
        return str(tmp_path / "root"), {}
    if request.param == "memory":
        return f"memory://{uuid.uuid4().hex}", {}
    server = request.getfixturevalue("s3_server")
    return f"s3://{server['bucket']}/{uuid.uuid4().hex}", server["storage_options"]


def fake_checkpoint(step: int, training: bool = True, base: str = "tiny-qwen3") -> dict[str, Any]:
    """A small checkpoint dict of the shape LoRAModule produces, without building a model."""
    weight = torch.full((4, 8), float(step))
    checkpoint: dict[str, Any] = {
        "state_dict": {
            "base_model.model.layer.lora_A.weight": weight,
            "base_model.model.layer.lora_B.weight": weight.T,
        },
        "lora_ckpt": {
            "adapter_config": {"r": 4, "lora_alpha": 8, "target_modules": ["layer"], "peft_type": "LORA"},
            "base_model": {"name_or_path": base, "fingerprint": "f" * 64},
        },
        "global_step": step,
        "epoch": 0,
    }
    if training:
        checkpoint["optimizer_states"] = [
            {"state": {0: {"exp_avg": weight * 2}}, "param_groups": [{"lr": 1e-3, "params": [0]}]}
        ]
    return checkpoint


class FailingMemoryFS(MemoryFileSystem):
    """An object store whose uploads fail after a number of successful ones (a real fault, not a mock)."""

    protocol = "failingmem"
    root_marker = ""
    writes_left = 1

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        if FailingMemoryFS.writes_left <= 0:
            raise OSError(f"injected upload failure for {path}")
        FailingMemoryFS.writes_left -= 1
        return super().pipe_file(path, value, **kwargs)


fsspec.register_implementation("failingmem", FailingMemoryFS, clobber=True)


def assert_same_state(actual: Any, expected: Any, path: str = "", strict_types: bool = True) -> None:
    """Deep equality of checkpoint state: tensors bit for bit with their dtype; containers key by key.

    ``strict_types`` also requires the same types everywhere; without it tuples and lists compare alike.
    """
    if strict_types:
        assert type(actual) is type(expected), f"{path}: {type(actual).__name__} != {type(expected).__name__}"
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype, path
        assert torch.equal(actual.cpu(), expected.cpu()), path
    elif isinstance(expected, dict):
        assert set(actual) == set(expected), f"{path}: {sorted(actual)} != {sorted(expected)}"
        for key in expected:
            assert_same_state(actual[key], expected[key], f"{path}.{key}", strict_types)
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same_state(a, e, f"{path}.{i}", strict_types)
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"
