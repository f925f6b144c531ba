"""Which checkpoints to keep, resume from or delete: pure functions of :class:`Checkpoint` records.

Nothing here touches storage, so every rule is unit-testable on hand-made records; the storage layer
acts on the decisions (Orbax's ``preservation_policy`` is the model).
"""

from __future__ import annotations

from datetime import datetime

from ..format.layout import CheckpointType
from ..format.records import Checkpoint


def checkpoint_order(checkpoint: Checkpoint) -> tuple[int, datetime]:
    """The sort key of a run's checkpoints: by step, then by save time.

    Args:
        checkpoint: a checkpoint record.

    Returns:
        (step, time).
    """
    return (checkpoint.step, checkpoint.time)


def newest(checkpoints: list[Checkpoint], checkpoint_type: CheckpointType) -> Checkpoint | None:
    """The newest checkpoint of ``checkpoint_type`` (highest step, then latest), or None.

    Args:
        checkpoints: checkpoint records, in any order.
        checkpoint_type: ``"training"`` or ``"sampler"``.

    Returns:
        The newest checkpoint of that type, or None if there is none.
    """
    return max((c for c in checkpoints if c.checkpoint_type == checkpoint_type), key=checkpoint_order, default=None)


def expired(checkpoints: list[Checkpoint], now: datetime) -> list[Checkpoint]:
    """The checkpoints of one run that ``gc`` deletes at ``now``: expired, never public, never the newest
    training checkpoint (the run's resume point).

    Args:
        checkpoints: all committed checkpoints of one run.
        now: the time expiry is judged at.

    Returns:
        The checkpoints to delete (``expires_at`` at or before ``now``, less those kept), in the order given.
    """
    resume_point = newest(checkpoints, "training")
    return [c for c in checkpoints if kept_reason(c, now) is None and c != resume_point]


def kept_reason(checkpoint: Checkpoint, now: datetime) -> str | None:
    """Why ``gc`` keeps a checkpoint whatever else its run holds, or None if it is due at ``now``.

    ``gc`` asks again on the manifest current at the moment of each deletion, so a checkpoint published
    or given a new TTL since the scan stays.

    Args:
        checkpoint: a checkpoint record.
        now: the time expiry is judged at.

    Returns:
        The reason, for a log line, or None.
    """
    if checkpoint.public:
        return "it is published"
    if checkpoint.pinned:
        return "it is pinned"
    if checkpoint.expires_at is None:
        return "it has no TTL"
    if checkpoint.expires_at > now:
        return f"it expires at {checkpoint.expires_at.isoformat()}"
    return None
