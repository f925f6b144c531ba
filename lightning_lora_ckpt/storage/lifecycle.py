"""The deletion side of :class:`~.store.CheckpointStore`: delete, pins, soft delete and restore, prune, ``gc``.

Deletions by policy (:meth:`~Lifecycle.prune`, ``PeriodicCheckpoint(retention=...)``) are soft: the
manifest gets a ``deleted_at`` time (:func:`~.commit.retire_checkpoint`) and the checkpoint disappears from
every listing and from resume, its files untouched, until :meth:`~Lifecycle.restore` clears the mark or
:meth:`~Lifecycle.gc` purges it once ``grace`` has passed. Every change is a compare-and-swap on the
manifest, and every deletion is judged again on the manifest current at that moment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

from ..format.index_entry import IndexEntry
from ..format.manifest import Manifest
from ..format.records import Checkpoint
from ..format.strict_json import iso_time, utcnow
from ..format.ttl import parse_duration
from ..policy.retention import (
    NEEDED_BY_DELTA,
    PINNED,
    PUBLISHED,
    Retention,
    RetentionPlan,
    expired,
    kept_reason,
    plan_retention,
)
from .commit import (
    delete_checkpoint,
    deleted_error,
    needed_reason,
    protected_reason,
    restore_checkpoint,
    retire_checkpoint,
)
from .fs import CheckpointConflictError
from .index import STALE_INTENT_AFTER, RunIndex
from .listing import stale_leftovers
from .protocol import CommitProtocol
from .read import read_manifest

#: How old the newest file of an interrupted write must be before ``gc`` removes it: far longer than any
#: live save goes without creating or finishing a file.
INCOMPLETE_AFTER = "1d"
#: How long a soft-deleted checkpoint stays restorable before ``gc`` purges it.
DELETE_GRACE = "24h"
#: How many soft deletions ``prune`` has in flight at once (each a manifest read and a conditional write).
RETIRE_WORKERS = 16

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DeletedCheckpoint:
    """A soft-deleted checkpoint, as listed by :meth:`CheckpointStore.deleted`.

    Attributes:
        checkpoint: its record (as it was listed before the deletion).
        deleted_at: when it was soft-deleted (UTC); ``gc(grace=...)`` purges it once ``grace`` has passed.
    """

    checkpoint: Checkpoint
    deleted_at: datetime

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: the record's fields and ``deleted_at`` (ISO-8601 UTC).

        Returns:
            The fields as a dict.
        """
        return {**self.checkpoint.to_dict(), "deleted_at": iso_time(self.deleted_at)}


def _age(value: float | str, what: str) -> float:
    """Seconds from an age given as seconds (0 included) or a duration like ``"24h"``."""
    seconds = float(value) if isinstance(value, (int, float)) else parse_duration(value)
    if seconds is None or seconds < 0:
        raise ValueError(f"{what} must be >= 0 seconds or like '24h', got {value!r}")
    return seconds


class Lifecycle:
    """Deletion, pins, soft delete, prune and ``gc``: the part of :class:`CheckpointStore` that removes things.

    A mixin: :class:`~.store.CheckpointStore` provides the listing primitives declared here.
    """

    root: str
    storage_options: dict[str, Any]
    _root_path: str
    _protocol: CommitProtocol

    # Provided by CheckpointStore (the listing primitives this mixin builds on).
    resolve: Callable[[str], str]
    list_checkpoints: Callable[[str], list[Checkpoint]]
    _run_ids: Callable[[], list[str]]
    _uri: Callable[..., str]
    _scan: Callable[[str], dict[str, dict[str, Any]]]
    _entries: Callable[..., list[IndexEntry]]
    _run_index: Callable[[str], RunIndex]
    _update: Callable[[str, Callable[[Manifest], Manifest]], Checkpoint]

    # -- pins ---------------------------------------------------------------------------------------
    def pin(self, uri: str) -> Checkpoint:
        """Pin the checkpoint: nothing deletes or replaces it (``gc`` even past its TTL, ``prune``, retention,
        rotations, ``delete``, a save with overwrite) until :meth:`unpin`.

        Args:
            uri: the checkpoint (any fsspec URI, local path or ``lora://run/kind/name``).

        Returns:
            The updated record.

        Raises:
            CheckpointConflictError: the checkpoint is already pinned.
            CheckpointFormatError: there is no committed checkpoint at ``uri`` (or it is soft-deleted), or its
                manifest is invalid.
            ValueError: ``uri`` is a malformed ``lora://`` URI.
        """
        return self._update(uri, lambda m: _set_pinned(m, True, uri))

    def unpin(self, uri: str) -> Checkpoint:
        """Unpin the checkpoint (its TTL, retention and ``delete`` apply to it again).

        Args:
            uri: the checkpoint (any fsspec URI, local path or ``lora://run/kind/name``).

        Returns:
            The updated record.

        Raises:
            CheckpointConflictError: the checkpoint is not pinned.
            CheckpointFormatError: there is no committed checkpoint at ``uri`` (or it is soft-deleted), or its
                manifest is invalid.
            ValueError: ``uri`` is a malformed ``lora://`` URI.
        """
        return self._update(uri, lambda m: _set_pinned(m, False, uri))

    # -- soft delete --------------------------------------------------------------------------------
    def deleted(self, run_id: str | None = None) -> list[DeletedCheckpoint]:
        """The soft-deleted checkpoints (not yet purged by ``gc``) of one run or of every run, oldest deletion first.

        Args:
            run_id: the run's id; None for every run under the root.

        Returns:
            Each with its record and deletion time.

        Raises:
            ValueError: ``run_id`` is not a valid run id.
        """
        found = []
        for run in [run_id] if run_id is not None else self._run_ids():
            for entry in self._entries(run):
                if entry.deleted_at is not None:
                    found.append(DeletedCheckpoint(entry.checkpoint, entry.deleted_at))
        return sorted(found, key=lambda d: (d.deleted_at, d.checkpoint.path))

    def restore(self, uri: str) -> Checkpoint:
        """Bring back a soft-deleted checkpoint before ``gc`` purges it: listed, loadable and resumable again,
        bit-identical (its files were never touched).

        Args:
            uri: the checkpoint (any fsspec URI, local path or ``lora://run/kind/name``).

        Returns:
            The restored record.

        Raises:
            CheckpointConflictError: the checkpoint is not soft-deleted.
            CheckpointFormatError: there is no checkpoint at ``uri`` (purged by ``gc``, deleted, or never
                committed), or its manifest is invalid.
            ValueError: ``uri`` is a malformed ``lora://`` URI.
        """
        uri = self.resolve(uri)
        return Checkpoint.from_manifest(restore_checkpoint(uri, self.storage_options), uri)

    def prune(
        self,
        run_id: str,
        retention: Retention,
        dry_run: bool = False,
        together: bool = True,
        only: Collection[str] | None = None,
    ) -> RetentionPlan:
        """Soft-delete the checkpoints of a run that ``retention`` does not keep.

        The plan is :func:`~lightning_lora_ckpt.policy.retention.plan_retention` over the run's committed,
        not soft-deleted checkpoints (published and pinned ones and the newest training checkpoint are always
        kept). Each checkpoint in ``plan.delete`` is then soft-deleted (several at once), judged again at that moment: one
        published or pinned since is kept (logged). A warning is logged when the kept ones alone exceed a
        ``MaxBytes`` budget. Soft-deleted checkpoints can be brought back with :meth:`restore` until
        :meth:`gc` purges them after its grace period.

        To delete exactly what a dry run showed (e.g. after asking), pass ``only``: the paths of its
        ``plan.delete``. Those the plan still deletes are deleted, nothing else.

        Args:
            run_id: the run's id (a run without checkpoints gives an empty plan).
            retention: the rules, e.g. ``KeepLatest(3) | KeepBest("val_loss", 1) | MaxBytes("50GB")``.
            dry_run: change nothing; only return the plan.
            together: judge the sampler and training checkpoints of one step as one (False: each on its own).
            only: if given, the paths (``Checkpoint.path``) that may be deleted; the plan's others are kept.

        Returns:
            The plan as carried out: a checkpoint kept at the moment of its deletion is in ``keep`` (with its
            reason in ``reasons``), one found gone is in neither list.

        Raises:
            ValueError: ``run_id`` is not a valid run id.
            CheckpointWriteError: the storage kept failing.
        """
        plan = plan_retention(self.list_checkpoints(run_id), retention, together=together)
        if plan.over_budget:
            log.warning(
                "prune %s: the checkpoints that must be kept alone exceed the byte budget of %s; keeping them",
                run_id,
                retention,
            )
        allowed = {c.path for c in plan.delete} if only is None else set(only)
        late = {c.path: "not among the paths prune was given" for c in plan.delete if c.path not in allowed}
        todo = [c for c in plan.delete if c.path not in late]
        if dry_run:
            done = todo
        else:  # each deletion is one manifest compare-and-swap: a few of them in flight at once
            # Snapshots one at a time, newest first: a delta is retired before the parent it needs is judged.
            chains, others = [c for c in todo if c.snapshot], [c for c in todo if not c.snapshot]
            with ThreadPoolExecutor(max_workers=max(1, min(RETIRE_WORKERS, len(others)))) as pool:
                outcomes = pool.map(lambda c: self._retire(c.path, late), others)
                retired = dict(zip([c.path for c in others], outcomes, strict=True))
            retired.update((c.path, self._retire(c.path, late)) for c in _newest_first(chains))
            done = [c for c in todo if retired[c.path]]
        kept = plan.keep + [c for c in plan.delete if c.path in late]
        if len(done) == len(plan.delete):
            return plan
        kept.sort(key=lambda c: (c.step, c.time, c.path))
        return dataclasses.replace(plan, keep=kept, delete=done, reasons={**plan.reasons, **late})

    def _retire(self, path: str, kept: dict[str, str]) -> bool:
        """Soft-delete one checkpoint, judged again at the moment; the reason it was kept goes into ``kept``."""

        def keep(manifest: Manifest) -> str | None:
            reason = protected_reason(manifest)
            if reason is not None:  # in the plan's words
                kept[path] = PUBLISHED if manifest.public else PINNED
                return reason
            reason = needed_reason(path, manifest, self.storage_options, live_only=True)
            if reason is not None:
                kept[path] = NEEDED_BY_DELTA
            return reason

        return retire_checkpoint(path, self.storage_options, keep) is not None

    # -- deletion -----------------------------------------------------------------------------------
    def delete(self, uri: str, cascade: bool = False) -> Checkpoint:
        """Delete a committed checkpoint now, for good (its manifest first, so it is never seen half-deleted).

        A soft-deleted checkpoint is purged at once. A pinned one is refused, judged at the moment of the
        deletion, and so is a snapshot that delta snapshots need (soft-deleted ones too), unless ``cascade``.

        Args:
            uri: the checkpoint (any fsspec URI, local path or ``lora://run/kind/name``).
            cascade: first delete the delta snapshots that need it (and theirs), each refused if pinned.

        Returns:
            The record of the deleted checkpoint.

        Raises:
            CheckpointConflictError: the checkpoint (or, with ``cascade``, a delta that needs it) is pinned, or
                deltas need it and not ``cascade``.
            CheckpointFormatError: there is no committed checkpoint at ``uri``, or its manifest is invalid.
            CheckpointWriteError: the storage kept failing.
            ValueError: ``uri`` is a malformed ``lora://`` URI.
        """
        uri = self.resolve(uri)
        checkpoint = Checkpoint.from_manifest(read_manifest(uri, self.storage_options), uri)

        def refuse_pinned(manifest: Manifest) -> str | None:
            if manifest.pinned:
                raise CheckpointConflictError(
                    f"Checkpoint {uri} is pinned and is never deleted; unpin it first (lightning-lora-ckpt unpin {uri})"
                )
            return None

        delete_checkpoint(uri, self.storage_options, refuse_pinned, "cascade" if cascade else "refuse")
        return checkpoint

    def gc(
        self,
        dry_run: bool = False,
        now: datetime | None = None,
        incomplete_after: float | str = INCOMPLETE_AFTER,
        only: Collection[str] | None = None,
        grace: float | str = DELETE_GRACE,
        cascade: bool = False,
    ) -> list[Checkpoint]:
        """Delete expired checkpoints and purge soft-deleted ones, and return them (``dry_run``: only return them).

        Never deleted: a run's newest training checkpoint, a public or a pinned checkpoint, a snapshot that delta
        snapshots need (unless ``cascade``: then they go first; due ones are deleted newest first, so a chain
        whose links are all due goes in one pass). A soft-deleted
        checkpoint is purged once ``grace`` has passed since its deletion, or its TTL has expired (a TTL
        deletes for good, soft-deleted or not). What interrupted writes left behind (see :meth:`incomplete`)
        is removed too, once its newest file is older than ``incomplete_after`` on the real clock (``now``
        only decides expiry and grace), so a save in flight survives.

        To delete exactly what a dry run showed (e.g. after asking), pass ``only``: the paths of its
        checkpoints and of the leftovers :meth:`incomplete` listed. Those still due are deleted, nothing else
        (one published, pinned, restored or made the newest meanwhile is kept).

        Args:
            dry_run: delete nothing; only return what would be deleted.
            now: the time expiry and grace are judged at (default: the current time).
            incomplete_after: how old (seconds, or a duration like ``"1d"``) a leftover's newest file must be.
            only: if given, the URIs (``Checkpoint.path``, :meth:`incomplete`'s URIs) that may be deleted.
            grace: how long (seconds, or a duration like ``"24h"``) a soft-deleted checkpoint stays restorable.
            cascade: delete the delta snapshots that need an expired or purged snapshot with it.

        Returns:
            The expired and the purged soft-deleted checkpoints deleted (or, with ``dry_run``, to be deleted).

        Raises:
            ValueError: ``incomplete_after`` or ``grace`` is not a valid age.
            CheckpointWriteError: the storage kept failing while deleting a checkpoint.
        """
        now = now or utcnow()
        wait = timedelta(seconds=_age(grace, "The grace period of soft-deleted checkpoints"))
        doomed, purged, leftovers, clock = [], [], {}, self._protocol.now(self._root_path)
        for run_id in self._run_ids():
            found = self._scan(run_id)
            entries = self._entries(run_id, found)
            doomed += expired([e.checkpoint for e in entries if e.deleted_at is None], now)
            purged += [e.checkpoint for e in entries if _purge_reason(e, now, wait) is None]
            leftovers.update(self._leftovers(run_id, found, incomplete_after, clock))
            if not dry_run:
                self._repair_index(run_id, found, clock)
        if only is not None:
            allowed = set(only)
            doomed = [c for c in doomed if c.path in allowed]
            purged = [c for c in purged if c.path in allowed]
            leftovers = {unit: m for unit, m in leftovers.items() if self._uri_of(unit) in allowed}
        if not dry_run:

            def still_expired(manifest: Manifest) -> str | None:
                return kept_reason(Checkpoint.from_manifest(manifest, self.root), now)

            doomed = [c for c in _newest_first(doomed) if self._delete_if(c, still_expired, cascade)]
            purged = [
                c for c in _newest_first(purged) if self._delete_if(c, lambda m: _purge_reason(m, now, wait), cascade)
            ]
            for unit, members in leftovers.items():
                with contextlib.suppress(FileNotFoundError):  # already gone: its writer or another gc finished it
                    self._protocol.remove_leftover(unit, members)
        verb = "would" if dry_run else "did"
        if purged:
            log.info("gc %s purge %d soft-deleted checkpoint(s): %s", verb, len(purged), [c.path for c in purged])
        if leftovers:
            log.info("gc %s remove %d leftover(s) of interrupted writes", verb, len(leftovers))
        return doomed + purged

    def _repair_index(self, run_id: str, found: dict[str, dict[str, Any]], clock: float) -> None:
        """Settle the intents of writers that died before settling, and rewrite an index that lists other
        checkpoints than the manifests do (one an older version wrote to, or a damaged one)."""
        index = self._run_index(run_id)
        index.settle_stale_intents(found, clock, STALE_INTENT_AFTER)
        if index.diverges(found):
            log.warning("gc: the listing index of run %s disagreed with its manifests; rewriting it", run_id)
            index.rebuild(clock)

    def _delete_if(self, checkpoint: Checkpoint, keep: Callable[[Manifest], str | None], cascade: bool) -> bool:
        """Delete a checkpoint the scan found due, judged again by ``keep`` on its manifest at the moment."""
        return (
            delete_checkpoint(checkpoint.path, self.storage_options, keep, "cascade" if cascade else "keep") is not None
        )

    def incomplete(self, older_than: float | str = 0) -> list[str]:
        """URIs of what interrupted writes left, whose newest file is older than ``older_than`` (seconds or "1d").

        Locally that is a hidden ``.<name>.tmp-<uuid>`` or ``.<name>.deleting-<uuid>`` entry; on object
        stores, the objects of a checkpoint folder without a manifest (with ``older_than=0`` that includes
        saves still being written). None of it is ever listed as a checkpoint.

        Args:
            older_than: how old (seconds, or a duration like ``"1d"``) a leftover's newest file must be.

        Returns:
            The leftovers' URIs under the root.

        Raises:
            ValueError: ``older_than`` is not a valid age.
        """
        clock = self._protocol.now(self._root_path)
        return [
            self._uri_of(unit)
            for run_id in self._run_ids()
            for unit in self._leftovers(run_id, self._scan(run_id), older_than, clock)
        ]

    def _leftovers(
        self, run_id: str, found: dict[str, dict[str, Any]], older_than: float | str, now: float
    ) -> dict[str, list[str]]:
        """Leftovers in one run's listing whose every entry is dated and older than ``older_than`` at ``now`` (the
        storage's clock): path -> entries."""
        run_path = f"{self._root_path.rstrip('/')}/{run_id}"
        return stale_leftovers(found, run_path, self._protocol.writes_in_place, older_than, now)

    def _uri_of(self, path: str) -> str:
        """The URI under the root of a path from this store's filesystem."""
        return self._uri(path[len(self._root_path.rstrip("/")) + 1 :])


def _newest_first(checkpoints: list[Checkpoint]) -> list[Checkpoint]:
    """Newest first: a delta snapshot (always saved after its parent) goes before the parent it needs."""
    return sorted(checkpoints, key=lambda c: (c.time, c.step), reverse=True)


def _set_pinned(manifest: Manifest, pinned: bool, uri: str) -> Manifest:
    if manifest.pinned == pinned:
        raise CheckpointConflictError(f"Checkpoint {uri} is {'already' if pinned else 'not'} pinned")
    return dataclasses.replace(manifest, pinned=pinned)


def _purge_reason(manifest: Manifest | IndexEntry, now: datetime, grace: timedelta) -> str | None:
    """Why ``gc`` keeps a checkpoint it would purge as soft-deleted, or None if it is due at ``now``."""
    if manifest.deleted_at is None:
        return "it was restored"
    reason = protected_reason(manifest)
    if reason is not None:
        return reason
    if manifest.expires_at is not None and manifest.expires_at <= now:
        return None
    if manifest.deleted_at + grace > now:
        return f"it was deleted at {iso_time(manifest.deleted_at)} and stays restorable until {iso_time(manifest.deleted_at + grace)}"
    return None


def check_live(uri: str, manifest: Manifest) -> Manifest:
    """``manifest`` itself, or the error for a soft-deleted checkpoint asked for as if it were there.

    Args:
        uri: the checkpoint's URI.
        manifest: its manifest.

    Returns:
        ``manifest``, if it is not soft-deleted.

    Raises:
        CheckpointFormatError: it is soft-deleted (the message says when, and how to restore it).
    """
    if manifest.deleted_at is not None:
        raise deleted_error(uri, manifest)
    return manifest
