"""Strict JSON and UTC time helpers shared by every file format of a checkpoint.

Checkpoint JSON is read by several programs (this package, PEFT, vLLM, people): a document they could
read differently (``NaN``, duplicate keys) or one far larger than any valid one is refused before use.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timezone
from typing import Any


class CheckpointFormatError(ValueError):
    """A checkpoint directory is missing, incomplete, tampered with or not in this format.

    A ``ValueError``: code catching ``ValueError`` for bad input also catches it.
    """


def load_json_object(raw: bytes | memoryview, limit: int, source: str) -> dict[str, Any]:
    """Parse ``raw`` as a strict JSON object, refusing more than ``limit`` bytes before parsing.

    ``NaN``/``Infinity`` (not JSON; never written here) and duplicate keys (which other readers may
    resolve differently) are refused.

    Args:
        raw: the document's bytes.
        limit: the most bytes accepted.
        source: what the document is, at the start of error messages.

    Returns:
        The parsed object.

    Raises:
        CheckpointFormatError: starting with ``source``: ``raw`` is larger than ``limit``, is not strict JSON
            or does not hold an object.
    """
    if len(raw) > limit:
        raise CheckpointFormatError(f"{source}: larger than {limit} bytes, far more than a valid one; refusing it")
    try:
        data = json.loads(
            bytes(raw) if isinstance(raw, memoryview) else raw,
            parse_constant=_refuse_constant,
            object_pairs_hook=_unique_keys,
        )
    except (ValueError, RecursionError) as err:
        raise CheckpointFormatError(f"{source}: not JSON ({str(err)[:200]})") from err
    if not isinstance(data, dict):
        raise CheckpointFormatError(f"{source}: must hold a JSON object, not {type(data).__name__}")
    return data


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):
        duplicate = next(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
        raise ValueError(f"duplicate key {duplicate[:100]!r}")
    return data


def utcnow() -> datetime:
    """The current time.

    Returns:
        An aware datetime in UTC.
    """
    return datetime.now(timezone.utc)


def iso_time(t: datetime) -> str:
    """``t`` as the ISO-8601 UTC string checkpoint JSON holds.

    Args:
        t: an aware datetime (a naive one is taken as local time, as ``astimezone`` does).

    Returns:
        E.g. ``"2026-11-22T15:50:53.676870Z"``.
    """
    return t.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def parse_time(value: Any) -> datetime:
    """An ISO-8601 time as an aware UTC datetime (naive times are taken as UTC).

    Args:
        value: an ISO-8601 string; a trailing ``Z`` is accepted.

    Returns:
        The time, in UTC.

    Raises:
        TypeError: ``value`` is not a string.
        ValueError: ``value`` is not an ISO-8601 time.
    """
    if type(value) is not str:
        raise TypeError(f"expected an ISO-8601 time string, got {str(value)[:100]!r}")
    t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)
