"""The local commit protocol: write and fsync into a hidden temporary sibling, then rename it into place."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import stat
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor

from fsspec.implementations.local import LocalFileSystem

from ..format.digests import DEFAULT_ALGORITHM, digest_hex, file_digest
from ..format.files import FileContent
from ..format.manifest import MANIFEST, MAX_MANIFEST_BYTES, FileEntry, Manifest
from ..format.strict_json import CheckpointFormatError
from .fs import storage_errors
from .protocol import CommitProtocol, MakeManifest, refuse_to_replace, saved_concurrently

#: Hidden local entries of a write in progress, or what an interrupted one left: ``.<name>.tmp-<uuid>``
#: (being written) and ``.<name>.deleting-<uuid>`` (being deleted). Readers skip them; ``gc`` sweeps old ones.
TEMP_ENTRY = re.compile(r"\..+\.(tmp|deleting)-[0-9a-f]{32}")


class LocalRenameCommit(CommitProtocol):
    """Checkpoints on a local disk: every file and the manifest are fsynced in a hidden sibling, which is
    renamed into place in one atomic step (an existing checkpoint is swapped out by ``RENAME_EXCHANGE``)."""

    def commit(
        self, uri: str, path: str, files: Mapping[str, FileContent], make_manifest: MakeManifest, replace: bool
    ) -> Manifest:
        """See :meth:`CommitProtocol.commit`.

        Each file is hashed and fsynced in a worker thread while the next one is written (sha256 and fsync
        release the GIL), so a save costs little more than writing its bytes once.

        Args:
            uri: the checkpoint's URI, for error messages.
            path: the local checkpoint directory.
            files: the contents of every file but the manifest, by file name.
            make_manifest: builds the manifest from the size and sha256 of each written file.
            replace: swap out a committed checkpoint at ``path``.

        Returns:
            The manifest written.

        Raises:
            FileExistsError: without ``replace``, another writer committed ``path`` meanwhile.
            CheckpointWriteError: the disk failed; the temporary directory is removed.
        """
        parent, name = os.path.split(path)
        tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex}")
        try:
            with (
                storage_errors("write checkpoint", uri),
                ThreadPoolExecutor(4, thread_name_prefix="lora-ckpt-sync") as pool,
            ):
                os.makedirs(parent, exist_ok=True)
                os.mkdir(tmp)
                digests: dict[str, Future[str]] = {}
                synced = []
                for fname, content in files.items():
                    target = os.path.join(tmp, fname)
                    if isinstance(content, (bytes, memoryview)):
                        _write_file(target, content)
                        digests[fname] = pool.submit(digest_hex, content)
                    else:
                        content.write(target)
                        digests[fname] = pool.submit(lambda t: file_digest(t)[1], target)
                    synced.append(pool.submit(fsync_path, target))
                entries = {
                    fname: FileEntry(os.path.getsize(os.path.join(tmp, fname)), digest.result(), DEFAULT_ALGORITHM)
                    for fname, digest in digests.items()
                }
                for future in synced:
                    future.result()
            manifest = make_manifest(entries)
            with storage_errors("write checkpoint", uri):
                _write_file(os.path.join(tmp, MANIFEST), manifest.to_json())
                fsync_path(os.path.join(tmp, MANIFEST))
                fsync_path(tmp)
                with _locked(parent):  # no metadata update, deletion or other commit of this kind runs meanwhile
                    current = self.read_manifest(uri, path)
                    if current is not None:
                        if not replace:
                            raise saved_concurrently(uri)
                        refuse_to_replace(uri, current[0])
                    install_dir(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                remove_local_dir(tmp)
            raise
        return manifest

    def read_document(self, path: str, limit: int) -> tuple[bytes, str] | None:
        """See :meth:`CommitProtocol.read_document`; the version is the sha256 of the bytes.

        Args:
            path: the local file.
            limit: the most bytes a valid one has.

        Returns:
            Its first ``limit + 1`` bytes and their sha256, or None if there is no such file.

        Raises:
            CheckpointFormatError: it is not a regular file (a FIFO, a device or a directory).
        """
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the reader
        except (FileNotFoundError, NotADirectoryError):
            return None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise CheckpointFormatError(f"{path} is not a regular file; refusing to read it")
            raw = f.read(limit + 1)
        return raw, digest_hex(raw, "sha256")

    def write_document(self, path: str, data: bytes, version: str | None, limit: int) -> bool:
        return self._swap(os.path.dirname(path), path, data, version, limit)

    def replace_manifest(self, path: str, manifest: Manifest, version: str, previous: Manifest | None = None) -> bool:
        manifest_path = os.path.join(path, MANIFEST)
        return self._swap(os.path.dirname(path), manifest_path, manifest.to_json(), version, MAX_MANIFEST_BYTES)

    def _swap(self, lock: str, path: str, data: bytes, version: str | None, limit: int) -> bool:
        """Replace the file at ``path`` (fsynced, renamed into place) if it is at ``version``, holding ``lock``'s
        lock (a checkpoint's manifest: its kind folder, which commits and deletions hold too)."""
        made_folder = not os.path.isdir(os.path.dirname(path))
        with _locked(lock):
            current = self.read_document(path, limit)
            if (current[1] if current else None) != version:
                return False
            replace_file(path, data)
            if current is None:  # a new entry (and a folder made for it) survives a crash with what it describes
                fsync_path(os.path.dirname(path))
                if made_folder:
                    fsync_path(os.path.dirname(os.path.dirname(path)))
        return True

    def delete(self, path: str, version: str | None) -> bool:
        trash = None
        with _locked(os.path.dirname(path)):
            current = self._version(path)
            if version is not None and current is None:
                return True  # deleted meanwhile
            if current != version:
                return False
            if os.path.lexists(path):
                trash = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.deleting-{uuid.uuid4().hex}")
                os.rename(path, trash)  # gone from listings at once; the files are removed outside the lock
        if trash:
            LocalFileSystem().rm(trash, recursive=True)
        return True

    def _version(self, path: str) -> str | None:
        current = self.read_manifest(path, path)
        return current[1] if current else None

    def remove_leftover(self, unit: str, members: list[str]) -> None:
        """Rename the temporary entry away, then delete it: a save committing it at that moment either wins
        (and is not touched) or fails with an error, never half-deleted after its commit.

        Args:
            unit: the hidden temporary entry.
            members: its listed entries (unused: the whole entry goes).

        Raises:
            FileNotFoundError: it is already gone.
        """
        remove_local_dir(unit)

    def check_member(self, uri: str, path: str, name: str) -> None:
        """Refuse a link leading out of the checkpoint directory, a FIFO or a device.

        Args:
            uri: the checkpoint's URI, for the message.
            path: the local checkpoint directory.
            name: the file's name.

        Raises:
            CheckpointFormatError: naming the checkpoint and the file.
        """
        target = os.path.realpath(os.path.join(path, name))
        if os.path.dirname(target) != os.path.realpath(path):
            raise CheckpointFormatError(
                f"Checkpoint {uri} is unsafe: {name} is a link to {target}, outside the checkpoint directory; "
                "refusing to read it"
            )
        if os.path.exists(target) and not os.path.isfile(target):
            raise CheckpointFormatError(
                f"Checkpoint {uri} is unsafe: {name} is not a regular file; refusing to read it"
            )


def replace_file(path: str, data: bytes) -> None:
    """Write a local file by writing and fsyncing a hidden sibling and renaming it over ``path``.

    Args:
        path: the file to write or replace.
        data: its new bytes.

    Raises:
        OSError: the write or rename failed; the sibling is removed and ``path`` is unchanged.
    """
    parent, name = os.path.split(path)
    tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write_file(path: str, data: bytes | memoryview) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    renameat2 = getattr(_LIBC, "renameat2", None) if _LIBC else None
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EXDEV):  # no such call, or not on this filesystem
        return False
    raise OSError(code, os.strerror(code), a, None, b)


def install_dir(tmp: str, path: str) -> None:
    """Rename the finished local directory ``tmp`` to ``path``.

    Whatever is at ``path`` (a leftover, or what is being replaced) is swapped out in the same atomic step
    where the kernel can (Linux ``RENAME_EXCHANGE``), else renamed away just before; then it is deleted.
    A concurrent writer creating or replacing ``path`` meanwhile only makes it try again: the last one wins.

    Args:
        tmp: the finished directory (a sibling of ``path``, on the same filesystem).
        path: where it goes.

    Raises:
        OSError: a rename failed for another reason than a concurrent writer.
    """
    parent, name = os.path.split(path)
    while True:
        previous = None
        try:
            if os.path.exists(path) and _exchange(tmp, path):
                previous = tmp  # now holds what was replaced
            else:
                if os.path.exists(path):
                    previous = os.path.join(parent, f".{name}.deleting-{uuid.uuid4().hex}")
                    os.rename(path, previous)
                os.rename(tmp, path)
            break
        except OSError as err:  # path appeared (ENOTEMPTY, EEXIST) or vanished (ENOENT) since the check
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT) or not os.path.isdir(tmp):
                raise
    fsync_path(parent)
    if previous:
        with contextlib.suppress(FileNotFoundError):  # gc(incomplete_after=0) may have swept it already
            LocalFileSystem().rm(previous, recursive=True)


@contextlib.contextmanager
def _locked(directory: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on a local directory (the kind folder holding a checkpoint) in the block.

    Every commit, metadata update and deletion of a checkpoint takes the lock of its parent, so each is one
    step against the others (readers take none). Filesystems without ``flock`` (some network mounts) run
    the block unlocked.
    """
    os.makedirs(directory, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with contextlib.suppress(OSError):  # ENOLCK / EOPNOTSUPP: no locks here
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def apply_umask(directory: str) -> None:
    """Give a finished directory (made private by ``tempfile.mkdtemp``) and its files the permissions the user's
    umask gives new files, so that another account (an inference server) can read what was written."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(directory, 0o777 & ~mask)
    for name in os.listdir(directory):
        os.chmod(os.path.join(directory, name), 0o666 & ~mask)


def remove_local_dir(path: str) -> None:
    """Delete a local file or directory by renaming it to a hidden ``.deleting-`` sibling first.

    The rename is atomic: the entry vanishes from listings before its files do, and a concurrent rename of
    ``path`` (a commit) either happens first (then this raises ``FileNotFoundError``) or fails.

    Args:
        path: the local file or directory.

    Raises:
        FileNotFoundError: ``path`` does not exist (or was renamed away meanwhile).
    """
    trash = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.deleting-{uuid.uuid4().hex}")
    os.rename(path, trash)
    LocalFileSystem().rm(trash, recursive=True)


_LIBC = ctypes.CDLL(None, use_errno=True) if os.name == "posix" else None
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def fsync_path(path: str) -> None:
    """fsync a file or a directory (its entries) by path.

    Args:
        path: the local file or directory.

    Raises:
        OSError: it cannot be opened or synced.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
