"""Copying checkpoints out of the store: verified download, ``.tar`` archives and their safe extraction."""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fsspec.callbacks import Callback

from ..format.layout import join
from ..format.manifest import MANIFEST
from .commit import open_protocol
from .fs import url_to_fs
from .read import check_file, read_manifest

#: Called with (file name, bytes done, bytes total) while downloading.
Progress = Callable[[str, int, int], None]


def download(
    uri: str,
    output_dir: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
) -> str:
    """Copy a checkpoint's files into a local ``output_dir``, verifying each; returns the directory.

    Files are written into a temporary sibling that is renamed into place once all are verified.

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
        with ThreadPoolExecutor() as pool:  # hashlib releases the GIL: hash the files in parallel
            digests = pool.map(_size_and_sha256, [os.path.join(staging, n) for n in names])
        for name, (size, sha256) in zip(names, digests, strict=True):
            check_file(uri, name, manifest.files[name], size, sha256)
            if progress:  # some filesystems (local copies) report no progress of their own
                progress(name, size, size)
        if os.path.exists(target):
            os.rmdir(target)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def archive(
    uri: str, tar_path: str, storage_options: Mapping[str, Any] | None = None, progress: Progress | None = None
) -> str:
    """Write a verified checkpoint as a ``.tar`` (``.tar.gz`` if the name ends so) at ``tar_path`` (any URI).

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
    """
    with tempfile.TemporaryDirectory() as tmp:
        local = download(uri, os.path.join(tmp, "checkpoint"), storage_options, progress)
        fs, path = url_to_fs(tar_path, storage_options)
        with (
            fs.open(path, "wb") as f,
            tarfile.open(fileobj=f, mode="w:gz" if tar_path.endswith("gz") else "w") as tar,
        ):
            for name in sorted(os.listdir(local)):
                tar.add(os.path.join(local, name), arcname=name, recursive=False)
    return tar_path


def extract_archive(
    tar_path: str, output_dir: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> str:
    """Safely extract a checkpoint archive: only regular files directly inside ``output_dir``.

    Refuses symlinks, hard links, devices, absolute paths and ``..`` escapes before writing anything.

    Args:
        tar_path: the archive (any fsspec URI or local path; ``.tar`` or compressed).
        output_dir: the local directory to extract into; it is created if needed.
        storage_options: fsspec options of the archive's filesystem.

    Returns:
        The absolute path of ``output_dir``.

    Raises:
        ValueError: a member is not a regular file or would land outside ``output_dir``.
        FileNotFoundError: there is no file at ``tar_path``.
        tarfile.ReadError: ``tar_path`` is not a tar archive.
    """
    target = os.path.abspath(output_dir)
    fs, path = url_to_fs(tar_path, storage_options)
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:*") as tar:
        members = tar.getmembers()
        for member in members:
            resolved = os.path.abspath(os.path.join(target, member.name))
            if not member.isfile():
                raise ValueError(f"Refusing to extract {tar_path}: {member.name!r} is not a regular file")
            if os.path.isabs(member.name) or os.path.dirname(resolved) != target:
                raise ValueError(f"Refusing to extract {tar_path}: {member.name!r} would land outside {target}")
        os.makedirs(target, exist_ok=True)
        tar.extractall(target, members=members, filter="data")
    return target


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


def _size_and_sha256(path: str) -> tuple[int, str]:
    hasher, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            hasher.update(chunk)
            size += len(chunk)
    return size, hasher.hexdigest()
