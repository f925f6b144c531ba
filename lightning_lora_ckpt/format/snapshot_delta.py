"""Delta snapshots (Fireworks' ``checkpoint_type="delta"``): a file stored as the XOR of its bytes with the same
file of the previous snapshot, compressed with zstandard.

Between two snapshots of one run a weight file keeps its layout (the same safetensors header, tensor names,
shapes and offsets), and after a few optimizer steps at a fine-tuning learning rate most of its bits are the
same: the XOR is mostly zero bytes, which zstandard shrinks by orders of magnitude. A file whose size changed is
not stored as a delta (the writer stores it whole).

Reading is bounded: the rebuilt file must have exactly the size its manifest states (the parent's size), the
decompression never produces more than that, and the rebuilt bytes are then checked against the digest the
manifest records for the full file, so a delta can only ever rebuild the exact file that was saved.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .strict_json import CheckpointFormatError

#: Suffix of a file stored as a delta: ``model.safetensors`` -> ``model.safetensors.xor.zst``.
DELTA_SUFFIX = ".xor.zst"
#: zstandard level of deltas: level 3 (zstd's default) compresses zero runs as well as higher levels, much faster.
DELTA_LEVEL = 3


def xor_bytes(a: bytes | memoryview | bytearray, b: bytes | memoryview | bytearray) -> bytearray:
    """The byte-wise XOR of two buffers of the same length (8 bytes at a time where the length allows).

    Args:
        a: the first buffer.
        b: the second buffer, as long as ``a``.

    Returns:
        A new buffer.

    Raises:
        ValueError: the lengths differ.
    """
    if len(a) != len(b):
        raise ValueError(f"cannot XOR buffers of {len(a)} and {len(b)} bytes")
    out = bytearray(len(a))
    wide = len(a) - len(a) % 8
    view = np.frombuffer(out, dtype=np.uint8)
    left, right = np.frombuffer(a, dtype=np.uint8), np.frombuffer(b, dtype=np.uint8)
    np.bitwise_xor(left[:wide].view(np.uint64), right[:wide].view(np.uint64), out=view[:wide].view(np.uint64))
    np.bitwise_xor(left[wide:], right[wide:], out=view[wide:])
    return out


def encode_delta(parent: bytes | memoryview | bytearray, child: bytes | memoryview | bytearray) -> bytes | None:
    """The delta of ``child`` against ``parent``: zstandard of their XOR, or None if their sizes differ.

    Args:
        parent: the file's bytes in the previous snapshot.
        child: the file's bytes now.

    Returns:
        The compressed delta (a zstandard frame recording its content size), or None.
    """
    import zstandard

    if len(parent) != len(child):
        return None
    compressor = zstandard.ZstdCompressor(level=DELTA_LEVEL, threads=-1, write_content_size=True)
    return compressor.compress(bytes(xor_bytes(parent, child)))


def apply_delta(
    parent: bytes | memoryview | bytearray, delta: bytes | memoryview | bytearray, size: int, source: str
) -> bytearray:
    """Rebuild a file from its parent's bytes and its delta, refusing a delta that does not fit.

    Args:
        parent: the file's bytes in the parent snapshot (already verified against its manifest).
        delta: the compressed delta.
        size: the rebuilt file's size as the manifest states it (must be the parent's size).
        source: the delta file's URI, for error messages.

    Returns:
        The rebuilt bytes (the caller checks their digest against the manifest).

    Raises:
        CheckpointFormatError: the stated size is not the parent's, the delta is not a zstandard frame of exactly
            that size (checked before decompressing beyond it), or it does not decompress.
    """
    import zstandard

    if size != len(parent):
        raise CheckpointFormatError(
            f"Delta {source} rebuilds a file of {size} bytes from a parent file of {len(parent)}: they must be equal"
        )
    try:
        params: Any = zstandard.get_frame_parameters(bytes(delta[:18]))
    except zstandard.ZstdError as err:
        raise CheckpointFormatError(f"Delta {source} is not a zstandard frame: {err}") from None
    if params.content_size != size:
        raise CheckpointFormatError(
            f"Delta {source} states {params.content_size} decompressed bytes where its manifest states {size}; "
            "refusing to decompress it"
        )
    try:
        xor = zstandard.ZstdDecompressor().decompress(bytes(delta), max_output_size=size)
    except zstandard.ZstdError as err:
        raise CheckpointFormatError(f"Delta {source} does not decompress: {err}") from None
    if len(xor) != size:
        raise CheckpointFormatError(f"Delta {source} decompresses to {len(xor)} bytes, not the {size} stated")
    return xor_bytes(parent, xor)
