"""Hosted-service style LoRA checkpoint lifecycle for PyTorch Lightning.

Public names are imported on first use, so checkpoint management (``CheckpointStore``, the
``lightning-lora-ckpt`` management commands) starts without importing torch or Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Checkpoint": "records",
    "CheckpointConflictError": "store",
    "CheckpointTTL": "callbacks",
    "CheckpointWriteError": "storage",
    "CheckpointFormatError": "manifest",
    "CheckpointStore": "store",
    "HubPublishError": "hub",
    "HubPublisher": "hub",
    "JSONLDataModule": "data",
    "LoRACheckpointIO": "io",
    "LoRAFSDPStrategy": "strategies",
    "LoRAModelParallelStrategy": "strategies",
    "LoRAModule": "module",
    "PeriodicCheckpoint": "callbacks",
    "SamplingClient": "sampling",
    "SamplingParams": "sampling",
    "StateEncodingError": "state_codec",
    "TrainingRun": "records",
    "extract_archive": "store",
    "load_base_model": "models",
    "load_tokenizer": "models",
    "merge_adapter": "export",
    "push_to_hub": "hub",
}
__all__ = [
    "Checkpoint",
    "CheckpointConflictError",
    "CheckpointFormatError",
    "CheckpointStore",
    "CheckpointTTL",
    "CheckpointWriteError",
    "HubPublishError",
    "HubPublisher",
    "JSONLDataModule",
    "LoRACheckpointIO",
    "LoRAFSDPStrategy",
    "LoRAModelParallelStrategy",
    "LoRAModule",
    "PeriodicCheckpoint",
    "SamplingClient",
    "SamplingParams",
    "StateEncodingError",
    "TrainingRun",
    "__version__",
    "extract_archive",
    "load_base_model",
    "load_tokenizer",
    "merge_adapter",
    "push_to_hub",
]

if TYPE_CHECKING:
    from .callbacks import CheckpointTTL, PeriodicCheckpoint
    from .data import JSONLDataModule
    from .export import merge_adapter
    from .hub import HubPublisher, HubPublishError, push_to_hub
    from .io import LoRACheckpointIO
    from .manifest import CheckpointFormatError
    from .models import load_base_model, load_tokenizer
    from .module import LoRAModule
    from .records import Checkpoint, TrainingRun
    from .sampling import SamplingClient, SamplingParams
    from .state_codec import StateEncodingError
    from .storage import CheckpointWriteError
    from .store import CheckpointConflictError, CheckpointStore, extract_archive
    from .strategies import LoRAFSDPStrategy, LoRAModelParallelStrategy


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
