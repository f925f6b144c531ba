"""The safetensors codec of every tensor file of a checkpoint (never a pickle)."""

from __future__ import annotations

import functools

import safetensors
import safetensors.torch
import torch

from .files import LazyFile
from .strict_json import CheckpointFormatError


def safetensors_file(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> LazyFile:
    """A safetensors file of ``tensors``, serialised only when it is written or rendered.

    Args:
        tensors: the tensors, by name.
        metadata: the file's string metadata (e.g. ``{"format": "pt"}``), or None.

    Returns:
        The file, to be written to a local path or rendered to bytes.
    """
    return LazyFile(
        write=lambda path: safetensors.torch.save_file(tensors, path, metadata=metadata),
        render=functools.partial(safetensors.torch.save, tensors, metadata=metadata),
    )


def load_tensors(data: bytes, source: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (never a pickle).

    Args:
        data: the file's bytes.
        source: the file's URI, for the error message.

    Returns:
        The tensors, by name (on the CPU).

    Raises:
        CheckpointFormatError: naming ``source``, if ``data`` is not a valid safetensors file.
    """
    try:
        return safetensors.torch.load(data)
    except (safetensors.SafetensorError, ValueError, TypeError) as err:
        raise CheckpointFormatError(f"{source} is not a valid safetensors file: {err}") from err
