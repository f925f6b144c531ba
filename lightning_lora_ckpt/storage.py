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
from urllib.parse import urlencode

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .manifest import MANIFEST, MAX_MANIFEST_BYTES, CheckpointFormatError, FileEntry, Manifest, sha256_hex
from .ttl import TTL_TAG, lifecycle_tag
from .uris import join


def url_to_fs(uri: str, storage_options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and in-filesystem path of ``uri``."""
    return fsspec.core.url_to_fs(uri, **dict(storage_options or {}))


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def _is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "s3" in protocols


def _ttl_tags(manifest: Manifest) -> dict[str, str]:
    return {TTL_TAG: lifecycle_tag(manifest.created_at, manifest.expires_at, manifest.public)}


def _upload(fs: fsspec.AbstractFileSystem, path: str, data: bytes, manifest: Manifest) -> None:
    """Upload one object of a checkpoint; on S3 it carries the TTL tag from the start (no extra request)."""
    if _is_s3(fs):
        fs.pipe_file(path, data, Tagging=urlencode(_ttl_tags(manifest)))
    else:
        fs.pipe_file(path, data)


def commit_checkpoint(
    uri: str,
    files: Mapping[str, bytes],
    make_manifest: Callable[[dict[str, FileEntry]], Manifest],
    storage_options: Mapping[str, Any] | None = None,
    replace: bool = False,
) -> Manifest:
    """Write ``files`` and then the manifest built from their checksums as the checkpoint at ``uri``.

    A committed checkpoint at ``uri`` is an error unless ``replace``: locally the old one is swapped out
    only once the new one is fully written; on object stores it is deleted (manifest first) before the
    upload. Leftovers of an interrupted save at ``uri`` are always replaced.
    """
    fs, path = url_to_fs(uri, storage_options)
    if not replace and fs.exists(join(path, MANIFEST)):
        raise FileExistsError(f"A checkpoint already exists at {uri}; delete it first or save under another name")
    manifest = make_manifest({name: FileEntry(len(data), sha256_hex(data)) for name, data in files.items()})
    payload = {**files, MANIFEST: manifest.to_json()}
    if is_local(fs):
        _commit_local(path, payload)
    else:
        delete_checkpoint(uri, storage_options)
        for name, data in payload.items():  # dict order: the manifest goes last
            _upload(fs, join(path, name), data, manifest)
    return manifest


def write_manifest(uri: str, manifest: Manifest, storage_options: Mapping[str, Any] | None = None) -> None:
    """Replace the manifest of a committed checkpoint (its mutable metadata) in one atomic step.

    On S3 every object of the checkpoint is re-tagged first, so a lifecycle rule never sees a tag
    shorter than the new expiry.
    """
    fs, path = url_to_fs(uri, storage_options)
    data = manifest.to_json()
    if is_local(fs):
        tmp = join(path, f".{MANIFEST}.tmp-{uuid.uuid4().hex}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, join(path, MANIFEST))
        return
    if _is_s3(fs):
        for name in manifest.files:
            fs.put_tags(join(path, name), _ttl_tags(manifest), mode="o")
    _upload(fs, join(path, MANIFEST), data, manifest)


def object_tags(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, dict[str, str]]:
    """The S3 tags of every object of a checkpoint, by file name (empty on other filesystems)."""
    fs, path = url_to_fs(uri, storage_options)
    if not _is_s3(fs):
        return {}
    return {p.rsplit("/", 1)[-1]: fs.get_tags(p) for p in fs.ls(path, detail=False)}


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
        previous = None
        if os.path.exists(path):  # a leftover, or the checkpoint being replaced: swapped out, then deleted
            previous = os.path.join(parent, f".{name}.deleting-{uuid.uuid4().hex}")
            os.rename(path, previous)
        os.rename(tmp, path)
        _fsync_dir(parent)
    except BaseException:
        _remove_local(tmp)
        raise
    if previous:
        LocalFileSystem().rm(previous, recursive=True)


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
        check_file(uri, name, expected, len(data), sha256_hex(data))
        out[name] = data
    return out


def check_file(uri: str, name: str, expected: FileEntry, size: int, sha256: str) -> None:
    """Raise ``CheckpointFormatError`` if a file's size or sha256 differs from its manifest entry."""
    if size != expected.size or sha256 != expected.sha256:
        raise CheckpointFormatError(
            f"Checkpoint {uri} is damaged: {name} has {size} bytes and sha256 {sha256[:12]}, "
            f"the manifest says {expected.size} bytes and {expected.sha256[:12]}"
        )


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
