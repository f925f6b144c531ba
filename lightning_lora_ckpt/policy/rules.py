"""Retention rules: which checkpoints of a run a policy keeps, combinable with ``|`` (Orbax's preservation policies).

A rule judges *units*: with ``together=True`` a unit is one step (every checkpoint of that step, of both types),
otherwise one checkpoint, each checkpoint type judged on its own. :func:`~.retention.plan_retention` builds the
units, asks each rule which it keeps, and adds the checkpoints that are always kept; this module holds only the
rules and the parsing of CLI-style options into them.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import re
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Literal

from ..format.records import Checkpoint

Mode = Literal["min", "max"]

#: Bytes per unit of a size string (case-insensitive): decimal SI and binary IEC units.
SIZE_UNITS: dict[str, int] = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)", re.IGNORECASE)


def unit_key(checkpoint: Checkpoint) -> tuple[int, datetime, str]:
    """The total order the rules rank checkpoints by: step, then save time, then path (the unique id).

    Args:
        checkpoint: a checkpoint record.

    Returns:
        (step, time, path).
    """
    return (checkpoint.step, checkpoint.time, checkpoint.path)


@dataclasses.dataclass(frozen=True)
class Unit:
    """What a rule judges: one step's checkpoints (judged together) or a single checkpoint.

    Attributes:
        step: the step of its checkpoints.
        checkpoints: its checkpoints, in :func:`unit_key` order (at least one).
    """

    step: int
    checkpoints: tuple[Checkpoint, ...]

    def metric(self, name: str) -> float | None:
        """The unit's value of a metric: a training checkpoint's if one has it, else a sampler checkpoint's; the
        newest such checkpoint's if several have it. A non-number or NaN counts as absent.

        Args:
            name: the metric's name.

        Returns:
            The value, or None if no checkpoint of the unit has it.
        """
        best: tuple[bool, tuple[int, datetime, str]] | None = None
        found: float | None = None
        for checkpoint in self.checkpoints:
            value = checkpoint.metrics.get(name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
                continue
            rank = (checkpoint.checkpoint_type == "training", unit_key(checkpoint))
            if best is None or rank > best:
                best, found = rank, float(value)
        return found


class Retention(abc.ABC):
    """The base of every retention rule; rules combine with ``|`` (a checkpoint is kept if any rule keeps it)."""

    def __or__(self, other: Retention) -> Retention:
        """The combination of two rules: kept by either.

        Args:
            other: another rule or combination.

        Returns:
            A flat :class:`AnyOf` of both (or the one rule, if they are the same); of two :class:`MaxBytes`
            only the smaller stays (see :class:`AnyOf`).
        """
        if not isinstance(other, Retention):
            return NotImplemented
        combined = AnyOf((self, other))
        return combined.rules[0] if len(combined.rules) == 1 else combined

    @abc.abstractmethod
    def select(self, units: Sequence[Unit]) -> set[int]:
        """Which units the rule keeps.

        Args:
            units: the units of one run (or of one checkpoint type), oldest first, steps ascending.

        Returns:
            The indices into ``units`` of the kept ones.
        """


@dataclasses.dataclass(frozen=True, repr=False)
class KeepLatest(Retention):
    """Keeps the ``n`` newest units (steps, or checkpoints of each type): by step, then save time.

    Args:
        n: how many to keep, an int >= 1.

    Raises:
        ValueError: ``n`` is not an int >= 1.
    """

    n: int

    def __post_init__(self) -> None:
        check_count("n", self.n)

    def select(self, units: Sequence[Unit]) -> set[int]:
        return set(range(max(0, len(units) - self.n), len(units)))

    def __repr__(self) -> str:
        return f"KeepLatest({self.n})"


@dataclasses.dataclass(frozen=True, repr=False)
class KeepEvery(Retention):
    """Keeps the units whose step is divisible by ``n_steps`` (step 0 included), like Orbax's ``EveryNSteps``.

    Args:
        n_steps: the period in steps, an int >= 1.

    Raises:
        ValueError: ``n_steps`` is not an int >= 1.
    """

    n_steps: int

    def __post_init__(self) -> None:
        check_count("n_steps", self.n_steps)

    def select(self, units: Sequence[Unit]) -> set[int]:
        return {i for i, u in enumerate(units) if u.step % self.n_steps == 0}

    def __repr__(self) -> str:
        return f"KeepEvery({self.n_steps})"


@dataclasses.dataclass(frozen=True, repr=False)
class KeepBest(Retention):
    """Keeps the ``n`` units best by a metric; keeps nothing that lacks it (absent, not a number, or NaN).

    A step judged together takes its training checkpoint's value (else its sampler checkpoint's). Between equal
    values the newer unit wins.

    Args:
        metric: the metric's name (a key of :attr:`Checkpoint.metrics`), non-empty.
        n: how many to keep, an int >= 1.
        mode: ``"min"`` (lower is better, e.g. a loss) or ``"max"``.

    Raises:
        ValueError: ``metric`` is not a non-empty str, ``n`` not an int >= 1, or ``mode`` not min/max.
    """

    metric: str
    n: int = 1
    mode: Mode = "min"

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError(f"metric must be a non-empty str, got {self.metric!r}")
        check_count("n", self.n)
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {self.mode!r}")

    def select(self, units: Sequence[Unit]) -> set[int]:
        sign = 1.0 if self.mode == "min" else -1.0
        scored = [(sign * v, -i) for i, u in enumerate(units) if (v := u.metric(self.metric)) is not None]
        return {-neg_i for _, neg_i in sorted(scored)[: self.n]}

    def __repr__(self) -> str:
        return f"KeepBest({self.metric!r}, {self.n}, {self.mode!r})"


@dataclasses.dataclass(frozen=True, repr=False, init=False)
class MaxBytes(Retention):
    """A byte budget per run: checkpoints no other rule keeps are deleted oldest first until the run fits.

    It keeps nothing by itself (:meth:`select` is empty); alone, it keeps whatever fits. When the always-kept
    and rule-kept checkpoints alone exceed it, they are kept anyway and the plan says ``over_budget``.

    Args:
        limit: bytes as an int >= 0, or a size string: ``"123"``, ``"500MB"``, ``"1.5GiB"`` (decimal
            KB/MB/GB/TB, binary KiB/MiB/GiB/TiB, B; case-insensitive; fractions rounded down to whole bytes).

    Attributes:
        limit: the budget in bytes (two budgets are equal when their byte counts are).
        text: the limit as given, for the repr (``MaxBytes('50GB')``, ``MaxBytes(1000)``).

    Raises:
        ValueError: ``limit`` is negative, not an int or a size string, or names an unknown unit.
    """

    limit: int
    text: str = dataclasses.field(compare=False)

    def __init__(self, limit: int | str) -> None:
        object.__setattr__(self, "limit", parse_size(limit))
        object.__setattr__(self, "text", repr(limit) if isinstance(limit, str) else str(limit))

    def select(self, units: Sequence[Unit]) -> set[int]:
        return set()

    def __repr__(self) -> str:
        return f"MaxBytes({self.text})"


@dataclasses.dataclass(frozen=True, repr=False)
class AnyOf(Retention):
    """A combination of rules (what ``a | b | c`` builds): a checkpoint is kept if any rule keeps it.

    Nested combinations are flattened, repeated rules dropped (first one kept). At most one :class:`MaxBytes`
    remains: of several, the smallest, since keeping within it keeps within all of them.

    Args:
        rules: the rules, at least one.

    Raises:
        ValueError: ``rules`` is empty or holds something that is not a :class:`Retention`.
    """

    rules: tuple[Retention, ...]

    def __post_init__(self) -> None:
        flat: list[Retention] = []
        for rule in self.rules:
            if not isinstance(rule, Retention):
                raise ValueError(f"rules must be Retention rules, got {rule!r}")
            for r in rule.rules if isinstance(rule, AnyOf) else (rule,):
                if r not in flat:
                    flat.append(r)
        budgets = [r for r in flat if isinstance(r, MaxBytes)]
        if budgets:
            smallest = min(budgets, key=lambda b: b.limit)
            flat = [r for r in flat if not isinstance(r, MaxBytes) or r is smallest]
        if not flat:
            raise ValueError("rules must hold at least one rule")
        object.__setattr__(self, "rules", tuple(flat))

    @property
    def budget(self) -> MaxBytes | None:
        """The combination's :class:`MaxBytes`, or None."""
        return next((r for r in self.rules if isinstance(r, MaxBytes)), None)

    def select(self, units: Sequence[Unit]) -> set[int]:
        return set().union(*(r.select(units) for r in self.rules))

    def __repr__(self) -> str:
        return " | ".join(map(repr, self.rules))


def check_count(name: str, value: object) -> None:
    """Refuse what is not an int >= 1 (a bool included).

    Args:
        name: the argument's name, for the message.
        value: its value.

    Raises:
        ValueError: naming ``name``.
    """
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def parse_size(limit: int | str) -> int:
    """Bytes from an int or a size string (``"50GB"``, ``"1.5GiB"``, ``"500 MB"``, ``"123"``).

    Args:
        limit: an int >= 0 or a size string (decimal KB/MB/GB/TB, binary KiB/MiB/GiB/TiB, B; case-insensitive).

    Returns:
        The size in bytes, fractions rounded down.

    Raises:
        ValueError: naming ``limit``: negative, a bool, not an int or str, or a string that is not a size.
    """
    if isinstance(limit, int) and not isinstance(limit, bool):
        if limit < 0:
            raise ValueError(f"limit must be >= 0 bytes, got {limit!r}")
        return limit
    if not isinstance(limit, str):
        raise ValueError(f"limit must be an int of bytes or a size string such as '50GB', got {limit!r}")
    match = _SIZE.fullmatch(limit.strip())
    unit = match[2].lower() if match else ""
    if not match or (unit and unit not in SIZE_UNITS):
        units = "/".join(u.upper().replace("I", "i") for u in SIZE_UNITS)
        raise ValueError(f"limit must be a size such as '50GB' or '1.5GiB' (units {units}), got {limit!r}")
    return int(Decimal(match[1]) * SIZE_UNITS[unit or "b"])


def parse_retention(
    keep_latest: int | None = None,
    keep_every: int | None = None,
    keep_best: Sequence[str] = (),
    max_bytes: int | str | None = None,
) -> Retention:
    """The rule that CLI-style options ask for (``prune --keep-latest N --keep-every N --keep-best M:MODE:N
    --max-bytes B``), combined with ``|`` in that order.

    Args:
        keep_latest: ``KeepLatest(keep_latest)``, or None.
        keep_every: ``KeepEvery(keep_every)``, or None.
        keep_best: items ``"METRIC:MODE:N"`` (e.g. ``"val_loss:min:2"``); ``"METRIC:MODE"`` and ``"METRIC"``
            take n=1 and mode=min as :class:`KeepBest` does. A lone str counts as one item.
        max_bytes: ``MaxBytes(max_bytes)``, or None.

    Returns:
        The one rule, or an :class:`AnyOf` of them.

    Raises:
        ValueError: a bad value, naming the option (or the bad ``keep_best`` item); or no option given.
    """
    rules: list[Retention] = []
    if keep_latest is not None:
        check_count("keep_latest", keep_latest)
        rules.append(KeepLatest(keep_latest))
    if keep_every is not None:
        check_count("keep_every", keep_every)
        rules.append(KeepEvery(keep_every))
    for item in [keep_best] if isinstance(keep_best, str) else keep_best:
        rules.append(_parse_best(item))
    if max_bytes is not None:
        try:
            rules.append(MaxBytes(max_bytes))
        except ValueError as err:
            raise ValueError(f"max_bytes: {err}") from None
    if not rules:
        raise ValueError("no retention rule given: pass keep_latest, keep_every, keep_best or max_bytes")
    return rules[0] if len(rules) == 1 else AnyOf(tuple(rules))


def _parse_best(item: object) -> KeepBest:
    """``KeepBest`` from ``"METRIC[:MODE[:N]]"``."""
    if not isinstance(item, str):
        raise ValueError(f"keep_best item must be a str 'METRIC:MODE:N', got {item!r}")
    parts = item.split(":")
    if len(parts) > 3 or not parts[0]:
        raise ValueError(f"keep_best item {item!r} is not 'METRIC:MODE:N' (e.g. 'val_loss:min:2')")
    mode = parts[1] if len(parts) > 1 else "min"
    if mode not in ("min", "max"):
        raise ValueError(f"keep_best item {item!r}: MODE must be 'min' or 'max', got {mode!r}")
    count = parts[2] if len(parts) > 2 else "1"
    if not (count.isascii() and count.isdigit()) or int(count) < 1:
        raise ValueError(f"keep_best item {item!r}: N must be an int >= 1, got {count!r}")
    return KeepBest(parts[0], int(count), "min" if mode == "min" else "max")
