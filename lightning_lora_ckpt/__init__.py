"""Hosted-service style LoRA checkpoint lifecycle for PyTorch Lightning."""

__version__ = "0.1.0"

from .callbacks import PeriodicCheckpoint
from .data import JSONLDataModule
from .io import LoRACheckpointIO
from .manifest import CheckpointFormatError
from .models import load_base_model, load_tokenizer
from .module import LoRAModule
from .records import Checkpoint, TrainingRun
from .state_codec import StateEncodingError
from .store import CheckpointStore

__all__ = [
    "Checkpoint",
    "CheckpointFormatError",
    "CheckpointStore",
    "JSONLDataModule",
    "LoRACheckpointIO",
    "LoRAModule",
    "PeriodicCheckpoint",
    "StateEncodingError",
    "TrainingRun",
    "__version__",
    "load_base_model",
    "load_tokenizer",
]
