"""Hosted-service style LoRA checkpoint lifecycle for PyTorch Lightning.

Public names are imported on first use, so checkpoint management (``CheckpointStore``, the
``lightning-lora-ckpt`` management commands) starts without importing torch or Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .format.version import __version__

_EXPORTS = {
    "check_servable": "modeling.servable",
    "DeploymentSampler": "modeling.deployment",
    "hotload": "modeling.hotload",
    "NotServableError": "modeling.servable",
    "ServableReport": "modeling.servable",
    "ServedAdapter": "modeling.hotload",
    "ServedIdentityError": "modeling.deployment",
    "VLLMHotload": "lightning.vllm_hotload",
    "VLLMServerError": "modeling.vllm_client",
    "Checkpoint": "format.records",
    "convert_layout": "tools.convert",
    "Converted": "tools.convert",
    "CheckpointConflictError": "storage.fs",
    "CheckpointFormatError": "format.strict_json",
    "CheckpointStore": "storage.store",
    "CheckpointTTL": "lightning.callbacks",
    "CheckpointWriteError": "storage.fs",
    "extract_archive": "storage.archive",
    "HubPublisher": "lightning.hub_publisher",
    "HubPublishError": "storage.hub",
    "JSONLDataModule": "lightning.data",
    "LoRAAdapterCheckpointing": "lightning.adapter_callback",
    "load_base_model": "modeling.base",
    "load_tokenizer": "modeling.base",
    "LoRACheckpointIO": "lightning.checkpoint_io",
    "LoRAFSDPStrategy": "lightning.strategies",
    "LoRAModelParallelStrategy": "lightning.strategies",
    "LoRAModule": "lightning.module",
    "merge_adapter": "tools.export",
    "PeriodicCheckpoint": "lightning.callbacks",
    "push_to_hub": "storage.hub",
    "SamplingClient": "modeling.sampling",
    "SamplingParams": "modeling.sampling",
    "StateEncodingError": "format.state_codec",
    "TrainingRun": "format.records",
    "KeepBest": "policy.rules",
    "KeepEvery": "policy.rules",
    "KeepLatest": "policy.rules",
    "MaxBytes": "policy.rules",
    "Retention": "policy.rules",
    "RetentionPlan": "policy.retention",
}
__all__ = [
    "Checkpoint",
    "CheckpointConflictError",
    "CheckpointFormatError",
    "CheckpointStore",
    "CheckpointTTL",
    "CheckpointWriteError",
    "Converted",
    "DeploymentSampler",
    "HubPublishError",
    "HubPublisher",
    "JSONLDataModule",
    "KeepBest",
    "KeepEvery",
    "KeepLatest",
    "LoRAAdapterCheckpointing",
    "LoRACheckpointIO",
    "LoRAFSDPStrategy",
    "LoRAModelParallelStrategy",
    "LoRAModule",
    "MaxBytes",
    "NotServableError",
    "PeriodicCheckpoint",
    "Retention",
    "RetentionPlan",
    "SamplingClient",
    "SamplingParams",
    "ServableReport",
    "ServedAdapter",
    "ServedIdentityError",
    "StateEncodingError",
    "TrainingRun",
    "VLLMHotload",
    "VLLMServerError",
    "__version__",
    "check_servable",
    "convert_layout",
    "extract_archive",
    "hotload",
    "load_base_model",
    "load_tokenizer",
    "merge_adapter",
    "push_to_hub",
]

if TYPE_CHECKING:
    from .format.records import Checkpoint, TrainingRun
    from .format.state_codec import StateEncodingError
    from .format.strict_json import CheckpointFormatError
    from .lightning.adapter_callback import LoRAAdapterCheckpointing
    from .lightning.callbacks import CheckpointTTL, PeriodicCheckpoint
    from .lightning.checkpoint_io import LoRACheckpointIO
    from .lightning.data import JSONLDataModule
    from .lightning.hub_publisher import HubPublisher
    from .lightning.module import LoRAModule
    from .lightning.strategies import LoRAFSDPStrategy, LoRAModelParallelStrategy
    from .lightning.vllm_hotload import VLLMHotload
    from .modeling.base import load_base_model, load_tokenizer
    from .modeling.deployment import DeploymentSampler, ServedIdentityError
    from .modeling.hotload import ServedAdapter, hotload
    from .modeling.sampling import SamplingClient, SamplingParams
    from .modeling.servable import NotServableError, ServableReport, check_servable
    from .modeling.vllm_client import VLLMServerError
    from .policy.retention import RetentionPlan
    from .policy.rules import KeepBest, KeepEvery, KeepLatest, MaxBytes, Retention
    from .storage.archive import extract_archive
    from .storage.fs import CheckpointConflictError, CheckpointWriteError
    from .storage.hub import HubPublishError, push_to_hub
    from .storage.store import CheckpointStore
    from .tools.convert import Converted, convert_layout
    from .tools.export import merge_adapter


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
