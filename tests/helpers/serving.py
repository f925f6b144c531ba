"""Serving-test helpers that need no vLLM: the environment that enables the checkpoint resolver plugin, and sampler
checkpoints trained on the served base (which ``modeling.base.export_builtin`` writes as a directory vLLM loads).

Torch, transformers and Lightning are imported inside the functions: importing this module stays cheap.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

#: The built-in base the serving tests train on and vLLM serves (vLLM's CPU attention needs head_dim >= 32).
SERVED_BASE = "tiny-qwen3-hd32"
#: The entry-point name of the resolver plugin (``[project.entry-points."vllm.general_plugins"]``).
RESOLVER_PLUGIN = "lightning_lora_ckpt"


def resolver_env(root: str, cache_dir: str | os.PathLike[str]) -> dict[str, str]:
    """The server environment that enables the resolver plugin on ``root`` (only that plugin is loaded).

    Args:
        root: ``LORA_CKPT_ROOT``: where checkpoint names resolve (any fsspec root).
        cache_dir: ``LORA_CKPT_CACHE_DIR``: where the verified copies go.
    """
    return {"VLLM_PLUGINS": RESOLVER_PLUGIN, "LORA_CKPT_ROOT": root, "LORA_CKPT_CACHE_DIR": os.fspath(cache_dir)}


def s3_env(storage_options: Mapping[str, Any]) -> dict[str, str]:
    """The ``AWS_*`` variables that make s3fs (in another process) reach the S3 server of ``storage_options``.

    Args:
        storage_options: s3fs options with ``key``, ``secret`` and ``client_kwargs`` (``endpoint_url``,
            ``region_name``), as ``helpers.storage.moto_s3_server`` yields them.
    """
    client = storage_options.get("client_kwargs") or {}
    return {
        "AWS_ACCESS_KEY_ID": storage_options["key"],
        "AWS_SECRET_ACCESS_KEY": storage_options["secret"],
        "AWS_ENDPOINT_URL": client["endpoint_url"],
        "AWS_DEFAULT_REGION": client.get("region_name", "us-east-1"),
    }


def train_sampler(
    root: str,
    run_id: str,
    name: str,
    *,
    base_model: str = SERVED_BASE,
    steps: int = 2,
    storage_options: dict[str, Any] | None = None,
) -> tuple[Any, str]:
    """Train a ``LoRAModule`` on ``base_model`` for ``steps`` steps and save sampler checkpoint ``name``.

    Args:
        root: the checkpoint root (any fsspec root).
        run_id: the run id.
        name: the sampler checkpoint's name.
        base_model: the base to train on.
        steps: training steps.
        storage_options: fsspec options of ``root``.

    Returns:
        The trained module (its trainer still attached, for more saves) and the checkpoint's URI.
    """
    from helpers.training import MODULE_KWARGS, batch_loader, make_trainer
    from lightning_lora_ckpt import LoRACheckpointIO, LoRAModule

    io = LoRACheckpointIO(root=root, run_id=run_id, async_save=False, storage_options=storage_options)
    module = LoRAModule(**{**MODULE_KWARGS, "base_model": base_model})
    make_trainer(io, max_steps=steps).fit(module, batch_loader(steps))
    return module, module.save_weights_for_sampler(name)
