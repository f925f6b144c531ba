"""Delta snapshots' codec (format/snapshot_delta.py): bit-exact round trips, and hostile deltas refused before any
allocation beyond the stated size."""

from __future__ import annotations

import json
import os
import struct

import pytest
import zstandard

from lightning_lora_ckpt.format import snapshot_delta
from lightning_lora_ckpt.format.snapshot_delta import MAGIC, apply_delta, encode_delta
from lightning_lora_ckpt.format.strict_json import CheckpointFormatError


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(snapshot_delta, "CHUNK", 1024)  # several frames, an odd-length last one


@pytest.mark.parametrize("size", [0, 1, 7, 1024, 4097])
def test_round_trip_is_bit_exact(size: int) -> None:
    parent, child = os.urandom(size), bytearray(os.urandom(size))
    delta = encode_delta(parent, child)
    assert delta is not None
    rebuilt = bytearray(parent)
    apply_delta(rebuilt, delta, "d")
    assert rebuilt == child


def test_mostly_equal_files_give_small_deltas() -> None:
    parent = os.urandom(1 << 16)
    child = bytearray(parent)
    child[1000:1010] = os.urandom(10)
    delta = encode_delta(parent, child)
    assert delta is not None and len(delta) < len(parent) // 10  # 64 chunks of 1024 bytes: mostly frame overhead
    rebuilt = bytearray(parent)
    apply_delta(memoryview(rebuilt), delta, "d")  # in place through a view, as the chain reader does
    assert rebuilt == child


def test_files_of_other_sizes_have_no_delta() -> None:
    assert encode_delta(b"abc", b"abcd") is None


def _container(size: int, frames: list[bytes], chunk: int = 1024) -> bytes:
    header = json.dumps({"size": size, "chunk": chunk, "frames": [len(f) for f in frames]}).encode()
    return b"".join([MAGIC, struct.pack("<I", len(header)), header, *frames])


def test_hostile_deltas_are_refused() -> None:
    parent = os.urandom(2048)
    good = encode_delta(parent, os.urandom(2048))
    assert good is not None
    with pytest.raises(CheckpointFormatError, match="states 2048 rebuilt bytes where its parent's file has 2047"):
        apply_delta(bytearray(2047), good, "d")
    with pytest.raises(CheckpointFormatError, match="magic bytes"):
        apply_delta(bytearray(parent), b"not a delta at all", "d")
    with pytest.raises(CheckpointFormatError, match="header of 4294967295 bytes"):
        apply_delta(bytearray(parent), MAGIC + b"\xff\xff\xff\xff", "d")
    with pytest.raises(CheckpointFormatError, match="states 4096 rebuilt bytes"):
        apply_delta(bytearray(parent), _container(4096, []), "d")
    with pytest.raises(CheckpointFormatError, match="4 frames per 1024-byte chunk"):
        apply_delta(bytearray(parent), _container(2048, [b"x"] * 4), "d")
    # each plane of a 1024-byte chunk has 512 bytes: its bitmap must state exactly 64 bytes before it is decompressed
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 64)
    with pytest.raises(CheckpointFormatError, match=r"stating \d+ bytes where it must hold 64"):
        apply_delta(bytearray(parent), _container(2048, [unsized] * 8), "d")
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (1 << 24))
    with pytest.raises(CheckpointFormatError, match=f"stating {1 << 24} bytes where it must hold 64"):
        apply_delta(bytearray(parent), _container(2048, [bomb] * 8), "d")
    # the values must be exactly the bits the bitmap sets: 8 here, not 512
    bitmap, values = (zstandard.ZstdCompressor().compress(b) for b in (b"\xff" + b"\0" * 63, b"\1" * 512))
    with pytest.raises(CheckpointFormatError, match="stating 512 bytes where it must hold 8"):
        apply_delta(bytearray(parent), _container(2048, [bitmap, values] * 4), "d")
    with pytest.raises(CheckpointFormatError, match="frames take"):
        apply_delta(bytearray(parent), good[:-20], "d")
    frame = zstandard.ZstdCompressor().compress(b"\1" * 64)
    with pytest.raises(CheckpointFormatError, match="does not decompress"):
        apply_delta(bytearray(parent), _container(2048, [frame[:-4] + b"\0\0\0\0"] + [frame] * 7), "d")
