"""Committing, updating and deleting checkpoints by URI, through the commit protocol of their filesystem.

See :mod:`.protocol` for the protocol; this module resolves a URI to its filesystem and protocol, and
holds the one rule every backend shares: saving over a committed checkpoint needs ``replace``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ..format.files import FileContent
from ..format.layout import join
from ..format.manifest import MANIFEST, MAX_MANIFEST_BYTES, Manifest
from ..format.strict_json import CheckpointFormatError
from .fs import CheckpointConflictError, storage_errors, url_to_fs
from .local import LocalRenameCommit
from .object_store import ManifestLastCommit, S3ManifestLastCommit
from .protocol import CommitProtocol, MakeManifest


def protocol_for(fs: fsspec.AbstractFileSystem) -> CommitProtocol:
    """The commit protocol of a filesystem: local rename, S3 (tagged, conditional) or plain manifest-last.

    Args:
        fs: an fsspec filesystem.

    Returns:
        :class:`LocalRenameCommit` for a local disk, :class:`S3ManifestLastCommit` for S3, else
        :class:`ManifestLastCommit`.
    """
    if isinstance(fs, LocalFileSystem):
        return LocalRenameCommit(fs)
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if "s3" in protocols:
        return S3ManifestLastCommit(fs)
    return ManifestLastCommit(fs)


def open_protocol(uri: str, storage_options: Mapping[str, Any] | None = None) -> tuple[CommitProtocol, str]:
    """The commit protocol of ``uri``'s filesystem and the path of ``uri`` in it.

    Args:
        uri: any fsspec URI or local path.
        storage_options: fsspec options of the filesystem.

    Returns:
        The protocol and the path.
    """
    fs, path = url_to_fs(uri, storage_options)
    return protocol_for(fs), path


def commit_checkpoint(
    uri: str,
    files: Mapping[str, FileContent],
    make_manifest: MakeManifest,
    storage_options: Mapping[str, Any] | None = None,
    replace: bool = False,
) -> Manifest:
    """Write ``files`` and then the manifest built from their checksums as the checkpoint at ``uri``.

    A committed checkpoint at ``uri`` is an error unless ``replace``, also one committed by another writer
    while this one was writing. Leftovers of an interrupted save at ``uri`` are replaced.

    Args:
        uri: the checkpoint directory's URI.
        files: the contents of every file but the manifest, by file name, in write order.
        make_manifest: builds the manifest from the size and sha256 of each written file.
        storage_options: fsspec options of the filesystem.
        replace: replace a committed checkpoint at ``uri``.

    Returns:
        The manifest written.

    Raises:
        FileExistsError: a checkpoint is committed at ``uri`` and ``replace`` is False.
        CheckpointConflictError: the checkpoint at ``uri`` is published (never replaced).
        CheckpointWriteError: the storage kept failing.
    """
    protocol, path = open_protocol(uri, storage_options)
    with storage_errors("write checkpoint", uri):
        exists = protocol.fs.exists(join(path, MANIFEST))
    if exists and not replace:
        raise FileExistsError(
            f"A checkpoint already exists at {uri}; delete it first, save under another name, "
            "or pass storage_options={'overwrite': True} to replace it"
        )
    if exists:
        _refuse_to_replace_published(protocol, uri, path)
    return protocol.commit(uri, path, files, make_manifest, replace)


def _refuse_to_replace_published(protocol: CommitProtocol, uri: str, path: str) -> None:
    """A published checkpoint is never replaced: raise :class:`CheckpointConflictError` naming it.

    A manifest that cannot be read is no published checkpoint: it may be replaced.
    """
    try:
        raw = protocol.fs.cat_file(join(path, MANIFEST), start=0, end=MAX_MANIFEST_BYTES + 1)
        public = Manifest.from_json(raw, join(uri, MANIFEST)).public
    except (FileNotFoundError, CheckpointFormatError):
        return
    if public:
        raise CheckpointConflictError(
            f"Checkpoint {uri} is published and is never replaced; save under another name, or unpublish it "
            f"first (lightning-lora-ckpt unpublish {uri})"
        )


def write_manifest(uri: str, manifest: Manifest, storage_options: Mapping[str, Any] | None = None) -> None:
    """Replace the manifest of a committed checkpoint (its mutable metadata) in one atomic step.

    Args:
        uri: the checkpoint directory's URI.
        manifest: the new manifest (same files, new metadata).
        storage_options: fsspec options of the filesystem.
    """
    protocol, path = open_protocol(uri, storage_options)
    protocol.write_manifest(path, manifest)


def delete_checkpoint(uri: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Delete the checkpoint directory at ``uri`` so that it is never seen half-deleted.

    Args:
        uri: the checkpoint directory's URI.
        storage_options: fsspec options of the filesystem.

    Raises:
        CheckpointWriteError: the storage kept failing.
    """
    protocol, path = open_protocol(uri, storage_options)
    with storage_errors("delete checkpoint", uri):
        protocol.delete(path)


def write_if_absent(uri: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write a small JSON document (``run.json``) unless one already exists there.

    Args:
        uri: the document's URI.
        data: its bytes.
        storage_options: fsspec options of the filesystem.
    """
    protocol, path = open_protocol(uri, storage_options)
    protocol.write_if_absent(path, data)


def object_tags(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, dict[str, str]]:
    """The object tags of every file of a checkpoint, by file name (empty on filesystems without tags).

    Args:
        uri: the checkpoint directory's URI.
        storage_options: fsspec options of the filesystem.

    Returns:
        Each file's tags (e.g. ``{"lora-ckpt-ttl": "7d"}`` on S3), by file name.
    """
    protocol, path = open_protocol(uri, storage_options)
    return protocol.object_tags(path)
