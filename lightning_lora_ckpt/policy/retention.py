"""Which checkpoints to keep, resume from or delete: pure functions of :class:`Checkpoint` records.

Nothing here touches storage, so every rule is unit-testable on hand-made records; the storage layer
acts on the decisions (Orbax's ``preservation_policy`` is the model).
"""

from __future__ import annotations

from datetime import datetime

from ..format.layout import CheckpointType
from ..format.records import Checkpoint


def checkpoint_order(checkpoint: Checkpoint) -> tuple[int, datetime]:
    """The sort key of a run's checkpoints: by step, then by save time."""
    return (checkpoint.step, checkpoint.time)


def newest(checkpoints: list[Checkpoint], checkpoint_type: CheckpointType) -> Checkpoint | None:
    """The newest checkpoint of ``checkpoint_type`` (highest step, then latest), or None."""
    return max((c for c in checkpoints if c.checkpoint_type == checkpoint_type), key=checkpoint_order, default=None)


def expired(checkpoints: list[Checkpoint], now: datetime) -> list[Checkpoint]:
    """The checkpoints of one run that ``gc`` deletes at ``now``: expired, never public, never the newest
    training checkpoint (the run's resume point)."""
    resume_point = newest(checkpoints, "training")
    return [c for c in checkpoints if c.expires_at and c.expires_at <= now and not c.public and c != resume_point]
