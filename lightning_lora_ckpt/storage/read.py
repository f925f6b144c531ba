"""Verified reads of a checkpoint's files: the manifest first, then each file checked against it.

No read ever takes more than the listed size plus one byte, so a file swapped for a huge one is refused
without being loaded; locally only regular files inside the checkpoint directory are read.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..format.layout import join
from ..format.manifest import MANIFEST, MAX_MANIFEST_BYTES, FileEntry, Manifest, sha256_hex
from ..format.records import VerifyReport
from ..format.strict_json import CheckpointFormatError
from .commit import CommitProtocol, open_protocol


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
    protocol, path = open_protocol(uri, storage_options)
    try:
        raw = _read_member(protocol, uri, path, MANIFEST, MAX_MANIFEST_BYTES)
    except FileNotFoundError as err:
        raise CheckpointFormatError(
            f"No checkpoint at {uri}: {MANIFEST} is missing (not a checkpoint directory, or its save never completed)"
        ) from err
    return Manifest.from_json(raw, join(uri, MANIFEST))


def read_files(
    uri: str, manifest: Manifest, names: list[str], storage_options: Mapping[str, Any] | None = None
) -> dict[str, bytes]:
    """Read ``names`` from the checkpoint at ``uri``, checking each against the manifest's size and sha256.

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
    protocol, path = open_protocol(uri, storage_options)

    def read(name: str) -> bytes:
        expected = manifest.files[name]
        try:
            data = _read_member(protocol, uri, path, name, expected.size)
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


def _read_member(protocol: CommitProtocol, uri: str, path: str, name: str, limit: int) -> bytes:
    """At most ``limit + 1`` bytes of file ``name`` of a checkpoint."""
    protocol.check_member(uri, path, name)
    return protocol.fs.cat_file(join(path, name), start=0, end=limit + 1)


def check_file(uri: str, name: str, expected: FileEntry, size: int, sha256: str) -> None:
    """Raise ``CheckpointFormatError`` if a file's size or sha256 differs from its manifest entry.

    Args:
        uri: the checkpoint's URI, for the message.
        name: the file's name.
        expected: its manifest entry.
        size: its actual size in bytes.
        sha256: its actual sha256.

    Raises:
        CheckpointFormatError: naming the checkpoint, the file and both sizes and digests.
    """
    if size != expected.size or sha256 != expected.sha256:
        raise CheckpointFormatError(
            f"Checkpoint {uri} is damaged: {name} has {size} bytes and sha256 {sha256[:12]}, "
            f"the manifest says {expected.size} bytes and {expected.sha256[:12]}"
        )


def verify_checkpoint(uri: str, storage_options: Mapping[str, Any] | None = None) -> VerifyReport:
    """Check every file of the checkpoint at ``uri`` against the manifest's size and sha256, then that it decodes
    (checksums alone do not catch a forged manifest); damage is reported, not raised.

    Raises:
        CheckpointFormatError: there is no committed checkpoint at ``uri``, or its manifest is invalid.
    """
    manifest = read_manifest(uri, storage_options)
    problems, files = [], {}
    for name in manifest.files:
        try:
            files.update(read_files(uri, manifest, [name], storage_options))
        except CheckpointFormatError as err:
            problems.append(str(err))
    if not problems:
        from ..format.payload import CheckpointPayload  # imports torch: not for every command line start-up

        try:
            CheckpointPayload.from_files(manifest, files, uri).state(uri)
        except CheckpointFormatError as err:
            problems.append(str(err))
    return VerifyReport(uri, {n: f.size for n, f in manifest.files.items()}, problems)
