"""Verifying a checkpoint: every file against its manifest, a delta snapshot's whole chain, then that it decodes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..format.files import ReadBytes
from ..format.manifest import Manifest
from ..format.records import VerifyReport
from ..format.strict_json import CheckpointFormatError
from .chain import rebuild_weights
from .read import consistent_read, read_each


def verify_checkpoint(
    uri: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    deadline_s: float | None = None,
    max_attempts: int | None = None,
) -> VerifyReport:
    """Check every file of the checkpoint at ``uri`` against the manifest's size and sha256, then that it decodes
    (checksums alone do not catch a forged manifest); damage is reported, not raised. A delta snapshot's whole chain
    is checked: every link's files, and each rebuilt file against its link's manifest.

    A checkpoint replaced while it is verified is verified again in the version found then (see
    :func:`read_checkpoint`); the report is about the version last read.

    Args:
        uri: the checkpoint directory's URI (not a ``lora://`` URI: resolve it first).
        storage_options: fsspec options of the filesystem.
        deadline_s: the most seconds spent waiting for a replaced checkpoint's manifest
            (:data:`READ_DEADLINE_S` if None).
        max_attempts: how many manifests to try (:data:`READ_ATTEMPTS` if None).

    Returns:
        The report: the sizes the manifest of that version lists, and one problem per damaged file or for
        contents that do not decode.

    Raises:
        CheckpointFormatError: there is no committed checkpoint at ``uri``, its manifest is invalid, or it was
            deleted or kept being replaced while it was verified.
    """

    def attempt(manifest: Manifest) -> tuple[tuple[list[str], dict[str, ReadBytes]], CheckpointFormatError | None]:
        files, damage = read_each(uri, manifest, list(manifest.files), storage_options)
        errors = [damage[name] for name in manifest.files if name in damage]
        return ([str(err) for err in errors], files), (errors[0] if errors else None)

    manifest, (problems, files), damage = consistent_read(
        uri, attempt, storage_options, deadline_s=deadline_s, max_attempts=max_attempts
    )
    if damage is None:
        from ..format.payload import CheckpointPayload  # imports torch: not for every command line start-up

        try:
            files = rebuild_weights(uri, manifest, files, storage_options, check_links=True)
            CheckpointPayload.from_files(manifest, files, uri).state(uri)
        except CheckpointFormatError as err:
            problems.append(str(err))
    return VerifyReport(uri, {n: f.size for n, f in manifest.files.items()}, problems)
