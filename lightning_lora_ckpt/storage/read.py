"""Verified reads of a checkpoint's files: the manifest first, then each file checked against it.

No read ever takes more than the listed size plus one byte, so a file swapped for a huge one is refused
without being loaded; locally only regular files inside the checkpoint directory are read.

The manifest and the files are read by path in separate steps, and a checkpoint may be replaced in between
(a local overwrite swaps in a new directory and deletes the old one; an object-store overwrite deletes the
old manifest, uploads the new files, then the new manifest). :func:`read_checkpoint` makes such a read
consistent, whatever the backend: when a file is missing or differs from the manifest it reads the manifest
again and either reports the damage (the same commit is still there: the damage is real), reads again with
the new manifest (the checkpoint was replaced), or waits a bounded time for one (an object-store overwrite
is uploading). A reader thus gets the old checkpoint or the new one, whole, or a clear error; never a mix.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from fsspec.implementations.local import LocalFileSystem

from ..format.digests import digest_hex, read_with_digest
from ..format.files import ReadBytes
from ..format.layout import join
from ..format.manifest import MANIFEST, MAX_MANIFEST_BYTES, FileEntry, Manifest
from ..format.strict_json import CheckpointFormatError
from .commit import CommitProtocol, open_protocol

log = logging.getLogger(__name__)

#: How long, in total, a read waits for the manifest of a checkpoint replaced while it was read to reappear
#: (an object-store overwrite deletes the old manifest first and uploads the new one last).
READ_DEADLINE_S = 30.0
#: How many times a read starts over with a new manifest before giving up on a checkpoint replaced that often.
READ_ATTEMPTS = 5
_POLL_FIRST_S, _POLL_MAX_S = 0.01, 0.5

_R = TypeVar("_R")


def read_manifest(uri: str, storage_options: Mapping[str, Any] | None = None) -> Manifest:
    """Read and validate the manifest of the checkpoint at ``uri``.

    Args:
        uri: the checkpoint directory's URI (not a ``lora://`` URI: resolve it first).
        storage_options: fsspec options of the filesystem.

    Returns:
        The manifest.

    Raises:
        CheckpointFormatError: there is no manifest at ``uri``, or it is invalid.
    """
    manifest = manifest_if_any(uri, storage_options)
    if manifest is None:
        raise CheckpointFormatError(
            f"No checkpoint at {uri}: {MANIFEST} is missing (not a checkpoint directory, or its save never completed)"
        )
    return manifest


def manifest_if_any(uri: str, storage_options: Mapping[str, Any] | None = None) -> Manifest | None:
    """The validated manifest of the checkpoint at ``uri``, or None if there is none.

    Args:
        uri: the checkpoint directory's URI.
        storage_options: fsspec options of the filesystem.

    Returns:
        The manifest, or None.

    Raises:
        CheckpointFormatError: the manifest is invalid.
    """
    protocol, path = open_protocol(uri, storage_options)
    try:
        raw = _read_member(protocol, uri, path, MANIFEST, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        return None
    return Manifest.from_json(raw, join(uri, MANIFEST))


def read_files(
    uri: str, manifest: Manifest, names: list[str], storage_options: Mapping[str, Any] | None = None
) -> dict[str, ReadBytes]:
    """Read ``names`` from the checkpoint at ``uri``, checking each against the manifest's size and sha256.

    A checkpoint replaced since ``manifest`` was read fails the check; :func:`read_checkpoint` reads
    consistently across a replacement.

    Args:
        uri: the checkpoint directory's URI.
        manifest: its manifest, as :func:`read_manifest` returned it.
        names: the files to read; each must be listed in the manifest.
        storage_options: fsspec options of the filesystem.

    Returns:
        The verified bytes of each file, by name.

    Raises:
        CheckpointFormatError: a file is missing, unsafe, or differs from its manifest entry.
    """
    files, damage = read_each(uri, manifest, names, storage_options)
    for name in names:
        if name in damage:
            raise damage[name]
    return files


def read_each(
    uri: str, manifest: Manifest, names: list[str], storage_options: Mapping[str, Any] | None
) -> tuple[dict[str, ReadBytes], dict[str, CheckpointFormatError]]:
    """Read and check each of ``names`` against the manifest, not stopping at the first damaged one.

    Args:
        uri: the checkpoint directory's URI.
        manifest: its manifest.
        names: the files to read; each must be listed in the manifest.
        storage_options: fsspec options of the filesystem.

    Returns:
        The verified bytes of the good files, and the error of each other one, by name.
    """
    protocol, path = open_protocol(uri, storage_options)

    def checked(name: str) -> ReadBytes:
        expected = manifest.files[name]
        try:
            data, digest = _read_with_digest(protocol, uri, path, name, expected)
        except FileNotFoundError as err:
            raise CheckpointFormatError(f"Checkpoint {uri} is damaged: {name} is missing") from err
        if len(data) > expected.size:
            raise CheckpointFormatError(
                f"Checkpoint {uri} is damaged: {name} is larger than the {expected.size} bytes the manifest lists"
            )
        check_file(uri, name, expected, len(data), digest)
        return data

    def read(name: str) -> ReadBytes | CheckpointFormatError:
        try:
            return checked(name)
        except CheckpointFormatError as err:
            return err

    # Files are read and hashed concurrently: both release the GIL, and object stores serve requests in parallel.
    with ThreadPoolExecutor(max_workers=max(1, min(len(names), 4)), thread_name_prefix="lora-ckpt-read") as pool:
        results = dict(zip(names, pool.map(read, names), strict=True))
    files = {name: r for name, r in results.items() if isinstance(r, (bytes, memoryview))}
    return files, {name: r for name, r in results.items() if isinstance(r, CheckpointFormatError)}


def read_checkpoint(
    uri: str,
    names: Callable[[Manifest], list[str]] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    *,
    deadline_s: float | None = None,
    max_attempts: int | None = None,
) -> tuple[Manifest, dict[str, ReadBytes]]:
    """Read the manifest and files of the checkpoint at ``uri`` consistently: all of one committed version.

    If a file is missing or differs from the manifest, the manifest is read again: the same commit still
    there means the damage is real (raised at once); another one means the checkpoint was replaced, and the
    read starts over with it; none means it is being replaced (or was deleted), and the read waits for a new
    one, up to ``deadline_s`` seconds in all.

    Args:
        uri: the checkpoint directory's URI (not a ``lora://`` URI: resolve it first).
        names: which files to read of a manifest (called again for each new manifest; it may raise to
            refuse one); None reads every listed file.
        storage_options: fsspec options of the filesystem.
        deadline_s: the most seconds spent waiting for a replaced checkpoint's manifest
            (:data:`READ_DEADLINE_S` if None).
        max_attempts: how many manifests to try before giving up on a checkpoint replaced that often
            (:data:`READ_ATTEMPTS` if None).

    Returns:
        The manifest read and the verified bytes of the files ``names`` chose, by name.

    Raises:
        CheckpointFormatError: there is no checkpoint at ``uri``, it is damaged, its manifest is invalid, or it
            was deleted or kept being replaced while it was read.
    """
    choose = names or (lambda manifest: list(manifest.files))

    def attempt(manifest: Manifest) -> tuple[dict[str, ReadBytes], CheckpointFormatError | None]:
        try:
            return read_files(uri, manifest, choose(manifest), storage_options), None
        except CheckpointFormatError as err:
            return {}, err

    manifest, files, damage = consistent_read(
        uri, attempt, storage_options, deadline_s=deadline_s, max_attempts=max_attempts
    )
    if damage is not None:
        raise damage
    return manifest, files


def consistent_read(
    uri: str,
    attempt: Callable[[Manifest], tuple[_R, CheckpointFormatError | None]],
    storage_options: Mapping[str, Any] | None = None,
    *,
    deadline_s: float | None = None,
    max_attempts: int | None = None,
) -> tuple[Manifest, _R, CheckpointFormatError | None]:
    """Run ``attempt`` on the checkpoint's manifest until it reads one committed version without damage, or
    the damage is real (see :func:`read_checkpoint`).

    Args:
        uri: the checkpoint directory's URI.
        attempt: reads the files of a manifest; returns its result and the first damage it met (None if none).
        storage_options: fsspec options of the filesystem.
        deadline_s: the most seconds spent waiting for a replaced checkpoint's manifest
            (:data:`READ_DEADLINE_S` if None).
        max_attempts: how many manifests to try (:data:`READ_ATTEMPTS` if None).

    Returns:
        The manifest last read, ``attempt``'s result on it, and its damage: None, or real damage (the same
        commit was still there when the manifest was read again).

    Raises:
        CheckpointFormatError: there is no checkpoint at ``uri`` or its manifest is invalid (on the first read),
            or it was deleted or kept being replaced while it was read.
    """
    budget = _WaitBudget(READ_DEADLINE_S if deadline_s is None else deadline_s)
    attempts = READ_ATTEMPTS if max_attempts is None else max_attempts
    manifest = read_manifest(uri, storage_options)
    for tries in range(1, max(1, attempts) + 1):
        result, damage = attempt(manifest)
        if damage is None:
            return manifest, result, None
        current = _manifest_after_damage(uri, storage_options, budget)
        if same_commit(current, manifest):
            return manifest, result, damage
        log.debug(
            "Checkpoint %s was replaced while it was read (%s); reading it again (attempt %d)", uri, damage, tries
        )
        manifest = current
    raise CheckpointFormatError(
        f"Checkpoint {uri} was replaced {attempts} times while it was read; retry when it is no longer being "
        "overwritten"
    )


def same_commit(a: Manifest, b: Manifest) -> bool:
    """Whether two manifests are the same commit: the same files (names, sizes, sha256) saved at the same time.

    A metadata update (TTL, publish) keeps the commit; a save of identical content later is another commit,
    whose files may have been rewritten in between.

    Args:
        a: a manifest.
        b: another manifest of the same checkpoint.

    Returns:
        True if only mutable metadata may differ.
    """
    return a.files == b.files and a.created_at == b.created_at


@dataclasses.dataclass
class _WaitBudget:
    """The seconds a read may still spend waiting for a manifest to reappear."""

    seconds: float


def _manifest_after_damage(uri: str, storage_options: Mapping[str, Any] | None, budget: _WaitBudget) -> Manifest:
    """The manifest at ``uri`` now; while there is none, wait for one with growing pauses, spending ``budget``."""
    delay = _POLL_FIRST_S
    while True:
        started = time.monotonic()
        manifest = manifest_if_any(uri, storage_options)
        if manifest is not None:
            return manifest
        if budget.seconds <= 0:
            raise CheckpointFormatError(
                f"Checkpoint {uri} was deleted or is being replaced while it was read (no {MANIFEST} appeared "
                "again in time); retry"
            )
        time.sleep(min(delay, budget.seconds))
        delay = min(delay * 2, _POLL_MAX_S)
        budget.seconds -= time.monotonic() - started


def _read_with_digest(
    protocol: CommitProtocol, uri: str, path: str, name: str, expected: FileEntry
) -> tuple[ReadBytes, str]:
    """At most one byte more than listed of file ``name``, and its digest by the entry's algorithm; a local file
    is hashed while it is read, into a writable buffer its tensors are decoded from without a copy."""
    if isinstance(protocol.fs, LocalFileSystem):
        protocol.check_member(uri, path, name)
        return read_with_digest(join(path, name), expected.size, expected.algorithm)
    data = _read_member(protocol, uri, path, name, expected.size)
    return data, digest_hex(data, expected.algorithm)


def _read_member(protocol: CommitProtocol, uri: str, path: str, name: str, limit: int) -> bytes:
    """At most ``limit + 1`` bytes of file ``name`` of a checkpoint."""
    protocol.check_member(uri, path, name)
    return protocol.fs.cat_file(join(path, name), start=0, end=limit + 1)


def check_file(uri: str, name: str, expected: FileEntry, size: int, digest: str) -> None:
    """Raise ``CheckpointFormatError`` if a file's size or digest differs from its manifest entry.

    Args:
        uri: the checkpoint's URI, for the message.
        name: the file's name.
        expected: its manifest entry.
        size: its actual size in bytes.
        digest: its actual digest, by the entry's algorithm.

    Raises:
        CheckpointFormatError: naming the checkpoint, the file and both sizes and digests.
    """
    if size != expected.size or digest != expected.digest:
        raise CheckpointFormatError(
            f"Checkpoint {uri} is damaged: {name} has {size} bytes and {expected.algorithm} {digest[:12]}, "
            f"the manifest says {expected.size} bytes and {expected.digest[:12]}"
        )
