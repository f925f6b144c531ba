"""Compacting a delta snapshot into a base (``CheckpointStore.compact``): its weights rebuilt and written whole.

The checkpoint keeps its name, metadata and full weight files (the same bytes, so the deltas that name it as their
parent still rebuild from it), and stops needing its own parent, which may then be deleted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ..format.manifest import FileEntry, Manifest
from ..format.strict_json import CheckpointFormatError
from .chain import rebuild_weights
from .commit import commit_checkpoint
from .fs import CheckpointConflictError
from .read import read_checkpoint


def compact(uri: str, storage_options: Mapping[str, Any] | None = None) -> Manifest:
    """Rewrite the delta snapshot at ``uri`` as a base, atomically, with the same full weights.

    Args:
        uri: the checkpoint directory's URI (not a ``lora://`` URI: resolve it first).
        storage_options: fsspec options of the filesystem.

    Returns:
        The manifest written (``snapshot: "base"``).

    Raises:
        CheckpointConflictError: the checkpoint is not a delta snapshot, or it is published or pinned (never
            replaced: unpublish or unpin it first).
        CheckpointFormatError: it is missing or damaged, or its chain is refused (``storage.chain``).
        CheckpointWriteError: the storage kept failing.
    """
    manifest, files = read_checkpoint(uri, storage_options=storage_options)
    if manifest.snapshot != "delta":
        raise CheckpointConflictError(f"Checkpoint {uri} is not a delta snapshot (its weights are whole already)")
    full = rebuild_weights(uri, manifest, files, storage_options)
    base = manifest.as_base()

    def make_manifest(written: dict[str, FileEntry]) -> Manifest:
        sizes = {name: entry.size for name, entry in written.items()}
        if sizes != {name: entry.size for name, entry in base.files.items()}:
            raise CheckpointFormatError(f"Compacting {uri} wrote other files than the ones its weights rebuild")
        return dataclasses.replace(base, files=written)

    return commit_checkpoint(uri, full, make_manifest, storage_options, replace=True, same_weights=True)
