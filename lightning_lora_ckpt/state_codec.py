"""Pickle-free encoding of arbitrary checkpoint state into a JSON tree plus a flat dict of tensors.

Lightning's checkpoint dict mixes tensors (optimizer moments, RNG states) with nested containers whose
dict keys are not always strings (optimizer state is keyed by parameter index) and tuples (Adam betas).
Values JSON cannot express are written as one-key objects with a reserved tag, so decoding restores
the exact Python types; anything else is refused with the key path that holds it.
"""

from __future__ import annotations

import base64
import math
import pathlib
from typing import Any

import numpy as np
import torch

_TAG = "__lora_ckpt__"
_TAGS = ("tensor", "ndarray", "tuple", "map", "bytes", "float", "dtype", "path")


class StateEncodingError(TypeError):
    """A value in the checkpoint cannot be stored without pickle."""


def _tagged(kind: str, value: Any) -> dict[str, Any]:
    return {_TAG: kind, "v": value}


def snapshot_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy that later in-place updates of ``tensor`` cannot change."""
    return tensor.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)


def encode_state(obj: Any, copy_tensors: bool = True) -> tuple[Any, dict[str, torch.Tensor]]:
    """Encode ``obj`` into (JSON-serialisable tree, tensors by name).

    Tensors are snapshotted to CPU (``copy_tensors``) so the caller may keep training while they are
    written. Raises :class:`StateEncodingError` naming the key path of a value that is not supported.
    """
    tensors: dict[str, torch.Tensor] = {}

    def tensor_ref(value: torch.Tensor, path: str) -> str:
        name = path or "value"
        while name in tensors:
            name += "_"
        tensors[name] = snapshot_tensor(value) if copy_tensors else value
        return name

    def enc(value: Any, path: str) -> Any:
        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else _tagged("float", repr(value))
        if isinstance(value, torch.Tensor):
            return _tagged("tensor", tensor_ref(value, path))
        if isinstance(value, np.ndarray):
            if value.dtype == object:
                raise StateEncodingError(f"Cannot store an object ndarray at checkpoint key {path!r}")
            return _tagged("ndarray", tensor_ref(torch.from_numpy(np.ascontiguousarray(value)), path))
        if isinstance(value, np.generic):
            return enc(value.item(), path)
        if isinstance(value, list):
            return [enc(v, f"{path}.{i}") for i, v in enumerate(value)]
        if isinstance(value, tuple):
            return _tagged("tuple", [enc(v, f"{path}.{i}") for i, v in enumerate(value)])
        if isinstance(value, dict):
            if all(isinstance(k, str) and k != _TAG for k in value):
                return {k: enc(v, f"{path}.{k}" if path else k) for k, v in value.items()}
            return _tagged("map", [[enc(k, f"{path}.<key>"), enc(v, f"{path}.{k}")] for k, v in value.items()])
        if isinstance(value, bytes):
            return _tagged("bytes", base64.b64encode(value).decode("ascii"))
        if isinstance(value, torch.dtype):
            return _tagged("dtype", str(value).removeprefix("torch."))
        if isinstance(value, pathlib.PurePath):
            return _tagged("path", str(value))
        raise StateEncodingError(
            f"Cannot store {type(value).__module__}.{type(value).__qualname__} at checkpoint key {path!r} "
            "without pickle; return tensors, numbers, strings, lists and dicts from its state_dict() "
            "or on_save_checkpoint() instead"
        )

    return enc(obj, ""), tensors


def decode_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Invert :func:`encode_state`. Raises ``ValueError`` on malformed or inconsistent input."""

    def dec(value: Any) -> Any:
        if isinstance(value, list):
            return [dec(v) for v in value]
        if not isinstance(value, dict):
            return value
        if _TAG not in value:
            return {k: dec(v) for k, v in value.items()}
        kind, payload = value.get(_TAG), value.get("v")
        if kind not in _TAGS or set(value) != {_TAG, "v"}:
            raise ValueError(f"Malformed tagged value in training state: {str(value)[:200]}")
        if kind in ("tensor", "ndarray"):
            if not isinstance(payload, str) or payload not in tensors:
                raise ValueError(f"Training state refers to tensor {payload!r}, which is not in the tensor file")
            return tensors[payload] if kind == "tensor" else tensors[payload].numpy()
        if kind == "tuple":
            return tuple(dec(v) for v in _expect(payload, list, kind))
        if kind == "map":
            return {_hashable(dec(k)): dec(v) for k, v in _expect(payload, list, kind)}
        if kind == "bytes":
            return base64.b64decode(_expect(payload, str, kind), validate=True)
        if kind == "float":
            return float(_expect(payload, str, kind))
        if kind == "dtype":
            dtype = getattr(torch, _expect(payload, str, kind), None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"Unknown dtype {payload!r} in training state")
            return dtype
        return pathlib.Path(_expect(payload, str, kind))

    try:
        return dec(tree)
    except RecursionError as err:
        raise ValueError("Training state is nested too deeply") from err


def _expect(payload: Any, typ: type, kind: str) -> Any:
    if not isinstance(payload, typ):
        raise ValueError(f"Malformed {kind!r} value in training state: expected {typ.__name__}")
    return payload


def _hashable(key: Any) -> Any:
    if isinstance(key, (dict, list)):
        raise ValueError(f"Unhashable dict key in training state: {str(key)[:200]}")
    return key
