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

from .strict_json import CheckpointFormatError

_TAG = "__lora_ckpt__"
_TAGS = ("tensor", "ndarray", "tuple", "map", "bytes", "float", "dtype", "path")
_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}


class StateEncodingError(TypeError):
    """A value in the checkpoint cannot be stored without pickle.

    A ``TypeError``; the message names the key path of the value.
    """


def _tagged(kind: str, value: Any) -> dict[str, Any]:
    return {_TAG: kind, "v": value}


def encode_state(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Encode ``obj`` into (JSON-serialisable tree, tensors by name); the tensors are ``obj``'s own.

    Supported: None, bools, ints, strings, floats (also NaN/±inf), tensors, numpy arrays (not of object
    dtype) and scalars, lists, tuples, dicts (keys of these types), bytes, torch dtypes and paths
    (docs/format.md).

    Args:
        obj: the state to encode, e.g. Lightning's checkpoint dict without ``state_dict``.

    Returns:
        The JSON-serialisable tree (tensors replaced by references to their names) and the tensors by name.

    Raises:
        StateEncodingError: naming the key path of a value that is not supported.
    """
    tensors: dict[str, torch.Tensor] = {}

    def tensor_ref(value: torch.Tensor, path: str) -> str:
        name = path or "value"
        while name in tensors:
            name += "_"
        tensors[name] = value
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


def decode_state(tree: Any, tensors: dict[str, torch.Tensor], source: str = "training state") -> Any:
    """Invert :func:`encode_state`.

    Nothing in ``tree`` is ever executed or imported.

    Args:
        tree: the JSON tree of ``training_state.json``.
        tensors: the tensors of ``training_state.safetensors``, by name.
        source: what the state is, for error messages.

    Returns:
        The state, with the original Python types (tuples, non-string dict keys, ndarrays, ...) restored.

    Raises:
        CheckpointFormatError: naming ``source`` and the key path of malformed or inconsistent input (an
            unknown tag, a reference to a missing tensor, bad base64, an unknown dtype, nesting too deep).
    """

    def bad(path: str, why: str) -> CheckpointFormatError:
        return CheckpointFormatError(f"Invalid {source} at key {path[:200] or '<root>'!r}: {why[:300]}")

    def expect(payload: Any, typ: type, kind: str, path: str) -> Any:
        if not isinstance(payload, typ):
            raise bad(path, f"a {kind!r} value must hold a {typ.__name__}")
        return payload

    def dec(value: Any, path: str) -> Any:
        if isinstance(value, list):
            return [dec(v, f"{path}.{i}") for i, v in enumerate(value)]
        if not isinstance(value, dict):
            return value
        if _TAG not in value:
            return {k: dec(v, f"{path}.{k}" if path else k) for k, v in value.items()}
        kind, payload = value.get(_TAG), value.get("v")
        if kind not in _TAGS or set(value) != {_TAG, "v"}:
            raise bad(path, f"malformed tagged value {str(value)[:200]}")
        if kind in ("tensor", "ndarray"):
            if not isinstance(payload, str) or payload not in tensors:
                raise bad(path, f"refers to tensor {str(payload)[:100]!r}, which is not in the tensor file")
            if kind == "tensor":
                return tensors[payload]
            try:
                return tensors[payload].numpy()
            except (TypeError, RuntimeError) as err:  # e.g. bfloat16, which numpy lacks
                raise bad(path, f"tensor {payload!r} cannot be an ndarray: {err}") from err
        if kind == "tuple":
            return tuple(dec(v, f"{path}.{i}") for i, v in enumerate(expect(payload, list, kind, path)))
        if kind == "map":
            out = {}
            for item in expect(payload, list, kind, path):
                if not isinstance(item, list) or len(item) != 2:
                    raise bad(path, "a 'map' entry must be a [key, value] pair")
                key = dec(item[0], f"{path}.<key>")
                try:
                    hash(key)
                except TypeError:
                    raise bad(path, f"unhashable dict key {str(key)[:100]}") from None
                out[key] = dec(item[1], f"{path}.{key}")
            return out
        if kind == "bytes":
            try:
                return base64.b64decode(expect(payload, str, kind, path), validate=True)
            except ValueError as err:
                raise bad(path, f"bad base64: {err}") from err
        if kind == "float":
            try:
                return float(expect(payload, str, kind, path))
            except ValueError as err:
                raise bad(path, str(err)) from err
        if kind == "dtype":
            dtype_name: str = expect(payload, str, kind, path)
            dtype = _DTYPES.get(dtype_name)
            if dtype is None:
                raise bad(path, f"unknown dtype {dtype_name[:100]!r}")
            return dtype
        return pathlib.Path(expect(payload, str, kind, path))

    try:
        return dec(tree, "")
    except RecursionError as err:
        raise CheckpointFormatError(f"Invalid {source}: nested too deeply") from err
