"""Copying checkpoints out of the store: verified download, ``.tar`` archives and their safe extraction."""

from __future__ import annotations

import contextlib
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fsspec.callbacks import Callback
from fsspec.implementations.local import LocalFileSystem

from ..format.digests import file_digest
from ..format.layout import join
from ..format.manifest import MANIFEST, MAX_MANIFEST_BYTES, Manifest
from ..format.strict_json import CheckpointFormatError
from .chain import rebuild_weights
from .commit import open_protocol
from .fs import url_to_fs
from .local import apply_umask
from .read import check_file, read_checkpoint, read_manifest

#: Called with (file name, bytes done, bytes total) while downloading.
Progress = Callable[[str, int, int], None]
#: The most bytes ``extract_archive`` writes by default (all members together).
MAX_EXTRACT_BYTES = 64 << 30
#: The most members an archive may hold (a checkpoint has five files).
MAX_EXTRACT_MEMBERS = 1000


def download(
    uri: str,
    output_dir: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
) -> str:
    """Copy a checkpoint's files into a local ``output_dir``, verifying each; returns the directory.

    Files are written into a temporary sibling that is renamed into place once all are verified. A delta snapshot
    is written as a base: its weights rebuilt through its chain (``storage.chain``), its manifest listing them
    whole, so the copy stands alone.

    Args:
        uri: the checkpoint directory's URI (not a ``lora://`` URI: resolve it first).
        output_dir: a local directory that is absent or empty.
        storage_options: fsspec options of the checkpoint's filesystem.
        progress: called with (file name, bytes done, bytes total) while downloading.

    Returns:
        The absolute path of ``output_dir``.

    Raises:
        FileExistsError: ``output_dir`` exists and is not empty.
        CheckpointFormatError: there is no checkpoint at ``uri``, or a file is missing, unsafe or differs
            from the manifest; nothing is left at ``output_dir``.
    """
    manifest = read_manifest(uri, storage_options)
    target = os.path.abspath(output_dir)
    if os.path.exists(target) and os.listdir(target):
        raise FileExistsError(f"{target} exists and is not empty; choose an empty or new output directory")
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.download-", dir=parent)
    try:
        if manifest.snapshot == "delta":
            _write_rebuilt(uri, staging, storage_options, progress)
        else:
            _get_verified(uri, manifest, staging, storage_options, progress)
        if os.path.exists(target):
            os.rmdir(target)
        apply_umask(staging)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _write_rebuilt(
    uri: str, staging: str, storage_options: Mapping[str, Any] | None, progress: Progress | None
) -> None:
    """Write a delta snapshot's full model directory and its manifest as a base into ``staging``."""
    manifest, files = read_checkpoint(uri, storage_options=storage_options)
    files = rebuild_weights(uri, manifest, files, storage_options)
    for name, data in [*files.items(), (MANIFEST, manifest.as_base().to_json())]:
        with open(os.path.join(staging, name), "wb") as f:
            f.write(data)
        if progress:
            progress(name, len(data), len(data))


def _get_verified(
    uri: str, manifest: Manifest, staging: str, storage_options: Mapping[str, Any] | None, progress: Progress | None
) -> None:
    """Copy a checkpoint's stored files and manifest into ``staging`` and check each against the manifest."""
    protocol, path = open_protocol(uri, storage_options)
    fs = protocol.fs
    names = [*manifest.files, MANIFEST]
    for name in names:
        protocol.check_member(uri, path, name)
    # One concurrent transfer, as a plain fs.get would do; then every file is checked locally.
    fs.get(
        [join(path, n) for n in names],
        [os.path.join(staging, n) for n in names],
        callback=_ProgressCallback(progress),
    )
    names = list(manifest.files)
    with ThreadPoolExecutor() as pool:  # the hashes release the GIL: hash the files in parallel
        digests = pool.map(lambda n: file_digest(os.path.join(staging, n), manifest.files[n].algorithm), names)
    for name, (size, digest) in zip(names, digests, strict=True):
        check_file(uri, name, manifest.files[name], size, digest)
        if progress:  # some filesystems (local copies) report no progress of their own
            progress(name, size, size)


def archive(
    uri: str, tar_path: str, storage_options: Mapping[str, Any] | None = None, progress: Progress | None = None
) -> str:
    """Write a verified checkpoint as a ``.tar`` (``.tar.gz`` if the name ends so) at ``tar_path`` (any URI).

    An existing archive at ``tar_path`` is replaced only by a complete one: locally the archive is written and
    fsynced as a hidden sibling renamed over ``tar_path``; elsewhere it is built in a local temporary file and
    then uploaded in one ``put`` (object stores make an object visible only once its upload completes; on
    other remote filesystems a failed upload may leave a partial file, as their ``put`` does).

    Args:
        uri: the checkpoint directory's URI (not a ``lora://`` URI: resolve it first).
        tar_path: where the archive goes (any fsspec URI or local path); it holds the checkpoint's files at
            its top level.
        storage_options: fsspec options of both filesystems.
        progress: called with (file name, bytes done, bytes total) while downloading.

    Returns:
        ``tar_path``.

    Raises:
        CheckpointFormatError: there is no checkpoint at ``uri``, or a file is missing, unsafe or differs
            from the manifest.
        OSError: writing the archive failed (e.g. the disk is full); an archive already at ``tar_path`` is
            left as it was, and no partial file is left locally.
    """
    fs, path = url_to_fs(tar_path, storage_options)
    with tempfile.TemporaryDirectory() as tmp:
        local = download(uri, os.path.join(tmp, "checkpoint"), storage_options, progress)
        if isinstance(fs, LocalFileSystem):
            _write_local_tar(local, path, tar_path.endswith("gz"))
        else:
            staged = os.path.join(tmp, "archive.tar")
            with open(staged, "wb") as f:
                _write_tar(local, f, tar_path.endswith("gz"))
            fs.put_file(staged, path)
    return tar_path


def _write_tar(directory: str, f: Any, gz: bool) -> None:
    """Write the files of ``directory`` (sorted, at the archive's top level) as a tar into file object ``f``."""
    with tarfile.open(fileobj=f, mode="w:gz" if gz else "w") as tar:
        for name in sorted(os.listdir(directory)):
            tar.add(os.path.join(directory, name), arcname=name, recursive=False)


def _write_local_tar(directory: str, path: str, gz: bool) -> None:
    """Write the tar as a hidden, fsynced sibling of local ``path`` and rename it into place."""
    target = os.path.abspath(path)
    parent, name = os.path.split(target)
    if os.path.isdir(target):
        raise IsADirectoryError(f"{target} is a directory; give the archive a file name such as {name}.tar")
    os.makedirs(parent, exist_ok=True)
    fd, staged = tempfile.mkstemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            _write_tar(directory, f, gz)
            f.flush()
            os.fsync(f.fileno())
            mask = os.umask(0)
            os.umask(mask)
            os.fchmod(f.fileno(), 0o666 & ~mask)  # mkstemp makes it private; an archive is an ordinary file
        os.replace(staged, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staged)
        raise


def extract_archive(
    tar_path: str,
    output_dir: str | os.PathLike[str],
    storage_options: dict[str, Any] | None = None,
    max_bytes: int = MAX_EXTRACT_BYTES,
) -> str:
    """Safely extract a checkpoint archive: only regular files directly inside a new or empty ``output_dir``.

    Everything is checked from the archive's headers before anything is written: symlinks, hard links,
    devices, absolute paths, ``..`` escapes and duplicate names are refused, and so is an archive whose
    members add up to more than ``max_bytes``, or (when it holds a ``checkpoint.json``) to more than the
    manifest lists. The files are extracted into a hidden sibling renamed into place once complete, so a
    failure (a full disk) leaves nothing at ``output_dir``.

    Args:
        tar_path: the archive (any fsspec URI or local path; ``.tar`` or compressed).
        output_dir: the local directory to extract into: absent (it is created) or empty.
        storage_options: fsspec options of the archive's filesystem.
        max_bytes: the most bytes the members may hold in all (default :data:`MAX_EXTRACT_BYTES`, 64 GiB).

    Returns:
        The absolute path of ``output_dir``.

    Raises:
        ValueError: a member is not a regular file, would land outside ``output_dir`` or repeats a name; the
            members are larger than ``max_bytes`` or the manifest lists; or ``tar_path`` is not a tar archive.
        CheckpointFormatError: (a ``ValueError``) the archive's ``checkpoint.json`` is invalid.
        FileExistsError: ``output_dir`` exists and is not an empty directory.
        FileNotFoundError: there is no file at ``tar_path``.
    """
    target = os.path.abspath(output_dir)
    if os.path.lexists(target) and (not os.path.isdir(target) or os.listdir(target)):
        raise FileExistsError(
            f"Refusing to extract {tar_path}: {target} exists and is not an empty directory; "
            "choose an empty or new output directory"
        )
    fs, path = url_to_fs(tar_path, storage_options)
    with fs.open(path, "rb") as f:
        try:
            with tarfile.open(fileobj=f, mode="r:*") as tar:
                members = _checked_members(tar, tar_path, target, max_bytes)
                parent = os.path.dirname(target)
                os.makedirs(parent, exist_ok=True)
                staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.extract-", dir=parent)
                try:
                    tar.extractall(staging, members=members, filter="data")
                    apply_umask(staging)
                    if os.path.exists(target):
                        os.rmdir(target)  # empty (checked above); fails if something appeared meanwhile
                    os.rename(staging, target)
                except BaseException:
                    shutil.rmtree(staging, ignore_errors=True)
                    raise
        except tarfile.TarError as err:
            raise ValueError(f"Refusing to extract {tar_path}: not a readable tar archive ({err})") from err
    return target


def _checked_members(tar: tarfile.TarFile, tar_path: str, target: str, max_bytes: int) -> list[tarfile.TarInfo]:
    """The members of ``tar``, each checked as soon as its header is read (never reading past a refused one)."""

    def refuse(why: str) -> ValueError:
        return ValueError(f"Refusing to extract {tar_path}: {why}")

    members: list[tarfile.TarInfo] = []
    names: set[str] = set()
    total = 0
    while (member := tar.next()) is not None:
        resolved = os.path.abspath(os.path.join(target, member.name))
        if not member.isfile():
            raise refuse(f"{member.name[:200]!r} is not a regular file")
        if os.path.isabs(member.name) or os.path.dirname(resolved) != target:
            raise refuse(f"{member.name[:200]!r} would land outside {target}")
        name = os.path.basename(resolved)
        if name in names:
            raise refuse(f"{name[:200]!r} appears twice (a later copy would replace the first)")
        names.add(name)
        total += member.size
        if total > max_bytes:
            raise refuse(f"its members hold more than max_bytes={max_bytes} bytes; pass a larger max_bytes if expected")
        if len(members) >= MAX_EXTRACT_MEMBERS:
            raise refuse(f"it holds more than {MAX_EXTRACT_MEMBERS} members, far more than a checkpoint has")
        members.append(member)
    manifest = next((m for m in members if os.path.basename(os.path.normpath(m.name)) == MANIFEST), None)
    if manifest is not None:
        if manifest.size > MAX_MANIFEST_BYTES:
            raise refuse(f"its {MANIFEST} has {manifest.size} bytes, more than the {MAX_MANIFEST_BYTES} allowed")
        reader = tar.extractfile(manifest)
        raw = reader.read(MAX_MANIFEST_BYTES + 1) if reader else b""
        listed = Manifest.from_json(raw, f"{tar_path}:{MANIFEST}").size_bytes + manifest.size
        if total > listed:
            raise refuse(f"its members hold {total} bytes, more than the {listed} its {MANIFEST} lists")
    return members


class _ProgressCallback(Callback):
    """Adapts fsspec's transfer callbacks to a per-file ``(name, bytes done, bytes total)`` progress function."""

    def __init__(self, progress: Progress | None, name: str = "") -> None:
        super().__init__()
        self.progress, self.name = progress, name

    def branched(self, path_1: str, path_2: str, **kwargs: Any) -> Callback:
        return _ProgressCallback(self.progress, os.path.basename(str(path_2)))

    def call(self, *args: Any, **kwargs: Any) -> None:
        if self.progress and self.name:
            self.progress(self.name, self.value, self.size or self.value)


def local_copy(
    uri: str,
    cache_dir: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None = None,
    *,
    verify: bool = False,
) -> tuple[str, Manifest]:
    """A local directory holding the checkpoint at ``uri`` as committed: the checkpoint itself on a local
    filesystem, else a verified download under ``cache_dir`` named by its content digest (reused while intact).

    A damaged cached copy is downloaded again; a copy another process put in place meanwhile is used; a
    checkpoint replaced between the reads is filed under the digest of the version downloaded.

    Args:
        uri: the checkpoint directory's URI (not a ``lora://`` URI: resolve it first).
        cache_dir: where downloads of remote checkpoints are kept.
        storage_options: fsspec options of the checkpoint's filesystem.
        verify: also check a local checkpoint's files against its manifest (a download is always verified);
            without it a local checkpoint is returned unread beyond its manifest, for callers that verify it as
            they read it.

    Returns:
        The directory and the manifest of the version it holds.

    Raises:
        CheckpointFormatError: there is no checkpoint at ``uri``, or it is damaged (a local one: only checked
            with ``verify``).
    """
    fs, path = url_to_fs(uri, storage_options)
    stored = read_manifest(uri, storage_options)
    if isinstance(fs, LocalFileSystem) and stored.snapshot != "delta":
        if verify:
            _check_files(path, stored, uri)
        return path, stored
    expected = stored.as_base().content_sha256  # a delta's copy is a base (download)
    target = os.path.join(os.path.abspath(cache_dir), expected)
    if os.path.isdir(target) and _cached_intact(target, expected):
        return target, read_manifest(target)
    shutil.rmtree(target, ignore_errors=True)
    try:
        download(uri, target, storage_options)
    except OSError:  # another process filled the cache meanwhile (FileExistsError, or ENOTEMPTY from the rename)
        if not _cached_intact(target, expected):
            raise
    copied = read_manifest(target)
    if copied.content_sha256 != expected:  # replaced between the two reads: file the copy under its own digest
        final = os.path.join(os.path.abspath(cache_dir), copied.content_sha256)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(target, final)
        target = final
    return target, copied


def _check_files(directory: str, manifest: Manifest, uri: str) -> None:
    """Raise ``CheckpointFormatError`` (naming ``uri``) unless each file of ``manifest`` in ``directory`` matches."""
    for name, entry in manifest.files.items():
        try:
            size, digest = file_digest(os.path.join(directory, name), entry.algorithm)
        except FileNotFoundError:
            raise CheckpointFormatError(f"Checkpoint {uri} is damaged: {name} is missing") from None
        check_file(uri, name, entry, size, digest)


def _cached_intact(directory: str, content_sha256: str) -> bool:
    try:
        manifest = read_manifest(directory)
        if manifest.content_sha256 != content_sha256:
            return False
        _check_files(directory, manifest, directory)
    except (CheckpointFormatError, OSError):
        return False
    return True
