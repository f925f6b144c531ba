"""The commit protocol interface: how a checkpoint becomes visible, changes metadata and goes away.

One implementation per kind of filesystem (Orbax's ``path/atomicity.py`` is the model): a local
atomic rename (:class:`~.local.LocalRenameCommit`) and a manifest-last object-store upload
(:class:`~.object_store.ManifestLastCommit`). Either way a checkpoint exists only once its
``checkpoint.json`` does; :func:`~.commit.protocol_for` picks the implementation, the only place that
asks which filesystem it is.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Mapping

import fsspec

from ..format.files import FileContent
from ..format.layout import join
from ..format.manifest import MANIFEST, MAX_MANIFEST_BYTES, FileEntry, Manifest
from ..format.strict_json import CheckpointFormatError
from .fs import CheckpointConflictError

#: Builds the manifest from the checksums of the written files.
MakeManifest = Callable[[dict[str, FileEntry]], Manifest]


class CommitProtocol(abc.ABC):
    """Writing, updating and deleting checkpoint directories on one fsspec filesystem.

    Args:
        fs: the filesystem; paths given to the methods are paths in it.
    """

    #: Whether saves write into the checkpoint's own folder, so that a folder without a manifest is
    #: what an interrupted save left (object stores); local saves rename whole folders into place.
    writes_in_place: bool = False

    def __init__(self, fs: fsspec.AbstractFileSystem) -> None:
        self.fs = fs

    @abc.abstractmethod
    def commit(
        self, uri: str, path: str, files: Mapping[str, FileContent], make_manifest: MakeManifest, replace: bool
    ) -> Manifest:
        """Write ``files``, then the manifest built from their checksums, as the checkpoint at ``path``.

        Args:
            uri: the checkpoint's URI, for error messages.
            path: the checkpoint directory in :attr:`fs`.
            files: the contents of every file but the manifest, by file name, in write order.
            make_manifest: builds the manifest from the size and sha256 of each written file.
            replace: replace a committed checkpoint at ``path`` unless it is published (the caller has checked
                there is none otherwise).

        Returns:
            The manifest written.

        Raises:
            FileExistsError: without ``replace``, if another writer committed ``path`` meanwhile; on object
                stores also if another writer's objects replaced this one's while it was writing.
            CheckpointConflictError: the checkpoint being replaced is published (checked with
                :func:`refuse_to_replace` at the moment of the replacement).
            CheckpointWriteError: the storage kept failing.
        """

    def read_manifest(self, uri: str, path: str) -> tuple[bytes, str] | None:
        """The manifest's bytes (at most ``MAX_MANIFEST_BYTES + 1``) and its version, or None if it has none.

        The version is what :meth:`replace_manifest` and :meth:`delete` compare against: an S3 ETag, a GCS
        generation, or a digest of the bytes where the storage has neither.

        Args:
            uri: the checkpoint's URI, for error messages.
            path: the checkpoint directory.

        Returns:
            The bytes and the version, or None if no manifest is there.

        Raises:
            CheckpointFormatError: the manifest is unsafe to read (a link out of the directory, a FIFO).
        """
        self.check_member(uri, path, MANIFEST)
        return self.read_document(join(path, MANIFEST), MAX_MANIFEST_BYTES)

    def replace_manifest(self, path: str, manifest: Manifest, version: str, previous: Manifest | None = None) -> bool:
        """Replace the manifest of a committed checkpoint (its mutable metadata), if it is still at ``version``.

        Compare-and-swap: two updates racing never lose one another's change, and an update racing a
        deletion or an overwrite never writes into what replaced the checkpoint it read.

        Args:
            path: the checkpoint directory.
            manifest: the new manifest (same files, new metadata).
            version: the version :meth:`read_manifest` returned for the manifest ``manifest`` was made from.
            previous: that manifest, if the caller has it (S3 then re-tags objects only if their tag changes).

        Returns:
            Whether it was replaced; False if the manifest changed or vanished since it was read.
        """
        return self.write_document(join(path, MANIFEST), manifest.to_json(), version, MAX_MANIFEST_BYTES)

    @abc.abstractmethod
    def delete(self, path: str, version: str | None) -> bool:
        """Delete a checkpoint directory, if its manifest is still at ``version``, so that it is never seen
        half-deleted: the manifest goes first (or the whole directory in one rename).

        Args:
            path: the checkpoint directory.
            version: the manifest's version as read, or None for a directory without a manifest (leftovers).

        Returns:
            Whether it was deleted (True also if it was already gone); False if the manifest changed since.
        """

    @abc.abstractmethod
    def read_document(self, path: str, limit: int) -> tuple[bytes, str] | None:
        """A small document's bytes (at most ``limit + 1``) and its version, or None if there is none.

        Args:
            path: the document's path.
            limit: the most bytes a valid one has (one more is read, so that a larger one is recognised).

        Returns:
            The bytes and the version (what :meth:`write_document` compares against), or None.

        Raises:
            CheckpointFormatError: the document is unsafe to read (locally: a link or not a regular file).
        """

    @abc.abstractmethod
    def write_document(self, path: str, data: bytes, version: str | None, limit: int) -> bool:
        """Write a small document if it is still at ``version`` (None: only if there is none): compare-and-swap.

        Args:
            path: the document's path.
            data: its new bytes.
            version: the version :meth:`read_document` returned, or None to create it.
            limit: the ``limit`` that read was given (where the version is a digest of the bytes read).

        Returns:
            Whether it was written; False if another writer changed, created or deleted it since.
        """

    def write_if_absent(self, path: str, data: bytes) -> None:
        """Write a small document (``run.json``) unless one already exists there: of racing writers, the first
        one's stays.

        Args:
            path: the document's path.
            data: its bytes.
        """
        self.write_document(path, data, None, len(data))

    @abc.abstractmethod
    def remove_leftover(self, unit: str, members: list[str]) -> None:
        """Remove what an interrupted write left at ``unit`` (``members``: its listed entries).

        Args:
            unit: the leftover's path (a hidden temporary entry, or a checkpoint folder without a manifest).
            members: the entries listed under it.

        Raises:
            FileNotFoundError: it is already gone.
        """

    def check_member(self, uri: str, path: str, name: str) -> None:  # noqa: B027 (a default: nothing to check)
        """Refuse to read file ``name`` of the checkpoint unless it is a regular file inside it.

        Object stores have no links or special files: nothing to check.

        Args:
            uri: the checkpoint's URI, for error messages.
            path: the checkpoint directory.
            name: the file's name.

        Raises:
            CheckpointFormatError: the file is unsafe to read (local disks only).
        """

    def object_tags(self, path: str) -> dict[str, dict[str, str]]:
        """The object tags of every file of a checkpoint (filesystems without tags: none).

        Args:
            path: the checkpoint directory.

        Returns:
            Each file's tags, by file name.
        """
        return {}

    def now(self, root: str) -> float:
        """The storage's current time (seconds since the epoch), which ages of listed files are compared with.

        Args:
            root: a folder of the store that may be written to (object stores ask their server).

        Returns:
            The time.
        """
        return time.time()


def saved_concurrently(uri: str) -> FileExistsError:
    """The error of a save that found its name committed by another writer while it was writing.

    Args:
        uri: the checkpoint's URI.

    Returns:
        The error, for the caller to raise.
    """
    return FileExistsError(
        f"A checkpoint was saved at {uri} by another writer while this one was being written; "
        "save under another name, or pass overwrite=True to replace it"
    )


def refuse_to_replace(uri: str, raw: bytes) -> None:
    """A published or pinned checkpoint is never replaced: raise naming it (called with its current manifest's
    bytes, at the point where each protocol replaces atomically).

    A manifest that cannot be parsed is no published checkpoint: it may be replaced.

    Args:
        uri: the checkpoint's URI.
        raw: the bytes of its manifest.

    Raises:
        CheckpointConflictError: it is published or pinned.
    """
    try:
        manifest = Manifest.from_json(raw, join(uri, MANIFEST))
    except CheckpointFormatError:
        return
    if manifest.public:
        raise CheckpointConflictError(
            f"Checkpoint {uri} is published and is never replaced; save under another name, or unpublish it "
            f"first (lightning-lora-ckpt unpublish {uri})"
        )
    if manifest.pinned:
        raise CheckpointConflictError(
            f"Checkpoint {uri} is pinned and is never replaced; save under another name, or unpin it "
            f"first (lightning-lora-ckpt unpin {uri})"
        )
