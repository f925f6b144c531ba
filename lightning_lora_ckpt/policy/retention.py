"""Which checkpoints to keep, resume from or delete: pure functions of :class:`Checkpoint` records.

Nothing here touches storage, so every rule is unit-testable on hand-made records; the storage layer
acts on the decisions (Orbax's ``preservation_policy`` is the model). The rules themselves live in
:mod:`.rules` and are re-exported here: ``KeepLatest(2) | KeepBest("val_loss") | MaxBytes("50GB")``.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from datetime import datetime

from ..format.layout import CheckpointType
from ..format.records import Checkpoint
from .rules import (
    SIZE_UNITS,
    AnyOf,
    KeepBest,
    KeepEvery,
    KeepLatest,
    MaxBytes,
    Retention,
    Unit,
    parse_retention,
    parse_size,
    unit_key,
)

__all__ = [
    "SIZE_UNITS",
    "AnyOf",
    "KeepBest",
    "KeepEvery",
    "KeepLatest",
    "MaxBytes",
    "Retention",
    "RetentionPlan",
    "checkpoint_order",
    "expired",
    "kept_reason",
    "newest",
    "parse_retention",
    "parse_size",
    "plan_retention",
]

#: The reasons :func:`plan_retention` gives for what is kept whatever the rules say.
PUBLISHED, PINNED, RESUME_POINT = "published", "pinned", "newest training checkpoint"
#: The reason a prune keeps a snapshot that a live delta snapshot needs (judged when it is soft-deleted).
NEEDED_BY_DELTA = "needed by a delta snapshot"
#: The reason for what a :class:`MaxBytes` budget leaves because the run fits without deleting it.
FITS_BUDGET = "MaxBytes: fits the budget"


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
        The newest checkpoint of that type, or None if there is none (of two saved at the same step and
        time, the one with the greater path, so the answer does not depend on the listing's order).
    """
    return max((c for c in checkpoints if c.checkpoint_type == checkpoint_type), key=unit_key, default=None)


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


@dataclasses.dataclass(frozen=True)
class RetentionPlan:
    """What :func:`plan_retention` decided for one run; the storage layer acts on it.

    Attributes:
        keep: the checkpoints kept, in :func:`checkpoint_order` (ties by path).
        delete: the checkpoints to delete, in deletion order: oldest first (step, time, path).
        reasons: why each kept checkpoint is kept, by path: ``"published"``, ``"pinned"``,
            ``"newest training checkpoint"``, the repr of the first rule that keeps it (``"KeepLatest(2)"``,
            ``"KeepBest('val_loss', 1, 'min')"``) or ``"MaxBytes: fits the budget"``; in that precedence.
        over_budget: the always-kept and rule-kept checkpoints alone exceed the ``MaxBytes`` budget (they are
            kept all the same; the caller warns). False without a budget.
    """

    keep: list[Checkpoint]
    delete: list[Checkpoint]
    reasons: dict[str, str]
    over_budget: bool


def plan_retention(checkpoints: Sequence[Checkpoint], retention: Retention, together: bool = True) -> RetentionPlan:
    """Which checkpoints of one run ``retention`` keeps and which it deletes.

    Always kept, whatever the rules: published and pinned checkpoints and the run's newest training
    checkpoint (its resume point). Otherwise a checkpoint is kept if any rule of the combination keeps it.
    Without a :class:`MaxBytes` everything else is deleted; with one, everything else is deleted oldest first
    only until the run's total ``size_bytes`` fits the budget.

    With ``together`` (the default) the rules judge steps, not checkpoints: a step kept by a rule keeps all its
    checkpoints (sampler and training), ``KeepLatest(2)`` keeps the two newest steps, ``KeepBest`` reads the
    step's training checkpoint's metric (else its sampler checkpoint's), and a budget deletes the unkept
    checkpoints of a step all at once. Always-kept status stays with the one checkpoint, not its step. Without
    ``together`` each checkpoint type is judged on its own (``KeepLatest(2)`` keeps two of each type).

    Args:
        checkpoints: one run's committed checkpoints, in any order, each path once.
        retention: a rule or a combination of rules (``a | b``).
        together: judge the checkpoints of a step together (True) or each type apart (False).

    Returns:
        The plan: deterministic for a given set of checkpoints, whatever their order.

    Raises:
        ValueError: ``retention`` is not a :class:`Retention`, ``together`` not a bool, a path appears twice, or
            the checkpoints belong to more than one run.
    """
    if not isinstance(retention, Retention):
        raise ValueError(f"retention must be a Retention rule such as KeepLatest(2), got {retention!r}")
    if not isinstance(together, bool):
        raise ValueError(f"together must be a bool, got {together!r}")
    ordered = sorted(checkpoints, key=unit_key)
    paths = [c.path for c in ordered]
    if len(set(paths)) != len(paths):
        twice = sorted({p for p in paths if paths.count(p) > 1})
        raise ValueError(f"checkpoints must hold each path once, got twice: {', '.join(twice)}")
    if len({c.run_id for c in ordered}) > 1:
        runs = sorted({c.run_id for c in ordered})
        raise ValueError(f"checkpoints must be of one run, got runs {', '.join(runs)}")

    reasons = _always_kept(ordered)
    rules = retention.rules if isinstance(retention, AnyOf) else (retention,)
    for rule in rules:
        for checkpoint in _kept_by(rule, ordered, together):
            reasons.setdefault(checkpoint.path, repr(rule))
    unkept = [c for c in ordered if c.path not in reasons]
    budget = next((r for r in rules if isinstance(r, MaxBytes)), None)
    delete, over_budget = unkept, False
    if budget is not None:
        total = sum(c.size_bytes for c in ordered)
        over_budget = total - sum(c.size_bytes for c in unkept) > budget.limit
        delete = []
        groups = itertools.groupby(unkept, key=lambda c: c.step) if together else ((c.step, [c]) for c in unkept)
        for _, group in groups:
            if total <= budget.limit:
                break
            batch = list(group)
            delete += batch
            total -= sum(c.size_bytes for c in batch)
        doomed = {c.path for c in delete}
        reasons.update((c.path, FITS_BUDGET) for c in unkept if c.path not in doomed)
    keep = [c for c in ordered if c.path in reasons]
    return RetentionPlan(
        keep=keep, delete=delete, reasons={c.path: reasons[c.path] for c in keep}, over_budget=over_budget
    )


def _always_kept(ordered: list[Checkpoint]) -> dict[str, str]:
    """The reasons of the checkpoints kept whatever the rules say, by path."""
    resume_point = newest(ordered, "training")
    reasons: dict[str, str] = {}
    for checkpoint in ordered:
        if checkpoint.public:
            reasons[checkpoint.path] = PUBLISHED
        elif checkpoint.pinned:
            reasons[checkpoint.path] = PINNED
        elif resume_point is not None and checkpoint.path == resume_point.path:
            reasons[checkpoint.path] = RESUME_POINT
    return reasons


def _kept_by(rule: Retention, ordered: list[Checkpoint], together: bool) -> list[Checkpoint]:
    """The checkpoints one rule keeps on its own: of the run's steps, or of each checkpoint type apart."""
    if together:
        pools = [[Unit(step, tuple(group)) for step, group in itertools.groupby(ordered, key=lambda c: c.step)]]
    else:
        types = sorted({c.checkpoint_type for c in ordered})
        pools = [[Unit(c.step, (c,)) for c in ordered if c.checkpoint_type == t] for t in types]
    return [c for units in pools for i in sorted(rule.select(units)) for c in units[i].checkpoints]
