"""Copying a committed checkpoint from one root to another, verified, through the destination's commit protocol.

The fast local tier (``LoRACheckpointIO(local_tier=...)``) mirrors each checkpoint it commits locally to the
durable root this way: every file is read and checked against the source manifest, and the destination's
commit writes the same manifest last, so a mirrored checkpoint is bit-identical to its source, and a copy
interrupted half-way is never visible there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ..format.manifest import FileEntry, Manifest
from .commit import commit_checkpoint
from .fs import CheckpointWriteError
from .read import read_checkpoint


def copy_checkpoint(
    source: str,
    destination: str,
    source_options: Mapping[str, Any] | None = None,
    destination_options: Mapping[str, Any] | None = None,
    replace: bool = True,
) -> Manifest:
    """Copy the checkpoint at ``source`` to ``destination`` with the same manifest (metadata included).

    Args:
        source: the committed checkpoint's URI.
        destination: where the copy goes (any fsspec URI; the same run, kind and name, typically).
        source_options: fsspec options of the source's filesystem.
        destination_options: fsspec options of the destination's filesystem.
        replace: replace a checkpoint committed at ``destination`` (never a published or pinned one).

    Returns:
        The manifest committed at ``destination``.

    Raises:
        CheckpointFormatError: the source is missing or damaged (nothing is written).
        FileExistsError: a checkpoint is committed at ``destination`` and ``replace`` is False.
        CheckpointConflictError: the checkpoint at ``destination`` is published or pinned.
        CheckpointWriteError: the destination kept failing, or wrote other bytes than were read.
    """
    manifest, files = read_checkpoint(source, None, source_options)

    def same_manifest(written: dict[str, FileEntry]) -> Manifest:
        if written == manifest.files:
            return manifest
        # An older checkpoint lists sha256 digests; the copy lists what writers record now, of the same bytes.
        sizes = {name: entry.size for name, entry in written.items()}
        if sizes != {name: entry.size for name, entry in manifest.files.items()} or any(
            written[n].algorithm == e.algorithm for n, e in manifest.files.items()
        ):
            raise CheckpointWriteError(f"Could not copy checkpoint {source} to {destination}: the copy differs")
        return dataclasses.replace(manifest, files=written)

    return commit_checkpoint(destination, files, same_manifest, destination_options, replace=replace)
