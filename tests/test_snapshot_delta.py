"""Delta snapshots' codec (format/snapshot_delta.py): bit-exact round trips, and hostile deltas refused before any
allocation beyond the stated size."""

from __future__ import annotations

import os

import pytest
import zstandard

from lightning_lora_ckpt.format.snapshot_delta import apply_delta, encode_delta, xor_bytes
from lightning_lora_ckpt.format.strict_json import CheckpointFormatError


@pytest.mark.parametrize("size", [0, 1, 7, 8, 4097])
def test_round_trip_is_bit_exact(size: int) -> None:
    parent, child = os.urandom(size), bytearray(os.urandom(size))
    delta = encode_delta(parent, child)
    assert delta is not None and bytes(apply_delta(parent, delta, size, "d")) == child


def test_mostly_equal_files_give_small_deltas() -> None:
    parent = os.urandom(1 << 20)
    child = bytearray(parent)
    child[1000:1010] = os.urandom(10)
    delta = encode_delta(parent, child)
    assert delta is not None and len(delta) < 1000 and bytes(apply_delta(parent, delta, len(parent), "d")) == child


def test_files_of_other_sizes_have_no_delta() -> None:
    assert encode_delta(b"abc", b"abcd") is None
    with pytest.raises(ValueError, match="3 and 4 bytes"):
        xor_bytes(b"abc", b"abcd")


def test_hostile_deltas_are_refused() -> None:
    parent = os.urandom(4096)
    good = encode_delta(parent, os.urandom(4096))
    assert good is not None
    with pytest.raises(CheckpointFormatError, match="must be equal"):
        apply_delta(parent, good, 4095, "d")
    with pytest.raises(CheckpointFormatError, match="not a zstandard frame"):
        apply_delta(parent, b"not zstd at all, really", 4096, "d")
    # a frame that does not state its size, and one that states more than the manifest: refused from the header
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 10)
    with pytest.raises(CheckpointFormatError, match="where its manifest states 4096"):
        apply_delta(parent, unsized, 4096, "d")
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (1 << 24))
    with pytest.raises(CheckpointFormatError, match=f"states {1 << 24} decompressed bytes"):
        apply_delta(parent, bomb, 4096, "d")
    with pytest.raises(CheckpointFormatError, match="does not decompress"):
        apply_delta(parent, good[:-20], 4096, "d")
