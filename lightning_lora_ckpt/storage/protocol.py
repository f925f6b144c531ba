"""The commit protocol interface: how a checkpoint becomes visible, changes metadata and goes away.

One implementation per kind of filesystem (Orbax's ``path/atomicity.py`` is the model): a local
atomic rename (:class:`~.local.LocalRenameCommit`) and a manifest-last object-store upload
(:class:`~.object_store.ManifestLastCommit`). Either way a checkpoint exists only once its
``checkpoint.json`` does; :func:`~.commit.protocol_for` picks the implementation, the only place that
asks which filesystem it is.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping

import fsspec

from ..format.files import FileContent
from ..format.manifest import FileEntry, Manifest

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
            replace: replace a committed checkpoint at ``path`` (the caller has checked there is none otherwise).

        Returns:
            The manifest written.

        Raises:
            FileExistsError: without ``replace``, if another writer committed ``path`` meanwhile.
            CheckpointWriteError: the storage kept failing.
        """

    @abc.abstractmethod
    def write_manifest(self, path: str, manifest: Manifest) -> None:
        """Replace the manifest of a committed checkpoint (its mutable metadata) in one atomic step.

        Args:
            path: the checkpoint directory.
            manifest: the new manifest (same files, new metadata).
        """

    @abc.abstractmethod
    def delete(self, path: str) -> None:
        """Delete a checkpoint directory so that it is never seen half-deleted (nothing if it is absent).

        Args:
            path: the checkpoint directory.
        """

    @abc.abstractmethod
    def write_if_absent(self, path: str, data: bytes) -> None:
        """Write a small document (``run.json``) unless one already exists there.

        Args:
            path: the document's path.
            data: its bytes.
        """

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
