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
    return [c for c in checkpoints if c.expires_at and c.expires_at <= now and not c.public and c != resume_point]
