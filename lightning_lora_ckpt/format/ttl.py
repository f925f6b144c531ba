"""TTL values: parsing durations, and the object tag that lets S3 lifecycle rules expire checkpoints.

Lifecycle rules cannot read a manifest; they match a tag and delete objects some whole number of days
after they were created. Every object of a checkpoint on S3 therefore carries ``lora-ckpt-ttl`` with
the smallest of a fixed set of values that is at least the checkpoint's lifetime (``expires_at -
created_at``), so the bucket never deletes a checkpoint before it has expired; checkpoints that never
expire, live longer than the largest value, or are published carry ``none``.
"""

from __future__ import annotations

import re
from datetime import datetime

TTL_TAG = "lora-ckpt-ttl"
#: tag value -> days; one lifecycle rule per value (docs/storage.md).
TAG_DAYS = {"1d": 1, "7d": 7, "30d": 30, "90d": 90}
NO_EXPIRY = "none"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*")


def parse_duration(value: str | float | int | None) -> float | None:
    """Seconds from ``3600``, ``"90s"``, ``"30m"``, ``"2h"``, ``"7d"`` or ``"1w"``; None stays None.

    Args:
        value: seconds (a number), a number with a unit (``s``, ``m``, ``h``, ``d``, ``w``), or None.

    Returns:
        The duration in seconds, or None.

    Raises:
        ValueError: ``value`` is none of these (a bool included), or is not positive.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"Invalid duration {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.fullmatch(value)
        if not match:
            raise ValueError(f"Invalid duration {value!r}: use seconds or a number with s, m, h, d or w (e.g. '7d')")
        seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if seconds <= 0:
        raise ValueError(f"A TTL must be positive, got {value!r}; use None to remove it")
    return seconds


def lifecycle_tag(created_at: datetime, expires_at: datetime | None, public: bool) -> str:
    """The ``lora-ckpt-ttl`` tag value for a checkpoint.

    Args:
        created_at: when the checkpoint was saved.
        expires_at: when it expires, or None.
        public: whether it is published.

    Returns:
        The smallest of ``1d``, ``7d``, ``30d`` and ``90d`` that covers its lifetime, or ``none`` if it never
        expires, is public or lives longer than 90 days.
    """
    if expires_at is None or public:
        return NO_EXPIRY
    days = (expires_at - created_at).total_seconds() / 86400
    return next((tag for tag, limit in TAG_DAYS.items() if limit >= days), NO_EXPIRY)
