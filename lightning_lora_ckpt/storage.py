"""fsspec access to checkpoint directories: atomic commit, verified reads, deletion.

Commit protocol (DESIGN.md): on a local disk the files and the manifest are written and fsynced into
a hidden temporary sibling that is renamed into place; on object stores (and ``memory://``), where
there is no rename, the files are uploaded first and the manifest last. Either way a checkpoint is
visible only once its ``checkpoint.json`` exists, and readers ignore everything else.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import errno
import hashlib
import os
import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any
from urllib.parse import urlencode

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .manifest import MANIFEST, MAX_MANIFEST_BYTES, CheckpointFormatError, FileEntry, Manifest, sha256_hex
from .ttl import TTL_TAG, lifecycle_tag
from .uris import join

#: botocore client settings for ``s3://``, applied to each key the caller's ``config_kwargs`` leave out:
#: retries with exponential backoff and jitter (botocore's "standard" mode: 500/502/503/504, throttling
#: and connection errors) and bounded waits for a connection and for each read. s3fs retries throttling
#: and connection errors up to 5 more times around these (docs/faults-and-hostile-input.md).
S3_CONFIG_DEFAULTS: dict[str, Any] = {
    "retries": {"mode": "standard", "total_max_attempts": 5},
    "connect_timeout": 5,
    "read_timeout": 15,
}
_RETRY_ENV = ("AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS")  # botocore reads these; an explicit Config would override them

#: Hidden local entries of a write in progress, or what an interrupted one left: ``.<name>.tmp-<uuid>``
#: (being written) and ``.<name>.deleting-<uuid>`` (being deleted). Readers skip them; ``gc`` sweeps old ones.
TEMP_ENTRY = re.compile(r"\..+\.(tmp|deleting)-[0-9a-f]{32}")


class CheckpointWriteError(OSError):
    """Storage kept failing (after the filesystem's own retries) while a checkpoint was written or deleted."""


@dataclasses.dataclass(frozen=True)
class LazyFile:
    """A checkpoint file produced on demand: ``write(path)`` writes it straight to a local file (no in-memory
    copy of a large tensor file), ``render()`` returns its bytes (for object stores)."""

    write: Callable[[str], None]
    render: Callable[[], bytes]


#: The content of one file of a checkpoint.
FileContent = bytes | LazyFile


def url_to_fs(uri: str, storage_options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and in-filesystem path of ``uri``.

    On ``s3://`` the :data:`S3_CONFIG_DEFAULTS` missing from ``storage_options["config_kwargs"]`` are
    added; the retry settings only if neither ``AWS_RETRY_MODE`` nor ``AWS_MAX_ATTEMPTS`` is set.
    """
    options = dict(storage_options or {})
    if fsspec.core.split_protocol(uri)[0] in ("s3", "s3a"):
        retry_env = any(name in os.environ for name in _RETRY_ENV)
        defaults = {k: v for k, v in S3_CONFIG_DEFAULTS.items() if not (k == "retries" and retry_env)}
        options["config_kwargs"] = {**copy.deepcopy(defaults), **(options.get("config_kwargs") or {})}
    return fsspec.core.url_to_fs(uri, **options)


@contextlib.contextmanager
def storage_errors(action: str, uri: str) -> Iterator[None]:
    """Turn any failure of the storage inside the block into a :class:`CheckpointWriteError` naming ``uri``."""
    try:
        yield
    except (CheckpointWriteError, FileExistsError):
        raise
    except Exception as err:
        raise CheckpointWriteError(
            f"Could not {action} {uri}: {type(err).__name__}: {err}. The storage kept failing after its retries "
            "(see docs/faults-and-hostile-input.md to tune them); a checkpoint is listed and loadable only once "
            "its checkpoint.json is written, so nothing half-written is visible"
        ) from err


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def _is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "s3" in protocols


def _ttl_tags(manifest: Manifest) -> dict[str, str]:
    return {TTL_TAG: lifecycle_tag(manifest.created_at, manifest.expires_at, manifest.public)}


def _upload(fs: fsspec.AbstractFileSystem, path: str, data: bytes, manifest: Manifest, create: bool = False) -> None:
    """Upload one object of a checkpoint; on S3 it carries the TTL tag from the start (no extra request).

    ``create``: on S3, fail with ``FileExistsError`` if the object exists (a conditional ``If-None-Match`` PUT).
    """
    if _is_s3(fs):
        fs.pipe_file(path, data, mode="create" if create else "overwrite", Tagging=urlencode(_ttl_tags(manifest)))
    else:
        fs.pipe_file(path, data)


def _saved_concurrently(uri: str) -> FileExistsError:
    return FileExistsError(
        f"A checkpoint was saved at {uri} by another writer while this one was being written; "
        "save under another name, or pass overwrite=True to replace it"
    )


def commit_checkpoint(
    uri: str,
    files: Mapping[str, FileContent],
    make_manifest: Callable[[dict[str, FileEntry]], Manifest],
    storage_options: Mapping[str, Any] | None = None,
    replace: bool = False,
) -> Manifest:
    """Write ``files`` and then the manifest built from their checksums as the checkpoint at ``uri``.

    A committed checkpoint at ``uri`` is an error unless ``replace``, also one committed by another writer
    while this one was writing: locally the old one is swapped out only once the new one is fully written;
    on object stores it is deleted (manifest first) before the upload, and without ``replace`` the manifest
    is created only if absent (S3 conditional PUT). Leftovers of an interrupted save at ``uri`` are replaced.
    """
    fs, path = url_to_fs(uri, storage_options)
    with storage_errors("write checkpoint", uri):
        exists = fs.exists(join(path, MANIFEST))
    if exists and not replace:
        raise FileExistsError(f"A checkpoint already exists at {uri}; delete it first or save under another name")
    if is_local(fs):
        return _commit_local(uri, path, files, make_manifest, replace)
    contents = {name: c if isinstance(c, bytes) else c.render() for name, c in files.items()}
    manifest = make_manifest({name: FileEntry(len(data), sha256_hex(data)) for name, data in contents.items()})
    payload = {**contents, MANIFEST: manifest.to_json()}
    with storage_errors("write checkpoint", uri):
        if replace:
            _delete_remote(fs, path)
        for name, data in contents.items():  # in place: leftovers of an interrupted save are overwritten
            _upload(fs, join(path, name), data, manifest)
        try:  # last; without overwrite, only if no other writer committed this name meanwhile
            _upload(fs, join(path, MANIFEST), payload[MANIFEST], manifest, create=not replace)
        except FileExistsError:
            raise _saved_concurrently(uri) from None
    return manifest


def write_manifest(uri: str, manifest: Manifest, storage_options: Mapping[str, Any] | None = None) -> None:
    """Replace the manifest of a committed checkpoint (its mutable metadata) in one atomic step.

    On S3 every object of the checkpoint is re-tagged first, so a lifecycle rule never sees a tag
    shorter than the new expiry.
    """
    fs, path = url_to_fs(uri, storage_options)
    data = manifest.to_json()
    if is_local(fs):
        _replace_local_file(join(path, MANIFEST), data)
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


def _replace_local_file(path: str, data: bytes) -> None:
    """Write a local file by writing and fsyncing a hidden sibling and renaming it over ``path``."""
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


def _commit_local(
    uri: str,
    path: str,
    files: Mapping[str, FileContent],
    make_manifest: Callable[[dict[str, FileEntry]], Manifest],
    replace: bool,
) -> Manifest:
    """Write the files into a hidden sibling, then the manifest, fsync everything and rename it into place.

    Each file is hashed and fsynced in a worker thread while the next one is written (sha256 and fsync
    release the GIL), so a save costs little more than writing its bytes once.
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
                if isinstance(content, bytes):
                    _write_file(target, content)
                    digests[fname] = pool.submit(sha256_hex, content)
                else:
                    content.write(target)
                    digests[fname] = pool.submit(_sha256_file, target)
                synced.append(pool.submit(_fsync_dir, target))  # works on a file as well
            entries = {
                fname: FileEntry(os.path.getsize(os.path.join(tmp, fname)), digest.result())
                for fname, digest in digests.items()
            }
            for future in synced:
                future.result()
        manifest = make_manifest(entries)
        with storage_errors("write checkpoint", uri):
            _write_file(os.path.join(tmp, MANIFEST), manifest.to_json())
            _fsync_dir(os.path.join(tmp, MANIFEST))
            _fsync_dir(tmp)
            if replace or not _rename_if_free(tmp, path):
                install_dir(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            remove_local_dir(tmp)
        raise
    return manifest


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _sha256_file(path: str) -> str:
    """sha256 of a local file, read back in chunks (from the page cache, just after it was written)."""
    digest, chunk = hashlib.sha256(), bytearray(1 << 20)
    view = memoryview(chunk)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(chunk):
            digest.update(view[:n])
    return digest.hexdigest()


def _rename_if_free(tmp: str, path: str) -> bool:
    """Rename ``tmp`` to ``path`` unless a non-empty directory is there (one atomic check-and-rename).

    Returns False for a leftover without a manifest at ``path``; a committed checkpoint there (one saved
    concurrently since the caller checked) is a ``FileExistsError``.
    """
    try:
        os.rename(tmp, path)
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        if os.path.exists(os.path.join(path, MANIFEST)):
            raise _saved_concurrently(path) from None
        return False
    _fsync_dir(os.path.dirname(path))
    return True


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
    _fsync_dir(parent)
    if previous:
        with contextlib.suppress(FileNotFoundError):  # gc(incomplete_after=0) may have swept it already
            LocalFileSystem().rm(previous, recursive=True)


def remove_local_dir(path: str) -> None:
    """Delete a local file or directory by renaming it to a hidden ``.deleting-`` sibling first.

    The rename is atomic: the entry vanishes from listings before its files do, and a concurrent rename of
    ``path`` (a commit) either happens first (then this raises ``FileNotFoundError``) or fails.
    """
    trash = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.deleting-{uuid.uuid4().hex}")
    os.rename(path, trash)
    LocalFileSystem().rm(trash, recursive=True)


_LIBC = ctypes.CDLL(None, use_errno=True) if os.name == "posix" else None
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


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
        raw = _read_member(fs, uri, path, MANIFEST, MAX_MANIFEST_BYTES)
    except FileNotFoundError as err:
        raise CheckpointFormatError(
            f"No checkpoint at {uri}: {MANIFEST} is missing (not a checkpoint directory, or its save never completed)"
        ) from err
    return Manifest.from_json(raw, join(uri, MANIFEST))


def read_files(
    uri: str, manifest: Manifest, names: list[str], storage_options: Mapping[str, Any] | None = None
) -> dict[str, bytes]:
    """Read ``names`` from the checkpoint at ``uri``, checking each against the manifest's size and sha256.

    No more than the listed size (plus one byte) is ever read, so a file swapped for a huge one is
    refused without being loaded.
    """
    fs, path = url_to_fs(uri, storage_options)

    def read(name: str) -> bytes:
        expected = manifest.files[name]
        try:
            data = _read_member(fs, uri, path, name, expected.size)
        except FileNotFoundError as err:
            raise CheckpointFormatError(f"Checkpoint {uri} is damaged: {name} is missing") from err
        if len(data) > expected.size:
            raise CheckpointFormatError(
                f"Checkpoint {uri} is damaged: {name} is larger than the {expected.size} bytes the manifest lists"
            )
        check_file(uri, name, expected, len(data), sha256_hex(data))
        return data

    # Files are read and hashed concurrently: both release the GIL, and object stores serve requests in parallel.
    with ThreadPoolExecutor(max_workers=max(1, min(len(names), 4)), thread_name_prefix="lora-ckpt-read") as pool:
        return dict(zip(names, pool.map(read, names), strict=True))


def read_capped(fs: fsspec.AbstractFileSystem, path: str, limit: int, source: str) -> bytes:
    """The content of ``path``; a file over ``limit`` bytes is refused after reading only ``limit + 1``."""
    raw = fs.cat_file(path, start=0, end=limit + 1)
    if len(raw) > limit:
        raise CheckpointFormatError(f"{source} is larger than {limit} bytes, far more than a valid one; refusing it")
    return raw


def _read_member(fs: fsspec.AbstractFileSystem, uri: str, path: str, name: str, limit: int) -> bytes:
    """At most ``limit + 1`` bytes of file ``name`` of a checkpoint; locally only a regular file inside it."""
    check_member(fs, uri, path, name)
    return fs.cat_file(join(path, name), start=0, end=limit + 1)


def check_member(fs: fsspec.AbstractFileSystem, uri: str, path: str, name: str) -> None:
    """Locally, raise ``CheckpointFormatError`` unless file ``name`` of the checkpoint at ``path`` is a regular
    file inside it (not a link leading out, a FIFO or a device); object stores have neither."""
    if not is_local(fs):
        return
    target = os.path.realpath(os.path.join(path, name))
    if os.path.dirname(target) != os.path.realpath(path):
        raise CheckpointFormatError(
            f"Checkpoint {uri} is unsafe: {name} is a link to {target}, outside the checkpoint directory; "
            "refusing to read it"
        )
    if os.path.exists(target) and not os.path.isfile(target):
        raise CheckpointFormatError(f"Checkpoint {uri} is unsafe: {name} is not a regular file; refusing to read it")


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
    with storage_errors("delete checkpoint", uri):
        if is_local(fs):
            if os.path.exists(path):
                remove_local_dir(path)
        else:
            _delete_remote(fs, path)


def _delete_remote(fs: fsspec.AbstractFileSystem, path: str) -> None:
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
    if is_local(fs):  # a process killed mid-write must not leave a truncated run.json
        _replace_local_file(path, data)
    else:
        fs.pipe_file(path, data)
