"""Snapshot chains of full-parameter sampler checkpoints (Fireworks' ``checkpoint_type="base"`` / ``"delta"``): the
rules of the manifest fields that record them. Pure names and numbers: no torch, no file access.

A *base* (``snapshot: "base"``) holds its model directory whole. A *delta* (``snapshot: "delta"``) holds the same
directory, except that some weight files are stored as ``<file>.xor.zst`` (``format.snapshot_delta``): their XOR
with the same file of ``parent`` (another sampler checkpoint of its run, by name), compressed. Its manifest
records, for each such file, the full file it rebuilds (``rebuilds``: size and digest) and the parent's file it
was taken against (``parent_files``), so a parent replaced or rewritten by something else is refused before a
byte of it is read, and a rebuilt file is checked like any other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, Protocol

from .model_layout import weight_files
from .snapshot_delta import DELTA_SUFFIX

Snapshot = Literal["base", "delta"]
SNAPSHOTS: tuple[Snapshot, ...] = ("base", "delta")
#: The most links a reader follows from a delta to its base: chains are compacted far sooner (``max_deltas``).
MAX_CHAIN = 64


class _Entry(Protocol):
    @property
    def size(self) -> int: ...


def delta_name(weight_file: str) -> str:
    """The name under which a weight file is stored as a delta (``model.safetensors`` -> ``....xor.zst``).

    Args:
        weight_file: a weight file of a model directory.

    Returns:
        The delta file's name.
    """
    return weight_file + DELTA_SUFFIX


def max_delta_size(size: int) -> int:
    """The largest delta file of a weight file of ``size`` bytes: zstandard's worst case with room for the header.

    Args:
        size: the full file's size.

    Returns:
        A size cap far above any real delta (a delta of random bytes is barely larger than the file).
    """
    return size + size // 128 + (1 << 20)


def stored_names(files: Mapping[str, object], rebuilds: Mapping[str, object]) -> set[str]:
    """The full model directory's names of a delta's files: each ``<file>.xor.zst`` as the file it rebuilds.

    Args:
        files: the files the manifest lists (as stored).
        rebuilds: the full files its deltas rebuild, by name.

    Returns:
        The names of the model directory the checkpoint stands for.
    """
    return (set(files) - {delta_name(n) for n in rebuilds}) | set(rebuilds)


def snapshot_problem(
    *,
    checkpoint_type: str,
    lora_rank: int,
    name: str,
    snapshot: str | None,
    parent: str | None,
    files: Mapping[str, _Entry],
    rebuilds: Mapping[str, _Entry],
    parent_files: Mapping[str, _Entry],
) -> str | None:
    """What is wrong with a manifest's snapshot fields, or None.

    Args:
        checkpoint_type: the manifest's checkpoint type.
        lora_rank: its ``lora_rank``.
        name: its checkpoint name.
        snapshot: ``"base"``, ``"delta"`` or None (not part of a chain).
        parent: the parent's name (a delta's only).
        files: the files it lists, as stored.
        rebuilds: the full files its deltas rebuild (a delta's only).
        parent_files: the parent's files its deltas were taken against (a delta's only).

    Returns:
        A one-line description of the problem, or None.
    """
    if snapshot is None or snapshot == "base":
        if parent is not None or rebuilds or parent_files:
            return "only a delta snapshot (snapshot: 'delta') has a parent, rebuilds or parent_files"
        if snapshot is not None and (checkpoint_type != "sampler" or lora_rank != 0):
            return "only full-parameter sampler checkpoints (lora_rank 0) are snapshots"
        return None
    if snapshot not in SNAPSHOTS:
        return f"unknown snapshot {str(snapshot)[:50]!r}, expected 'base' or 'delta'"
    if checkpoint_type != "sampler" or lora_rank != 0:
        return "only full-parameter sampler checkpoints (lora_rank 0) are snapshots"
    if not isinstance(parent, str) or parent == name:
        return "a delta snapshot names its parent, another sampler checkpoint of its run"
    if not rebuilds or set(rebuilds) != set(parent_files) or weight_files(rebuilds) != sorted(rebuilds):
        return "a delta snapshot lists the weight files it rebuilds, each with the parent's file it was taken against"
    for weights, entry in rebuilds.items():
        stored = files.get(delta_name(weights))
        if stored is None or weights in files:
            return f"a delta snapshot stores {weights} as {delta_name(weights)}, and only so"
        if entry.size != parent_files[weights].size:
            return f"{weights} rebuilds {entry.size} bytes from a parent file of {parent_files[weights].size}"
        if stored.size > max_delta_size(entry.size):
            return f"{delta_name(weights)} is listed with {stored.size} bytes, more than a delta of {entry.size} takes"
    return None
