"""Delta snapshots (Fireworks' ``checkpoint_type="delta"``): a file stored as the XOR of its bytes with the same
file of the previous snapshot, compressed with zstandard.

Between two snapshots of one run a weight file keeps its layout (the same safetensors header, tensor names,
shapes and offsets), and after a few optimizer steps at a fine-tuning learning rate most of its bits are the
same: the XOR is mostly zero bytes. Before compressing, each chunk of the XOR is split into byte planes (the even
bytes, then the odd ones): the high byte of a bf16/fp16 value (sign, exponent, top of the mantissa) almost never
changes, so its plane is nearly all zeros and compresses to almost nothing, where interleaved it would break up
the zero runs. Each plane is then stored sparse: a bitmap of its nonzero bytes and the nonzero bytes themselves,
each compressed with zstandard (zstandard alone spends a few bytes per isolated nonzero byte; after the first
Adam steps, when one bf16 value in six moves by an ulp, the sparse form is about 1.4x smaller at the same speed).
Chunks are compressed and rebuilt in parallel (zstandard and numpy release the GIL). A file whose size changed is
not stored as a delta (the writer stores it whole).

A delta file: ``MAGIC``, a 4-byte little-endian length, a JSON header ``{"size", "chunk", "frames"}`` (the
rebuilt size, the chunk length, each frame's compressed length), then four zstandard frames per chunk: the even
plane's bitmap and values, then the odd plane's.

Reading is bounded: the rebuilt file must have exactly the size its manifest states (the parent's size), every
frame must state exactly its length before it is decompressed (a bitmap: its plane's length in bits; values: the
bits its bitmap sets), the output is never larger than that, and the rebuilt bytes are then checked against the
digest the manifest records for the full file, so a delta can only ever rebuild the exact file that was saved.
"""

from __future__ import annotations

import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from .strict_json import CheckpointFormatError, load_json_object

#: Suffix of a file stored as a delta: ``model.safetensors`` -> ``model.safetensors.xor.zst``.
DELTA_SUFFIX = ".xor.zst"
MAGIC = b"LCKDELT2"
#: zstandard frames per chunk: (bitmap, values) of the even plane, then of the odd one.
FRAMES_PER_CHUNK = 4
#: zstandard level of deltas: level 3 (zstd's default) compresses zero runs about as well as higher levels, faster.
DELTA_LEVEL = 3
#: Bytes of the file per frame (even, so byte planes never straddle chunks).
CHUNK = 16 << 20
_MAX_HEADER_BYTES = 1 << 20

Buffer = bytes | memoryview | bytearray


def _u8(buffer: Buffer) -> np.ndarray:
    return np.frombuffer(buffer, dtype=np.uint8)


def _sparse(plane: np.ndarray, compress: Any) -> list[bytes]:
    """A byte plane as two frames: the bitmap of its nonzero bytes, then those bytes."""
    nonzero = plane != 0
    return [compress(np.packbits(nonzero).tobytes()), compress(plane[nonzero].tobytes())]


def encode_delta(parent: Buffer, child: Buffer) -> bytes | None:
    """The delta of ``child`` against ``parent`` (see the module docstring), or None if their sizes differ.

    Args:
        parent: the file's bytes in the previous snapshot.
        child: the file's bytes now.

    Returns:
        The delta file's bytes, or None.
    """
    import zstandard

    if len(parent) != len(child):
        return None
    left, right = _u8(parent), _u8(child)

    def frames(start: int) -> list[bytes]:
        xor = np.bitwise_xor(left[start : start + CHUNK], right[start : start + CHUNK])
        compress = zstandard.ZstdCompressor(level=DELTA_LEVEL, write_content_size=True).compress
        return _sparse(xor[0::2], compress) + _sparse(xor[1::2], compress)

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        chunks = list(pool.map(frames, range(0, len(parent), CHUNK))) if len(parent) else []
    flat = [frame for chunk in chunks for frame in chunk]
    header = json.dumps({"size": len(parent), "chunk": CHUNK, "frames": [len(f) for f in flat]}).encode()
    return b"".join([MAGIC, struct.pack("<I", len(header)), header, *flat])


def apply_delta(target: bytearray | memoryview, delta: Buffer, source: str) -> None:
    """Rebuild a file in place: XOR its delta into the parent's bytes in ``target``, refusing a delta that does not
    fit before anything is decompressed.

    Applying the deltas of a chain one after the other into one buffer rebuilds the chain's last file with no other
    allocation than one chunk per thread.

    Args:
        target: the parent's file bytes (already verified against its manifest), writable; they become the file's.
        delta: the delta file's bytes.
        source: the delta file's URI, for error messages.

    Raises:
        CheckpointFormatError: the delta states another size than ``target``'s, its header is malformed, a frame
            does not state exactly its chunk's length (checked before decompressing it), or a frame does not
            decompress; ``target`` may then be partly rebuilt.
    """
    size = len(target)
    chunk, frames = _header(delta, size, source)
    out = _u8(target)

    def apply_plane(frames: list[tuple[int, int]], target: np.ndarray) -> None:
        (bits_at, bits_len), (values_at, values_len) = frames
        bitmap = _decompress(memoryview(delta)[bits_at : bits_at + bits_len], -(-len(target) // 8), source)
        nonzero = np.flatnonzero(np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8), count=len(target)))
        values = _decompress(memoryview(delta)[values_at : values_at + values_len], len(nonzero), source)
        target[nonzero] ^= np.frombuffer(values, dtype=np.uint8)  # only the bytes that change are touched

    def rebuild(index: int) -> None:
        start = index * chunk
        end, mine = min(start + chunk, size), frames[FRAMES_PER_CHUNK * index : FRAMES_PER_CHUNK * (index + 1)]
        apply_plane(mine[:2], out[start:end:2])
        apply_plane(mine[2:], out[start + 1 : end : 2])

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(rebuild, range(len(frames) // FRAMES_PER_CHUNK)))


def _header(delta: Buffer, size: int, source: str) -> tuple[int, list[tuple[int, int]]]:
    """The chunk length and each frame's (offset, length) in ``delta``, checked against ``size``."""

    def bad(why: str) -> CheckpointFormatError:
        return CheckpointFormatError(f"Delta {source} is malformed: {why}")

    if bytes(delta[: len(MAGIC)]) != MAGIC or len(delta) < len(MAGIC) + 4:
        raise bad("it does not start with the delta format's magic bytes")
    (length,) = struct.unpack("<I", bytes(delta[len(MAGIC) : len(MAGIC) + 4]))
    start = len(MAGIC) + 4
    if length > _MAX_HEADER_BYTES or start + length > len(delta):
        raise bad(f"a header of {length} bytes")
    header: dict[str, Any] = load_json_object(
        bytes(delta[start : start + length]), _MAX_HEADER_BYTES, f"Delta {source}"
    )
    chunk, lengths = header.get("chunk"), header.get("frames")
    if header.get("size") != size:
        raise bad(f"it states {header.get('size')!r} rebuilt bytes where its parent's file has {size}")
    if type(chunk) is not int or chunk <= 0 or chunk % 2:
        raise bad("the chunk length is not a positive even number")
    if (
        not isinstance(lengths, list)
        or len(lengths) != FRAMES_PER_CHUNK * -(-size // chunk)
        or not all(type(n) is int and n > 0 for n in lengths)
    ):
        raise bad(f"it does not hold {FRAMES_PER_CHUNK} frames per {chunk}-byte chunk of {size} bytes")
    offsets, position = [], start + length
    for n in lengths:
        offsets.append((position, n))
        position += n
    if position != len(delta):
        raise bad(f"its frames take {position} bytes, the file has {len(delta)}")
    return chunk, offsets


def _decompress(frame: memoryview, expected: int, source: str) -> bytes:
    """One frame, which must state exactly ``expected`` bytes before anything is decompressed."""
    import zstandard

    try:
        stated = zstandard.get_frame_parameters(bytes(frame[:18])).content_size
    except zstandard.ZstdError as err:
        raise CheckpointFormatError(f"Delta {source} holds a frame that is not zstandard: {err}") from None
    if stated != expected:
        raise CheckpointFormatError(
            f"Delta {source} holds a frame stating {stated} bytes where it must hold {expected}; refusing it"
        )
    try:
        data = zstandard.ZstdDecompressor().decompress(bytes(frame), max_output_size=expected)
    except zstandard.ZstdError as err:
        raise CheckpointFormatError(f"Delta {source} does not decompress: {err}") from None
    if len(data) != expected:
        raise CheckpointFormatError(f"Delta {source} holds a frame of {len(data)} bytes, not the {expected} stated")
    return data
