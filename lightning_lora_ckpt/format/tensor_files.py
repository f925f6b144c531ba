"""The safetensors codec of every tensor file of a checkpoint (never a pickle)."""

from __future__ import annotations

import functools
import json
import math
import struct

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


#: safetensors dtype names -> torch dtypes: safetensors' own table (its loader's), so both decoders agree.
_DTYPES: dict[str, torch.dtype] = {k: v for k, v in safetensors.torch._TYPES.items() if isinstance(v, torch.dtype)}
_MAX_HEADER = 100 << 20  # safetensors' own limit


def header_names(data: bytes | bytearray | memoryview) -> list[str]:
    """The tensor names a safetensors file's header lists (``__metadata__`` left out).

    Args:
        data: a verified safetensors file.

    Returns:
        The names, in the header's order.
    """
    (length,) = struct.unpack_from("<Q", data)
    return [n for n in json.loads(bytes(data[8 : 8 + length])) if n != "__metadata__"]


def render_like(template: bytes | bytearray | memoryview, tensors: dict[str, torch.Tensor], out: bytearray) -> bool:
    """Write into ``out`` the safetensors file of ``tensors`` that has ``template``'s layout, if it has it.

    safetensors lays a file out from its tensors' names, dtypes and shapes alone (and its metadata), so tensors
    with exactly the names, dtypes and shapes ``template`` lists make the same header at the same offsets: the file
    is ``template``'s header and the tensors' bytes at their offsets, with no serialiser and no new buffer (a
    snapshot chain's writer keeps its buffers from one snapshot to the next).

    Args:
        template: a safetensors file written with the same metadata.
        tensors: the tensors, by name (at least the template's; others are ignored), contiguous or not.
        out: a buffer of ``template``'s size.

    Returns:
        True if ``out`` now holds the file; False if the tensors do not have the template's layout (``out`` may then
        hold anything).
    """
    (length,) = struct.unpack_from("<Q", template)
    header = json.loads(bytes(template[8 : 8 + length]))
    header.pop("__metadata__", None)
    start = 8 + length
    if len(out) != len(template) or any(
        name not in tensors
        or _DTYPES.get(info["dtype"]) != tensors[name].dtype
        or list(tensors[name].shape) != info["shape"]
        for name, info in header.items()
    ):
        return False
    target = memoryview(out)
    target[:start] = memoryview(template)[:start]
    for name, info in header.items():
        begin, end = (start + offset for offset in info["data_offsets"])
        flat = tensors[name].detach().cpu().contiguous().view(-1)
        target[begin:end] = flat.view(torch.uint8).numpy().data if flat.numel() else b""
    return True


def load_tensors(data: bytes | memoryview, source: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (never a pickle).

    A writable ``memoryview`` (a file read locally, ``storage.read``) is decoded without copying: the tensors are
    views of it, each checked to lie inside it, with no two overlapping. ``bytes`` are decoded by safetensors.

    Args:
        data: the file's bytes.
        source: the file's URI, for the error message.

    Returns:
        The tensors, by name (on the CPU).

    Raises:
        CheckpointFormatError: naming ``source``, if ``data`` is not a valid safetensors file.
    """
    try:
        if isinstance(data, memoryview) and not data.readonly:
            return _views(data)
        return safetensors.torch.load(bytes(data))
    except (safetensors.SafetensorError, ValueError, TypeError, KeyError, struct.error) as err:
        raise CheckpointFormatError(f"{source} is not a valid safetensors file: {err}") from err


def _views(data: memoryview) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as views of ``data``, after the checks safetensors itself makes."""
    (length,) = struct.unpack_from("<Q", data)
    if length > _MAX_HEADER:
        raise ValueError(f"header too large ({length} bytes)")
    if not 0 < length <= len(data) - 8:
        raise ValueError(f"a header of {length} bytes in a file of {len(data)}")
    header = json.loads(bytes(data[8 : 8 + length]))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    header.pop("__metadata__", None)
    start, body = 8 + length, len(data) - 8 - length
    spans = []
    for name, info in header.items():
        dtype, shape, (begin, end) = _DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
        if not all(type(d) is int and d >= 0 for d in shape) or not (type(begin) is type(end) is int):
            raise ValueError(f"tensor {name!r} has a bad shape or offsets")
        if not 0 <= begin <= end <= body or end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"tensor {name!r}: offsets {begin}..{end} do not fit its shape or the file")
        spans.append((begin, end, name, dtype, shape))
    spans.sort()
    if [b for b, *_ in spans] != [0, *(e for _, e, *_ in spans[:-1])] or (spans and spans[-1][1] != body):
        raise ValueError("the tensors do not cover the data exactly once")
    tensors = {}
    for begin, end, name, dtype, shape in spans:
        offset = start + begin
        if end == begin:
            tensors[name] = torch.empty(shape, dtype=dtype)
        elif offset % dtype.itemsize:  # unaligned for its dtype: copied out
            tensors[name] = torch.frombuffer(bytearray(data[offset : start + end]), dtype=dtype).reshape(shape)
        else:
            tensors[name] = torch.frombuffer(
                data, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=offset
            ).reshape(shape)
    return tensors
