"""The retention policy layer (``policy/retention.py``, ``policy/rules.py``): pure decisions over hand-made
:class:`Checkpoint` records, no storage. Unit tests per rule and for the option parsing, then hypothesis
properties over random runs: the always-kept survive, the result is the union of the rules, the budget holds
whenever it can, deletions go oldest first and ``together`` keeps steps whole."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_lora_ckpt.format.layout import TYPE_DIRS, CheckpointType
from lightning_lora_ckpt.format.records import Checkpoint
from lightning_lora_ckpt.policy.retention import (
    AnyOf,
    KeepBest,
    KeepEvery,
    KeepLatest,
    MaxBytes,
    Retention,
    RetentionPlan,
    checkpoint_order,
    expired,
    kept_reason,
    newest,
    parse_retention,
    plan_retention,
)
from lightning_lora_ckpt.policy.rules import parse_size

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


def ckpt(
    step: int,
    kind: CheckpointType = "training",
    *,
    size: int = 100,
    public: bool = False,
    pinned: bool = False,
    metrics: dict[str, float] | None = None,
    name: str | None = None,
    seconds: float | None = None,
    expires_at: datetime | None = None,
    run_id: str = "run",
) -> Checkpoint:
    """A committed checkpoint record as the store lists it; saved ``seconds`` after T0 (default: the step)."""
    name = name or f"step-{step:06d}"
    folder = f"{TYPE_DIRS[kind]}/{name}"
    return Checkpoint(
        checkpoint_id=folder,
        checkpoint_type=kind,
        time=T0 + timedelta(seconds=step if seconds is None else seconds),
        path=f"lora://{run_id}/{folder}",
        size_bytes=size,
        public=public,
        expires_at=expires_at,
        step=step,
        base_model="Qwen/Qwen3-0.6B",
        lora_rank=8,
        run_id=run_id,
        metrics=metrics or {},
        pinned=pinned,
    )


def both(step: int, size: int = 100, **metrics: float) -> list[Checkpoint]:
    """A training and a sampler checkpoint of one step, the training one carrying ``metrics``."""
    return [ckpt(step, "training", size=size, metrics=metrics), ckpt(step, "sampler", size=size)]


def kept_steps(plan: RetentionPlan, kind: CheckpointType | None = None) -> list[int]:
    return [c.step for c in plan.keep if kind is None or c.checkpoint_type == kind]


def paths(checkpoints: Sequence[Checkpoint]) -> set[str]:
    return {c.path for c in checkpoints}


# --- the rules, one by one ---------------------------------------------------------------------------------------


def test_keep_latest_keeps_the_newest_steps_with_all_their_checkpoints() -> None:
    run = [c for s in (10, 20, 30, 40) for c in both(s)]
    plan = plan_retention(run, KeepLatest(2))
    assert kept_steps(plan) == [30, 30, 40, 40]
    # oldest first; within a step by time, then path (sampler_weights/... sorts before weights/...)
    assert [(c.step, c.checkpoint_type) for c in plan.delete] == [
        (10, "sampler"),
        (10, "training"),
        (20, "sampler"),
        (20, "training"),
    ]
    assert plan.reasons[ckpt(40).path] == "newest training checkpoint"
    assert plan.reasons[ckpt(40, "sampler").path] == "KeepLatest(2)"
    assert plan.reasons[ckpt(30).path] == "KeepLatest(2)"
    assert not plan.over_budget


def test_keep_latest_apart_keeps_n_of_each_type() -> None:
    run = [ckpt(s) for s in (10, 20, 30, 40)] + [ckpt(s, "sampler") for s in (5, 15, 25)]
    plan = plan_retention(run, KeepLatest(2), together=False)
    assert kept_steps(plan, "training") == [30, 40]
    assert kept_steps(plan, "sampler") == [15, 25]
    together = plan_retention(run, KeepLatest(2))  # steps 30 and 40: no sampler checkpoint among them
    assert kept_steps(together) == [30, 40]


def test_keep_latest_orders_by_step_then_time_then_path() -> None:
    run = [ckpt(7, name="a", seconds=100), ckpt(7, name="b", seconds=50), ckpt(3, name="c", seconds=500)]
    plan = plan_retention(run, KeepLatest(1), together=False)
    assert [c.checkpoint_id for c in plan.keep] == ["weights/a"]  # the newest training one: step 7, t=100
    tie = [ckpt(7, name="x", seconds=9), ckpt(7, name="y", seconds=9), ckpt(1, "sampler")]
    assert newest(tie, "training").checkpoint_id == "weights/y"  # type: ignore[union-attr]
    assert newest(list(reversed(tie)), "training").checkpoint_id == "weights/y"  # type: ignore[union-attr]


def test_keep_every_keeps_steps_divisible_by_n_step_zero_included() -> None:
    run = [c for s in (0, 50, 100, 150, 200, 230) for c in both(s)]
    plan = plan_retention(run, KeepEvery(100))
    assert kept_steps(plan, "sampler") == [0, 100, 200]
    assert kept_steps(plan, "training") == [0, 100, 200, 230]  # 230: the resume point
    assert plan.reasons[ckpt(100, "sampler").path] == "KeepEvery(100)"


def test_keep_best_min_and_max_skip_what_lacks_the_metric() -> None:
    losses = {10: 0.9, 20: 0.3, 30: float("nan"), 40: 0.5, 50: 0.4}
    run = [ckpt(s, metrics={"val_loss": v}) for s, v in losses.items()] + [ckpt(60), ckpt(70, metrics={"acc": 1})]
    best = plan_retention(run, KeepBest("val_loss", 2))
    assert kept_steps(best) == [20, 50, 70]  # 70: the resume point
    worst = plan_retention(run, KeepBest("val_loss", 2, "max"))
    assert kept_steps(worst) == [10, 40, 70]  # NaN (step 30) ranks as absent
    plenty = plan_retention(run, KeepBest("val_loss", 10))
    assert kept_steps(plenty) == [10, 20, 40, 50, 70]  # nothing lacking the metric is kept by the rule
    assert plenty.reasons[ckpt(10).path] == "KeepBest('val_loss', 10, 'min')"


def test_keep_best_ties_go_to_the_newer_and_infinities_rank() -> None:
    run = [ckpt(s, metrics={"m": v}) for s, v in ((1, 0.5), (2, 0.5), (3, float("inf")), (4, -math.inf))]
    run.append(ckpt(9))
    assert kept_steps(plan_retention(run, KeepBest("m", 2))) == [2, 4, 9]
    assert kept_steps(plan_retention(run, KeepBest("m", 1, "max"))) == [3, 9]
    assert kept_steps(plan_retention(run, KeepBest("m", 2, "max"))) == [2, 3, 9]


def test_keep_best_together_reads_the_training_checkpoints_metric() -> None:
    run = [
        ckpt(10, metrics={"val_loss": 0.9}),
        ckpt(10, "sampler", metrics={"val_loss": 0.1}),  # disagrees: the training one's value counts
        ckpt(20, "sampler", metrics={"val_loss": 0.5}),  # no training checkpoint: the sampler's value counts
        ckpt(30, metrics={"val_loss": 0.7}),
        ckpt(40),
    ]
    plan = plan_retention(run, KeepBest("val_loss", 1))
    assert [(c.step, c.checkpoint_type) for c in plan.keep] == [(20, "sampler"), (40, "training")]
    apart = plan_retention(run, KeepBest("val_loss", 1), together=False)  # each type its own best
    assert [(c.step, c.checkpoint_type) for c in apart.keep] == [(10, "sampler"), (30, "training"), (40, "training")]


def test_always_kept_whatever_the_rules_but_not_their_step_mates() -> None:
    run = [
        ckpt(10, "sampler", public=True),
        ckpt(10),
        ckpt(20, pinned=True),
        ckpt(20, "sampler"),
        ckpt(30, "sampler", public=True, pinned=True),
        ckpt(40),
        ckpt(40, "sampler"),
        ckpt(50, "sampler"),
    ]
    plan = plan_retention(run, KeepLatest(1))
    assert plan.reasons == {
        ckpt(10, "sampler").path: "published",
        ckpt(20).path: "pinned",
        ckpt(30, "sampler").path: "published",
        ckpt(40).path: "newest training checkpoint",
        ckpt(50, "sampler").path: "KeepLatest(1)",
    }
    assert [(c.step, c.checkpoint_type) for c in plan.delete] == [(10, "training"), (20, "sampler"), (40, "sampler")]


def test_combined_rules_keep_the_union_and_name_the_first_rule() -> None:
    losses = [0.9, 0.8, 0.2, 0.7, 0.6, 0.1, 0.5, 0.4, 0.3, 0.35]  # steps 0, 10, ..., 90
    run = [ckpt(10 * i, metrics={"val_loss": v}) for i, v in enumerate(losses)]
    rule = KeepLatest(2) | KeepEvery(50) | KeepBest("val_loss", 2)
    plan = plan_retention(run, rule)
    assert kept_steps(plan) == [0, 20, 50, 80, 90]  # best two: 50 (0.1), 20 (0.2)
    assert plan.reasons[ckpt(80).path] == "KeepLatest(2)"
    assert plan.reasons[ckpt(50).path] == "KeepEvery(50)"  # kept by two rules: the first one named
    assert plan.reasons[ckpt(20).path] == "KeepBest('val_loss', 2, 'min')"
    assert plan.reasons[ckpt(90).path] == "newest training checkpoint"


def test_or_flattens_dedupes_and_keeps_the_smaller_budget() -> None:
    a, b, c = KeepLatest(2), KeepEvery(10), KeepBest("val_loss", 1)
    combo = a | b | c
    assert isinstance(combo, AnyOf) and combo.rules == (a, b, c)
    assert (a | (b | c)) == combo and ((a | b) | (b | c)).rules == (a, b, c)
    assert a | KeepLatest(2) == a
    budget = a | MaxBytes("50GB") | MaxBytes(10**9) | MaxBytes("2GB")
    assert isinstance(budget, AnyOf) and budget.budget == MaxBytes(10**9)
    assert [r for r in budget.rules if isinstance(r, MaxBytes)] == [MaxBytes("1GB")]
    assert repr(combo) == "KeepLatest(2) | KeepEvery(10) | KeepBest('val_loss', 1, 'min')"
    assert repr(MaxBytes("50GB")) == "MaxBytes('50GB')" and repr(MaxBytes(123)) == "MaxBytes(123)"
    assert repr(KeepBest("acc", 3, "max")) == "KeepBest('acc', 3, 'max')"
    with pytest.raises(TypeError):
        _ = a | 3  # type: ignore[operator]
    with pytest.raises(ValueError, match="at least one"):
        AnyOf(())
    with pytest.raises(ValueError, match="rules must be Retention"):
        AnyOf((a, "KeepLatest(2)"))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Retention()  # type: ignore[abstract]


# --- MaxBytes --------------------------------------------------------------------------------------------------


def test_max_bytes_deletes_the_oldest_unkept_until_the_run_fits() -> None:
    run = [ckpt(s, size=100) for s in range(1, 11)]  # 1000 bytes
    plan = plan_retention(run, MaxBytes(650))
    assert [c.step for c in plan.delete] == [1, 2, 3, 4]  # 600 left
    assert plan.reasons[ckpt(5).path] == "MaxBytes: fits the budget"
    assert not plan.over_budget
    assert plan_retention(run, MaxBytes(1000)).delete == []
    assert [c.step for c in plan_retention(run, MaxBytes(999)).delete] == [1]


def test_max_bytes_with_rules_spares_the_rule_kept() -> None:
    run = [ckpt(s, size=100, metrics={"val_loss": 0.1 if s == 2 else 1.0}) for s in range(1, 11)]
    plan = plan_retention(run, KeepBest("val_loss") | KeepLatest(2) | MaxBytes(500))
    assert [c.step for c in plan.delete] == [1, 3, 4, 5, 6]
    assert kept_steps(plan) == [2, 7, 8, 9, 10]
    assert plan.reasons[ckpt(7).path] == "MaxBytes: fits the budget"


def test_max_bytes_over_budget_keeps_the_kept_and_says_so() -> None:
    run = [ckpt(1, size=500, public=True), ckpt(2, size=500, pinned=True), ckpt(3, size=10), ckpt(4, size=500)]
    plan = plan_retention(run, MaxBytes("1KB"))
    assert plan.over_budget
    assert [c.step for c in plan.delete] == [3]
    assert kept_steps(plan) == [1, 2, 4]
    fits = plan_retention(run, MaxBytes("1.6KB"))
    assert not fits.over_budget and [c.step for c in fits.delete] == []


def test_max_bytes_together_deletes_whole_steps() -> None:
    run = [c for s in (1, 2, 3, 4) for c in both(s, size=100)]  # 800 bytes
    plan = plan_retention(run, MaxBytes(650))
    assert [(c.step, c.checkpoint_type) for c in plan.delete] == [(1, "sampler"), (1, "training")]  # 600 left
    apart = plan_retention(run, MaxBytes(750), together=False)
    assert [(c.step, c.checkpoint_type) for c in apart.delete] == [(1, "sampler")]  # one at a time: 700 left
    assert [(c.step, c.checkpoint_type) for c in plan_retention(run, MaxBytes(750)).delete] == [
        (1, "sampler"),
        (1, "training"),
    ]
    # a step with an always-kept checkpoint: its other checkpoints still go, as one unit
    pinned = [ckpt(1, size=100, pinned=True), ckpt(1, "sampler", size=100), *both(2), *both(3)]
    plan = plan_retention(pinned, MaxBytes(450))
    assert [(c.step, c.checkpoint_type) for c in plan.delete] == [(1, "sampler"), (2, "sampler"), (2, "training")]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("123", 123),
        (123, 123),
        (0, 0),
        ("0", 0),
        ("10KB", 10_000),
        ("500MB", 500_000_000),
        ("50GB", 50 * 10**9),
        ("2TB", 2 * 10**12),
        ("1.5GiB", 1_610_612_736),
        ("1KiB", 1024),
        ("3MiB", 3 * 2**20),
        ("1TiB", 2**40),
        ("50gb", 50 * 10**9),
        ("1.5gib", 1_610_612_736),
        (" 500 MB ", 500_000_000),
        ("7B", 7),
        ("1.9", 1),
        (".5KB", 500),
    ],
)
def test_max_bytes_parses_sizes(text: int | str, expected: int) -> None:
    assert parse_size(text) == expected
    assert MaxBytes(text).limit == expected


@pytest.mark.parametrize("bad", ["", "GB", "50 XB", "50PB", "-5", "1e9", "5 0GB", "50GB!", "nan", -1, True, 1.5, None])
def test_max_bytes_refuses_what_is_not_a_size(bad: object) -> None:
    with pytest.raises(ValueError, match="limit") as err:
        MaxBytes(bad)  # type: ignore[arg-type]
    assert repr(bad) in str(err.value) and "\n" not in str(err.value)


# --- argument checks and parse_retention -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "argument"),
    [
        (lambda: KeepLatest(0), "n"),
        (lambda: KeepLatest(True), "n"),
        (lambda: KeepLatest(2.0), "n"),
        (lambda: KeepLatest("2"), "n"),
        (lambda: KeepEvery(0), "n_steps"),
        (lambda: KeepEvery(-10), "n_steps"),
        (lambda: KeepEvery(False), "n_steps"),
        (lambda: KeepBest(""), "metric"),
        (lambda: KeepBest(None), "metric"),
        (lambda: KeepBest("val_loss", 0), "n"),
        (lambda: KeepBest("val_loss", True), "n"),
        (lambda: KeepBest("val_loss", 1, "mean"), "mode"),
    ],
)
def test_rules_refuse_bad_arguments_naming_them(make, argument: str) -> None:
    with pytest.raises(ValueError, match=rf"^{argument} must") as err:
        make()
    assert "\n" not in str(err.value)


def test_parse_retention_builds_the_rules_in_order() -> None:
    assert parse_retention(keep_latest=3) == KeepLatest(3)
    rule = parse_retention(keep_latest=2, keep_every=100, keep_best=["val_loss:min:2", "acc:max:1"], max_bytes="5GB")
    assert isinstance(rule, AnyOf)
    best = (KeepBest("val_loss", 2), KeepBest("acc", 1, "max"))
    assert rule.rules == (KeepLatest(2), KeepEvery(100), *best, MaxBytes(5 * 10**9))
    assert repr(rule) == (
        "KeepLatest(2) | KeepEvery(100) | KeepBest('val_loss', 2, 'min') | KeepBest('acc', 1, 'max') | MaxBytes('5GB')"
    )
    assert parse_retention(keep_best=["val_loss"]) == KeepBest("val_loss", 1, "min")
    assert parse_retention(keep_best=["acc:max"]) == KeepBest("acc", 1, "max")
    assert parse_retention(keep_best="val/loss:min:3") == KeepBest("val/loss", 3, "min")  # a lone str: one item
    assert parse_retention(max_bytes=1000) == MaxBytes(1000)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({}, "no retention rule"),
        ({"keep_latest": 0}, "keep_latest"),
        ({"keep_latest": True}, "keep_latest"),
        ({"keep_every": -1}, "keep_every"),
        ({"keep_best": ["val_loss:median:2"]}, "'val_loss:median:2'"),
        ({"keep_best": ["val_loss:min:0"]}, "'val_loss:min:0'"),
        ({"keep_best": ["val_loss:min:two"]}, "'val_loss:min:two'"),
        ({"keep_best": ["val_loss:min:2:x"]}, "'val_loss:min:2:x'"),
        ({"keep_best": [":min:2"]}, "':min:2'"),
        ({"keep_best": [""]}, "''"),
        ({"keep_best": [3]}, "3"),
        ({"max_bytes": "lots"}, "max_bytes"),
        ({"max_bytes": -1}, "max_bytes"),
    ],
)
def test_parse_retention_refuses_bad_options_naming_them(kwargs: dict, named: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_retention(**kwargs)
    assert named in str(err.value) and "\n" not in str(err.value)


def test_plan_retention_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="retention must be"):
        plan_retention([ckpt(1)], "KeepLatest(2)")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="together must be"):
        plan_retention([ckpt(1)], KeepLatest(1), together=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="each path once"):
        plan_retention([ckpt(1), ckpt(1)], KeepLatest(1))
    with pytest.raises(ValueError, match="one run"):
        plan_retention([ckpt(1), ckpt(2, run_id="other")], KeepLatest(1))


def test_empty_run_and_sampler_only_run() -> None:
    assert plan_retention([], KeepLatest(1) | MaxBytes(0)) == RetentionPlan([], [], {}, False)
    run = [ckpt(s, "sampler") for s in (1, 2, 3)]  # no training checkpoint: no resume point to keep
    assert [c.step for c in plan_retention(run, KeepLatest(1)).delete] == [1, 2]
    assert [c.step for c in plan_retention(run, MaxBytes(0)).delete] == [1, 2, 3]


def test_the_older_helpers_still_work() -> None:
    now = T0 + timedelta(days=10)
    past, future = T0, T0 + timedelta(days=20)
    run = [
        ckpt(1, expires_at=past),
        ckpt(2, expires_at=past, public=True),
        ckpt(3, expires_at=past, pinned=True),
        ckpt(4, expires_at=future),
        ckpt(5),
        ckpt(6, "sampler", expires_at=past),
        ckpt(7, expires_at=past),
    ]
    assert [c.step for c in expired(run, now)] == [1, 6]  # 7 is the resume point
    assert kept_reason(run[1], now) == "it is published" and kept_reason(run[2], now) == "it is pinned"
    assert kept_reason(run[4], now) == "it has no TTL" and kept_reason(run[0], now) is None
    assert checkpoint_order(run[3]) == (4, T0 + timedelta(seconds=4))
    assert newest(run, "sampler") == run[5] and newest([], "training") is None


# --- properties over random runs -------------------------------------------------------------------------------

METRIC = "val_loss"


@st.composite
def runs(draw: st.DrawFn) -> list[Checkpoint]:
    """One run: steps 0..30 (several checkpoints of a type at a step allowed), times that may tie, sizes, the
    metric present or absent (or NaN, or on a sampler only), and some published or pinned checkpoints."""
    count = draw(st.integers(0, 14))
    out = []
    for i in range(count):
        step = draw(st.integers(0, 30))
        metric = draw(st.one_of(st.none(), st.floats(-5, 5), st.sampled_from([math.nan, math.inf, 0.5])))
        out.append(
            ckpt(
                step,
                draw(st.sampled_from(["training", "sampler"])),
                size=draw(st.integers(0, 1000)),
                public=draw(st.integers(0, 9)) == 0,
                pinned=draw(st.integers(0, 9)) == 0,
                metrics={} if metric is None else {METRIC: metric},
                name=f"c{i}",
                seconds=step * 10 + draw(st.integers(0, 3)),
            )
        )
    return out


plain_rules = st.one_of(
    st.builds(KeepLatest, st.integers(1, 5)),
    st.builds(KeepEvery, st.integers(1, 12)),
    st.builds(KeepBest, st.just(METRIC), st.integers(1, 4), st.sampled_from(["min", "max"])),
    st.builds(KeepBest, st.just("absent"), st.integers(1, 2)),
)


def always_kept(run: Sequence[Checkpoint]) -> set[str]:
    """The reference: published, pinned, and the newest training checkpoint by (step, time, path)."""
    training = [c for c in run if c.checkpoint_type == "training"]
    resume = {max(training, key=lambda c: (c.step, c.time, c.path)).path} if training else set()
    return {c.path for c in run if c.public or c.pinned} | resume


def check_shape(run: Sequence[Checkpoint], plan: RetentionPlan) -> None:
    """keep and delete partition the run, both in (step, time, path) order, a reason for every kept one."""
    order = sorted(run, key=lambda c: (c.step, c.time, c.path))
    assert paths(plan.keep) | paths(plan.delete) == paths(run)
    assert not paths(plan.keep) & paths(plan.delete)
    assert len(plan.keep) + len(plan.delete) == len(run)
    assert plan.keep == [c for c in order if c.path in paths(plan.keep)]
    assert plan.delete == [c for c in order if c.path in paths(plan.delete)]
    assert set(plan.reasons) == paths(plan.keep)


@settings(max_examples=150, deadline=None)
@given(run=runs(), rules=st.lists(plain_rules, min_size=1, max_size=4), together=st.booleans())
def test_property_kept_is_the_always_kept_plus_the_union_of_the_rules(run, rules, together) -> None:
    combo = AnyOf(tuple(rules))
    plan = plan_retention(run, combo, together)
    check_shape(run, plan)
    assert always_kept(run) <= paths(plan.keep)
    alone = set().union(*(paths(plan_retention(run, r, together).keep) for r in rules))
    assert paths(plan.keep) == always_kept(run) | alone
    assert not plan.over_budget
    assert all(plan.reasons[p] in ("published", "pinned", "newest training checkpoint") for p in always_kept(run))
    assert all(plan.reasons[p] in map(repr, combo.rules) for p in paths(plan.keep) - always_kept(run))


@settings(max_examples=150, deadline=None)
@given(run=runs(), rules=st.lists(plain_rules, max_size=3), fraction=st.floats(0, 1.3), together=st.booleans())
def test_property_budget_holds_whenever_it_can_deleting_oldest_first(run, rules, fraction, together) -> None:
    total = sum(c.size_bytes for c in run)
    limit = int(total * fraction)
    plan = plan_retention(run, AnyOf((*rules, MaxBytes(limit))), together)
    check_shape(run, plan)
    forced = always_kept(run).union(*(paths(plan_retention(run, r, together).keep) for r in rules))
    forced_bytes = sum(c.size_bytes for c in run if c.path in forced)
    assert forced <= paths(plan.keep)
    left = sum(c.size_bytes for c in plan.keep)
    unkept = sorted((c for c in run if c.path not in forced), key=lambda c: (c.step, c.time, c.path))
    if forced_bytes <= limit:
        assert left <= limit and not plan.over_budget
    else:
        assert plan.over_budget and paths(plan.delete) == paths(unkept)
    # oldest first: the deleted are a prefix of the unkept (whole steps when together), and no more than needed
    assert plan.delete == unkept[: len(plan.delete)]
    if plan.delete and not plan.over_budget:
        last = plan.delete[-1]
        last_unit = [c for c in plan.delete if c.step == last.step] if together else [last]
        assert left + sum(c.size_bytes for c in last_unit) > limit
    if together and plan.delete:
        assert all(c.step != plan.delete[-1].step for c in unkept[len(plan.delete) :])
    fits = {p for p, why in plan.reasons.items() if why == "MaxBytes: fits the budget"}
    assert fits == paths(plan.keep) - forced


@settings(max_examples=150, deadline=None)
@given(run=runs(), rule=plain_rules, budget=st.none() | st.integers(0, 8000))
def test_property_together_keeps_or_deletes_whole_steps(run, rule, budget) -> None:
    retention = rule if budget is None else rule | MaxBytes(budget)
    plan = plan_retention(run, retention)
    always = always_kept(run)
    for step in {c.step for c in run}:
        mates = {c.path for c in run if c.step == step} - always
        assert mates <= paths(plan.keep) or mates <= paths(plan.delete)


@settings(max_examples=150, deadline=None)
@given(run=runs(), rule=plain_rules, together=st.booleans())
def test_property_each_rule_matches_a_reference(run, rule, together) -> None:
    """Each rule alone against a direct reimplementation of its documented meaning."""
    if together:
        steps = sorted({c.step for c in run})
        pools = [[[c for c in run if c.step == s] for s in steps]]
    else:
        pools = [
            [[c] for c in sorted(run, key=lambda c: (c.step, c.time, c.path)) if c.checkpoint_type == kind]
            for kind in ("training", "sampler")
        ]
    expected: set[str] = set()
    for units in pools:
        if isinstance(rule, KeepLatest):
            chosen = units[-rule.n :]
        elif isinstance(rule, KeepEvery):
            chosen = [u for u in units if u[0].step % rule.n_steps == 0]
        else:
            valued = []
            for age, unit in enumerate(units):
                having = [c for c in unit if isinstance(c.metrics.get(rule.metric), float)]
                having = [c for c in having if not math.isnan(c.metrics[rule.metric])]
                if having:
                    source = max(having, key=lambda c: (c.checkpoint_type == "training", c.step, c.time, c.path))
                    value = source.metrics[rule.metric]
                    valued.append(((value if rule.mode == "min" else -value), -age, unit))
            chosen = [u for *_, u in sorted(valued, key=lambda v: v[:2])[: rule.n]]
        expected |= {c.path for u in chosen for c in u}
    assert paths(plan_retention(run, rule, together).keep) == always_kept(run) | expected


@settings(max_examples=100, deadline=None)
@given(
    run=runs(),
    rules=st.lists(plain_rules, min_size=1, max_size=3),
    budget=st.none() | st.integers(0, 8000),
    together=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_the_plan_does_not_depend_on_input_order(run, rules, budget, together, seed) -> None:
    retention = AnyOf(tuple(rules) + (() if budget is None else (MaxBytes(budget),)))
    shuffled = list(run)
    random.Random(seed).shuffle(shuffled)
    assert plan_retention(shuffled, retention, together) == plan_retention(run, retention, together)
