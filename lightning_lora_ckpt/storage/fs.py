"""Reaching a checkpoint's filesystem: fsspec with S3 retry/timeout defaults, and storage failures named clearly."""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator, Mapping
from typing import Any

import fsspec

from ..format.strict_json import CheckpointFormatError

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


class CheckpointConflictError(RuntimeError):
    """The request conflicts with the checkpoint's current state (e.g. publishing a public checkpoint, or
    replacing a published one).

    A ``RuntimeError``; nothing was changed.
    """


class CheckpointWriteError(OSError):
    """Storage kept failing (after the filesystem's own retries) while a checkpoint was written or deleted.

    An ``OSError``; the message names the checkpoint and the underlying error, which is its ``__cause__``.
    """


def url_to_fs(uri: str, storage_options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and in-filesystem path of ``uri``.

    On ``s3://`` the :data:`S3_CONFIG_DEFAULTS` missing from ``storage_options["config_kwargs"]`` are
    added; the retry settings only if neither ``AWS_RETRY_MODE`` nor ``AWS_MAX_ATTEMPTS`` is set.

    Args:
        uri: any fsspec URI or local path.
        storage_options: fsspec options of the filesystem.

    Returns:
        The filesystem and the path of ``uri`` in it.

    Raises:
        ValueError: fsspec knows no filesystem for the URI's protocol.
        ImportError: the filesystem's package (e.g. ``s3fs``) is not installed.
    """
    options = dict(storage_options or {})
    if fsspec.core.split_protocol(uri)[0] in ("s3", "s3a"):
        retry_env = any(name in os.environ for name in _RETRY_ENV)
        defaults = {k: v for k, v in S3_CONFIG_DEFAULTS.items() if not (k == "retries" and retry_env)}
        options["config_kwargs"] = {**copy.deepcopy(defaults), **(options.get("config_kwargs") or {})}
    return fsspec.core.url_to_fs(uri, **options)


@contextlib.contextmanager
def storage_errors(action: str, uri: str) -> Iterator[None]:
    """Turn any failure of the storage inside the block into a :class:`CheckpointWriteError` naming ``uri``.

    ``CheckpointWriteError``, ``FileExistsError``, ``CheckpointConflictError`` and ``CheckpointFormatError``
    (decisions, not failures of the storage) pass through unchanged.

    Args:
        action: what the block does, for the message (e.g. ``"write checkpoint"``).
        uri: the checkpoint's URI.

    Raises:
        CheckpointWriteError: any other exception left the block.
    """
    try:
        yield
    except (CheckpointWriteError, FileExistsError, CheckpointConflictError, CheckpointFormatError):
        raise
    except Exception as err:
        raise CheckpointWriteError(
            f"Could not {action} {uri}: {type(err).__name__}: {err}. The storage kept failing after its retries "
            "(see docs/faults-and-hostile-input.md to tune them); a checkpoint is listed and loadable only once "
            "its checkpoint.json is written, so nothing half-written is visible"
        ) from err
