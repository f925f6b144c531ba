"""fsspec access to checkpoint directories: atomic commit, verified reads, deletion.

Commit protocol (DESIGN.md): on a local disk the files and the manifest are written and fsynced into
a hidden temporary sibling that is renamed into place; on object stores (and ``memory://``), where
there is no rename, the files are uploaded first and the manifest last. Either way a checkpoint is
visible only once its ``checkpoint.json`` exists, and readers ignore everything else.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .manifest import MANIFEST, MAX_MANIFEST_BYTES, CheckpointFormatError, FileEntry, Manifest, sha256_hex
from .uris import join


def url_to_fs(uri: str, storage_options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and in-filesystem path of ``uri``."""
    return fsspec.core.url_to_fs(uri, **dict(storage_options or {}))


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def commit_checkpoint(
    uri: str,
    files: Mapping[str, bytes],
    make_manifest: Callable[[dict[str, FileEntry]], Manifest],
    storage_options: Mapping[str, Any] | None = None,
) -> Manifest:
    """Write ``files`` and then the manifest built from their checksums as the checkpoint at ``uri``.

    Refuses to replace a committed checkpoint; leftovers of an interrupted save at ``uri`` are replaced.
    """
    fs, path = url_to_fs(uri, storage_options)
    if fs.exists(join(path, MANIFEST)):
        raise FileExistsError(f"A checkpoint already exists at {uri}; delete it first or save under another name")
    manifest = make_manifest({name: FileEntry(len(data), sha256_hex(data)) for name, data in files.items()})
    payload = {**files, MANIFEST: manifest.to_json()}
    if is_local(fs):
        _commit_local(path, payload)
    else:
        if fs.exists(path):
            fs.rm(path, recursive=True)
        for name, data in payload.items():  # dict order: the manifest goes last
            fs.pipe_file(join(path, name), data)
    return manifest


def _commit_local(path: str, payload: Mapping[str, bytes]) -> None:
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex}")
    os.mkdir(tmp)
    try:
        for fname, data in payload.items():
            with open(os.path.join(tmp, fname), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        if os.path.exists(path):  # an uncommitted leftover (checked by the caller)
            _remove_local(path)
        os.rename(tmp, path)
        _fsync_dir(parent)
    except BaseException:
        _remove_local(tmp)
        raise


def _remove_local(path: str) -> None:
    trash = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.deleting-{uuid.uuid4().hex}")
    os.rename(path, trash)  # atomic: the directory vanishes from listings before its files do
    LocalFileSystem().rm(trash, recursive=True)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(uri: str, storage_options: Mapping[str, Any] | None = None) -> Manifest:
    """Read and validate the manifest of the checkpoint at ``uri``."""
    fs, path = url_to_fs(uri, storage_options)
    try:
        raw = fs.cat_file(join(path, MANIFEST), start=0, end=MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError as err:
        raise CheckpointFormatError(
            f"No checkpoint at {uri}: {MANIFEST} is missing (not a checkpoint directory, or its save never completed)"
        ) from err
    return Manifest.from_json(raw, join(uri, MANIFEST))


def read_files(
    uri: str, manifest: Manifest, names: list[str], storage_options: Mapping[str, Any] | None = None
) -> dict[str, bytes]:
    """Read ``names`` from the checkpoint at ``uri``, checking each against the manifest's size and sha256."""
    fs, path = url_to_fs(uri, storage_options)
    out: dict[str, bytes] = {}
    for name in names:
        expected = manifest.files[name]
        try:
            data = fs.cat_file(join(path, name))
        except FileNotFoundError as err:
            raise CheckpointFormatError(f"Checkpoint {uri} is damaged: {name} is missing") from err
        if len(data) != expected.size or sha256_hex(data) != expected.sha256:
            raise CheckpointFormatError(
                f"Checkpoint {uri} is damaged: {name} has {len(data)} bytes and sha256 {sha256_hex(data)[:12]}, "
                f"the manifest says {expected.size} bytes and {expected.sha256[:12]}"
            )
        out[name] = data
    return out


def delete_checkpoint(uri: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Delete the checkpoint directory at ``uri``: first its manifest (so it stops being visible), then the rest."""
    fs, path = url_to_fs(uri, storage_options)
    if is_local(fs):
        if os.path.exists(path):
            _remove_local(path)
        return
    if fs.exists(join(path, MANIFEST)):
        fs.rm_file(join(path, MANIFEST))
    if fs.exists(path):
        fs.rm(path, recursive=True)


def write_json_if_absent(uri: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write a small JSON document (``run.json``) unless one already exists there."""
    fs, path = url_to_fs(uri, storage_options)
    if fs.exists(path):
        return
    fs.makedirs(fs._parent(path), exist_ok=True)
    fs.pipe_file(path, data)
