"""Committing, updating and deleting checkpoints by URI, through the commit protocol of their filesystem.

See :mod:`.protocol` for the protocol; this module resolves a URI to its filesystem and protocol, and
holds the one rule every backend shares: saving over a committed checkpoint needs ``replace``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any, Literal, overload

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ..format.files import FileContent
from ..format.index_entry import IndexEntry
from ..format.layout import join
from ..format.manifest import MANIFEST, Manifest
from ..format.strict_json import CheckpointFormatError, iso_time, utcnow
from .dependents import dependents as find_dependents
from .fs import CheckpointConflictError, storage_errors, url_to_fs
from .gcs import GCSManifestLastCommit
from .index import index_for
from .local import LocalRenameCommit
from .object_store import ManifestLastCommit
from .protocol import CommitProtocol, MakeManifest
from .s3 import S3ManifestLastCommit

log = logging.getLogger(__name__)

#: How many times an update or deletion re-reads a manifest that changed under it before giving up.
UPDATE_ATTEMPTS = 8
#: What deleting a snapshot that deltas need does: keep it (logged), refuse (raise), or delete the deltas first.
Dependents = Literal["keep", "refuse", "cascade"]


def protocol_for(fs: fsspec.AbstractFileSystem) -> CommitProtocol:
    """The commit protocol of a filesystem: local rename, S3 (tagged, conditional), GCS (conditional) or plain
    manifest-last.

    Args:
        fs: an fsspec filesystem.

    Returns:
        :class:`LocalRenameCommit` for a local disk, :class:`S3ManifestLastCommit` for S3,
        :class:`GCSManifestLastCommit` for GCS (gcsfs), else :class:`ManifestLastCommit`.
    """
    if isinstance(fs, LocalFileSystem):
        return LocalRenameCommit(fs)
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if "s3" in protocols:
        return S3ManifestLastCommit(fs)
    if "gs" in protocols or "gcs" in protocols:
        return GCSManifestLastCommit(fs)
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
    same_weights: bool = False,
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
        same_weights: the caller guarantees ``files`` stand for the same model directory as the checkpoint they
            replace (a compaction), so it may replace a snapshot that deltas need.

    Returns:
        The manifest written.

    Raises:
        FileExistsError: a checkpoint is committed at ``uri`` and ``replace`` is False.
        CheckpointConflictError: the checkpoint at ``uri`` is published (never replaced), or it is a snapshot that
            deltas need (replacing it would lose them).
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
    if exists and not same_weights:
        with storage_errors("write checkpoint", uri):
            current = protocol.read_manifest(uri, path)
        manifest = _parsed(uri, current[0]) if current else None
        needed = needed_reason(uri, manifest, storage_options, "keep", live_only=False) if manifest else None
        if needed:
            raise CheckpointConflictError(f"Cannot replace {uri}: {needed}; save under another name")
    with _indexed(protocol, path):
        return protocol.commit(uri, path, files, make_manifest, replace)


def _indexed(protocol: CommitProtocol, path: str) -> contextlib.AbstractContextManager[None]:
    """The listing index's intent-change-settle around a change of the checkpoint at ``path`` (see :mod:`.index`);
    nothing for a checkpoint folder outside the ``<run>/<kind>/<name>`` layout."""
    located = index_for(protocol, path)
    return located[0].change(located[1]) if located is not None else contextlib.nullcontext()


@overload
def update_manifest(
    uri: str,
    change: Callable[[Manifest], Manifest],
    storage_options: Mapping[str, Any] | None = None,
    missing_ok: Literal[False] = False,
) -> Manifest: ...


@overload
def update_manifest(
    uri: str, change: Callable[[Manifest], Manifest], storage_options: Mapping[str, Any] | None, missing_ok: bool
) -> Manifest | None: ...


def update_manifest(
    uri: str,
    change: Callable[[Manifest], Manifest],
    storage_options: Mapping[str, Any] | None = None,
    missing_ok: bool = False,
) -> Manifest | None:
    """Change the mutable metadata of a committed checkpoint: read its manifest, apply ``change``, and write
    the result only if the manifest is still the one read (else read it again and retry).

    Two updates racing both take effect, in some order; an update racing a deletion fails instead of
    bringing the deleted checkpoint back; one racing an overwrite applies to the new checkpoint.

    Args:
        uri: the checkpoint directory's URI.
        change: makes the new manifest from the current one (may raise to refuse, e.g. "already public"); the
            manifest it was given, returned as is, means there is nothing to write.
        storage_options: fsspec options of the filesystem.
        missing_ok: return None, rather than raise, if there is no checkpoint at ``uri``.

    Returns:
        The manifest written (or left as it was); None if there is none and ``missing_ok``.

    Raises:
        CheckpointFormatError: there is no committed checkpoint at ``uri``, or its manifest is invalid.
        CheckpointConflictError: the manifest kept changing under ``UPDATE_ATTEMPTS`` tries.
        CheckpointWriteError: the storage kept failing.
    """
    protocol, path = open_protocol(uri, storage_options)
    for _ in range(UPDATE_ATTEMPTS):
        with storage_errors("update checkpoint", uri):
            current = protocol.read_manifest(uri, path)
        if current is None:
            if missing_ok:
                return None
            raise CheckpointFormatError(f"No checkpoint at {uri}: {MANIFEST} is missing (deleted, or never committed)")
        raw, version = current
        manifest = Manifest.from_json(raw, join(uri, MANIFEST))
        updated = change(manifest)
        if updated is manifest:
            return manifest
        with storage_errors("update checkpoint", uri), _indexed(protocol, path):
            if protocol.replace_manifest(path, updated, version, previous=manifest):
                return updated
    raise CheckpointConflictError(f"Checkpoint {uri} kept changing while it was updated; try again")


def delete_checkpoint(
    uri: str,
    storage_options: Mapping[str, Any] | None = None,
    keep: Callable[[Manifest], str | None] | None = None,
    dependents: Dependents = "keep",
) -> Manifest | None:
    """Delete the checkpoint directory at ``uri`` so that it is never seen half-deleted.

    ``keep`` is judged on the manifest current at the moment of the deletion (compare-and-swap): a
    checkpoint published, pinned or given a new TTL since the caller looked at it is kept. So is a snapshot that
    delta snapshots need (soft-deleted ones too: they may be restored), as ``dependents`` says.

    Args:
        uri: the checkpoint directory's URI.
        storage_options: fsspec options of the filesystem.
        keep: returns why the checkpoint must stay (None: delete it); not called for a folder without a manifest.
        dependents: what to do if deltas need the checkpoint: ``"keep"`` it (logged), ``"refuse"`` (raise), or
            ``"cascade"``: delete them first (each judged by ``keep`` too), then it.

    Returns:
        The manifest of the deleted checkpoint; None if there was none (what was there is removed) or
        ``keep`` kept it (logged with its reason).

    Raises:
        CheckpointConflictError: the manifest kept changing under ``UPDATE_ATTEMPTS`` tries, or deltas need the
            checkpoint and ``dependents`` is ``"refuse"``.
        CheckpointWriteError: the storage kept failing.
    """
    protocol, path = open_protocol(uri, storage_options)
    with storage_errors("delete checkpoint", uri):
        for _ in range(UPDATE_ATTEMPTS):
            current = protocol.read_manifest(uri, path)
            version = current[1] if current else None
            manifest = _parsed(uri, current[0]) if current else None
            reason = keep(manifest) if keep is not None and manifest is not None else None
            if reason is None and manifest is not None:
                reason = needed_reason(uri, manifest, storage_options, dependents, live_only=False, keep=keep)
            if reason is not None:
                log.warning("Not deleting checkpoint %s: %s", uri, reason)
                return None
            with _indexed(protocol, path):
                deleted = protocol.delete(path, version)
            if deleted:
                return manifest
    raise CheckpointConflictError(f"Checkpoint {uri} kept changing while it was deleted; try again")


def needed_reason(
    uri: str,
    manifest: Manifest,
    storage_options: Mapping[str, Any] | None,
    dependents: Dependents = "keep",
    live_only: bool = False,
    keep: Callable[[Manifest], str | None] | None = None,
) -> str | None:
    """Why the snapshot at ``uri`` must stay for the deltas that need it, or None (no deltas, or not a snapshot).

    Args:
        uri: the checkpoint directory's URI.
        manifest: its current manifest.
        storage_options: fsspec options of the filesystem.
        dependents: ``"keep"`` (return the reason), ``"refuse"`` (raise it) or ``"cascade"`` (delete the deltas,
            each judged by ``keep``, then look again).
        live_only: count only deltas that are not soft-deleted (a soft delete of the parent: its files stay).
        keep: what judges each delta a cascade deletes.

    Returns:
        The reason, naming the deltas, or None.

    Raises:
        CheckpointConflictError: deltas need it and ``dependents`` is ``"refuse"``.
    """
    if manifest.snapshot is None:  # only snapshots have dependents: no listing on every other deletion
        return None
    protocol, path = open_protocol(uri, storage_options)
    with storage_errors("list checkpoints", uri):
        found = [
            d for d in find_dependents(protocol, uri, path, manifest) if not live_only or not d.manifest.deleted_at
        ]
        if found and dependents == "cascade":
            for link in found:
                delete_checkpoint(link.uri, storage_options, keep, "cascade")
            found = find_dependents(protocol, uri, path, manifest)
    if not found:
        return None
    reason = (
        f"delta snapshot(s) {sorted(link.manifest.name for link in found)[:5]} need it (rebuilt from it); delete "
        "them first, compact them into bases (lightning-lora-ckpt compact URI), or delete with cascade"
    )
    if dependents == "refuse":
        raise CheckpointConflictError(f"Cannot delete {uri}: {reason}")
    return reason


def _parsed(uri: str, raw: bytes) -> Manifest | None:
    """The manifest in ``raw``, or None if it is not a valid one (a damaged checkpoint may still be deleted)."""
    try:
        return Manifest.from_json(raw, join(uri, MANIFEST))
    except CheckpointFormatError:
        return None


def protected_reason(manifest: Manifest | IndexEntry) -> str | None:
    """Why nothing but an explicit ``delete`` ever removes this checkpoint: it is published or pinned.

    Args:
        manifest: the checkpoint's current manifest (or its listing entry).

    Returns:
        The reason, for a log line, or None.
    """
    if manifest.public:
        return "it is published"
    if manifest.pinned:
        return "it is pinned"
    return None


def retire_checkpoint(
    uri: str,
    storage_options: Mapping[str, Any] | None = None,
    keep: Callable[[Manifest], str | None] | None = None,
) -> Manifest | None:
    """Soft-delete the checkpoint at ``uri``: set its manifest's ``deleted_at`` to now (compare-and-swap).

    Its files stay as they are; it is no longer listed, resumed from or returned by
    ``CheckpointStore.get``, until ``CheckpointStore.restore`` clears the mark or ``CheckpointStore.gc``
    purges it after the grace period. This is how retention policies delete. A snapshot that a live (not
    soft-deleted) delta needs is kept.

    A published or pinned checkpoint is never retired, and ``keep`` is asked too, both on the manifest
    current at the moment of the write: one published, pinned or otherwise changed since the caller looked
    at it is judged on what it is now (kept ones are logged with the reason).

    Args:
        uri: the checkpoint directory's URI.
        storage_options: fsspec options of the filesystem.
        keep: returns why the checkpoint must stay (None: retire it).

    Returns:
        The manifest with ``deleted_at`` set (the one written, or the current one if it was already retired:
        its deletion time is not moved); None if it was kept, or there is no checkpoint at ``uri`` (deleted
        meanwhile).

    Raises:
        CheckpointFormatError: its manifest is invalid.
        CheckpointConflictError: the manifest kept changing under ``UPDATE_ATTEMPTS`` tries.
        CheckpointWriteError: the storage kept failing.
    """
    kept: list[str] = []

    def retire(manifest: Manifest) -> Manifest:
        kept.clear()  # judged again on each manifest read
        if manifest.deleted_at is not None:
            return manifest
        reason = (
            (keep(manifest) if keep is not None else None)
            or protected_reason(manifest)
            or needed_reason(uri, manifest, storage_options, "keep", live_only=True)
        )
        if reason is not None:
            kept.append(reason)
            return manifest
        return dataclasses.replace(manifest, deleted_at=utcnow())

    retired = update_manifest(uri, retire, storage_options, missing_ok=True)
    if retired is None:
        log.info("Not deleting checkpoint %s: it is gone already", uri)
    elif kept:
        log.warning("Not deleting checkpoint %s: %s", uri, kept[0])
        return None
    return retired


def restore_checkpoint(uri: str, storage_options: Mapping[str, Any] | None = None) -> Manifest:
    """Bring back a soft-deleted checkpoint (:func:`retire_checkpoint`): clear ``deleted_at`` (compare-and-swap).

    Only the manifest's mutable part changes; the checksummed files were never touched, so the checkpoint is
    bit-identical to what was retired.

    Args:
        uri: the checkpoint directory's URI.
        storage_options: fsspec options of the filesystem.

    Returns:
        The manifest written.

    Raises:
        CheckpointFormatError: there is no checkpoint at ``uri`` (purged by ``gc`` after its grace period,
            deleted, or never committed), or its manifest is invalid.
        CheckpointConflictError: it is not soft-deleted, or its manifest kept changing.
        CheckpointWriteError: the storage kept failing.
    """

    def undelete(manifest: Manifest) -> Manifest:
        if manifest.deleted_at is None:
            raise CheckpointConflictError(f"Checkpoint {uri} is not deleted; there is nothing to restore")
        return dataclasses.replace(manifest, deleted_at=None)

    protocol, path = open_protocol(uri, storage_options)
    with storage_errors("restore checkpoint", uri):
        exists = protocol.read_manifest(uri, path) is not None
    if not exists:
        raise CheckpointFormatError(
            f"Nothing to restore at {uri}: no checkpoint is there (purged by gc after its grace period, deleted, "
            "or never committed)"
        )
    return update_manifest(uri, undelete, storage_options)


def deleted_error(uri: str, manifest: Manifest) -> CheckpointFormatError:
    """The error for a soft-deleted checkpoint asked for as if it were there.

    Args:
        uri: the checkpoint's URI.
        manifest: its manifest (``deleted_at`` set).

    Returns:
        A :class:`CheckpointFormatError` saying when it was deleted and how to restore it.
    """
    when = iso_time(manifest.deleted_at) if manifest.deleted_at else "?"
    return CheckpointFormatError(
        f"Checkpoint {uri} was deleted at {when} (a soft delete, by prune or a retention policy): it is hidden from "
        f"listings and resume, and gc purges it once the grace period has passed; restore it with "
        f"`lightning-lora-ckpt restore {uri}` (CheckpointStore.restore)"
    )


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
