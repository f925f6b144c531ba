"""``CheckpointStore``: listing, metadata, TTL, publishing, download and verification.

Deletion, pins, soft delete, restore, prune and garbage collection are in :mod:`.lifecycle` (a mixin of the
same class).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from ..format.index_entry import IndexEntry
from ..format.layout import CheckpointType, default_root, join, resolve, validate_name
from ..format.manifest import Manifest
from ..format.records import MAX_RUN_BYTES, RUN_FILE, Checkpoint, CheckpointPage, Cursor, TrainingRun, VerifyReport
from ..format.strict_json import CheckpointFormatError, utcnow
from ..format.ttl import parse_duration
from ..policy.retention import checkpoint_order, newest
from .archive import Progress, archive, download
from .commit import protocol_for, update_manifest
from .compaction import compact
from .fs import CheckpointConflictError, url_to_fs
from .index import IndexReport, RunIndex
from .lifecycle import DELETE_GRACE, INCOMPLETE_AFTER, DeletedCheckpoint, Lifecycle, check_live
from .listing import scan
from .read import read_manifest
from .verify import verify_checkpoint

__all__ = ["DELETE_GRACE", "INCOMPLETE_AFTER", "CheckpointStore", "DeletedCheckpoint"]

log = logging.getLogger(__name__)


class CheckpointStore(Lifecycle):
    """Management of the checkpoints under ``root`` (any fsspec URI; ``$LORA_CKPT_ROOT`` if None).

    Only committed checkpoints (those with a ``checkpoint.json``) that are not soft-deleted are ever listed;
    listing reads the small manifests (concurrently on object stores), never weight files. Methods taking a ``uri``
    accept any fsspec URI of a checkpoint directory or ``lora://run/kind/name``.

    Args:
        root: the checkpoint root (any fsspec URI or local path); ``$LORA_CKPT_ROOT``, else
            ``./checkpoints``, if None.
        storage_options: fsspec options of the root's filesystem (e.g. S3 credentials or endpoint).

    Raises:
        ValueError: fsspec knows no filesystem for the root's protocol.
        ImportError: the filesystem's package (e.g. ``s3fs``) is not installed.
    """

    def __init__(self, root: str | None = None, storage_options: dict[str, Any] | None = None) -> None:
        self.root = default_root(root)
        self.storage_options = dict(storage_options or {})
        self.fs, self._root_path = url_to_fs(self.root, self.storage_options)
        self._protocol = protocol_for(self.fs)

    # -- listing ----------------------------------------------------------------------------------
    def root_exists(self) -> bool:
        """Whether the root exists: a local directory, or an object-store prefix (or bucket) holding anything.

        Returns:
            True if the root exists (an empty listing of it then means it holds no checkpoints).
        """
        self.fs.invalidate_cache(self._root_path)
        return bool(self.fs.isdir(self._root_path))

    def _uri(self, *parts: str) -> str:
        return join(self.root, *parts)

    def _names(self, *parts: str) -> list[str]:
        """Fresh listing of the entry names in a folder under the root ([] if there is none)."""
        try:
            paths = self.fs.ls(join(self._root_path, *parts), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in paths]

    def list_runs(self) -> list[TrainingRun]:
        """Every run under the root (a folder with a ``run.json``), oldest first.

        A run whose ``run.json`` is invalid, too large or unsafe to read is left out with a logged warning
        (:meth:`get_run` on it raises the error), so one bad run never hides the others.

        Returns:
            The runs, each with its newest training and sampler checkpoints.
        """
        runs = []
        for run_id in self._run_ids():
            if RUN_FILE not in self._names(run_id):
                continue
            try:
                runs.append(self.get_run(run_id))
            except (CheckpointFormatError, KeyError) as err:  # KeyError: deleted since the listing
                log.warning("Skipping run %r under %s: %s", run_id, self.root, err)
        return sorted(runs, key=lambda r: r.created_at)

    def get_run(self, run_id: str) -> TrainingRun:
        """The run's metadata, with its newest training and sampler checkpoints.

        Args:
            run_id: the run's id.

        Returns:
            The run.

        Raises:
            KeyError: there is no run ``run_id`` (no ``run.json``) under the root.
            ValueError: ``run_id`` is not a valid run id.
            CheckpointFormatError: (a ``ValueError``) its ``run.json`` is invalid, larger than
                :data:`~lightning_lora_ckpt.format.records.MAX_RUN_BYTES` (never read past that) or, locally, not
                a regular file inside the run's folder.
        """
        validate_name(run_id, "run id")
        source = self._uri(run_id, RUN_FILE)
        run_path = join(self._root_path, run_id)
        try:
            self._protocol.check_member(self._uri(run_id), run_path, RUN_FILE)
            raw = self.fs.cat_file(join(run_path, RUN_FILE), start=0, end=MAX_RUN_BYTES + 1)
        except FileNotFoundError:
            raise KeyError(f"No run {run_id!r} under {self.root} ({source} does not exist)") from None
        run = TrainingRun.from_json(raw, source)
        checkpoints = self.list_checkpoints(run_id)
        return dataclasses.replace(
            run,
            last_checkpoint=newest(checkpoints, "training"),
            last_sampler_checkpoint=newest(checkpoints, "sampler"),
        )

    def list_checkpoints(self, run_id: str) -> list[Checkpoint]:
        """Committed checkpoints of a run, oldest first (by step, then time).

        Read from the run's listing index (:mod:`.index`): two requests on an object store however many
        checkpoints the run has, plus one per checkpoint being changed right now. A run without a usable
        index is listed from its manifests (one flat listing, then the manifests read concurrently).

        Args:
            run_id: the run's id.

        Returns:
            The run's checkpoints; empty for a run that has none or does not exist. Checkpoints with a
            damaged manifest are left out (:meth:`verify` reports them).

        Raises:
            ValueError: ``run_id`` is not a valid run id.
        """
        return self._checkpoints(run_id)

    def _scan(self, run_id: str) -> dict[str, dict[str, Any]]:
        """Fresh flat listing of everything under a run (folders included), with each entry's details."""
        return scan(self.fs, self._run_index(run_id).run_path)

    def _run_index(self, run_id: str) -> RunIndex:
        run_path = join(self._root_path, validate_name(run_id, "run id"))
        return RunIndex(self._protocol, run_path, self._uri(run_id))

    def _checkpoints(self, run_id: str) -> list[Checkpoint]:
        """The run's committed checkpoints that are not soft-deleted, by step then time."""
        live = [e.checkpoint for e in self._entries(run_id) if e.deleted_at is None]
        return sorted(live, key=checkpoint_order)

    def _entries(self, run_id: str, found: dict[str, dict[str, Any]] | None = None) -> list[IndexEntry]:
        """Every committed checkpoint of a run (soft-deleted ones too); with ``found`` (a fresh flat listing of
        the run), exactly those whose manifest it lists."""
        return list(self._run_index(run_id).entries(found).values())

    def reindex(self, run_id: str | None = None) -> list[IndexReport]:
        """Rewrite the listing index of a run (of every run if None) from its manifests.

        Writers keep the index in step; this repairs one that is missing (a run written by an older version),
        stale (written to by an older version alongside a newer one) or damaged, and settles the intents of
        writers that died more than an hour ago. Listing is correct without it, only slower.

        Args:
            run_id: the run, or None for every run under the root.

        Returns:
            One report per run: the old index's state and what changed.

        Raises:
            ValueError: ``run_id`` is not a valid run id.
            KeyError: there is no run ``run_id`` under the root.
            CheckpointConflictError: writers kept changing the index while it was rebuilt.
        """
        if run_id is not None and RUN_FILE not in self._names(validate_name(run_id, "run id")):
            raise KeyError(f"No run {run_id!r} under {self.root} ({self._uri(run_id, RUN_FILE)} does not exist)")
        now = self._protocol.now(self._root_path)
        runs = [run_id] if run_id is not None else [r for r in self._run_ids() if RUN_FILE in self._names(r)]
        return [self._run_index(r).rebuild(now) for r in runs]

    def list_user_checkpoints(self, limit: int = 100, offset: int = 0) -> CheckpointPage:
        """Checkpoints of every run, newest first, one page at a time.

        Args:
            limit: the page size.
            offset: how many checkpoints of the whole listing to skip.

        Returns:
            The page and its cursor.

        Raises:
            ValueError: ``limit`` is below 1 or ``offset`` below 0.
        """
        if limit < 1 or offset < 0:
            raise ValueError(f"limit must be >= 1 and offset >= 0, got limit={limit}, offset={offset}")
        everything = [c for run_id in self._run_ids() for c in self.list_checkpoints(run_id)]
        everything.sort(key=lambda c: c.time, reverse=True)
        return CheckpointPage(everything[offset : offset + limit], Cursor(offset, limit, len(everything)))

    def _run_ids(self) -> list[str]:
        """The folders under the root that can be runs (valid run ids)."""
        ids = []
        for name in self._names():
            with contextlib.suppress(ValueError):  # hidden or foreign folders
                ids.append(validate_name(name, "run id"))
        return ids

    def get(self, uri: str, include_deleted: bool = False) -> Checkpoint:
        """The checkpoint at a URI.

        Args:
            uri: the checkpoint (any fsspec URI, local path or ``lora://run/kind/name``).
            include_deleted: also return a soft-deleted checkpoint (see :meth:`deleted`) instead of raising.

        Returns:
            Its record.

        Raises:
            CheckpointFormatError: there is no committed checkpoint at ``uri``, its manifest is invalid, or it is
                soft-deleted (the message says when, and how to :meth:`restore` it).
            ValueError: ``uri`` is a malformed ``lora://`` URI.
        """
        uri = self.resolve(uri)
        manifest = self.manifest(uri)
        return Checkpoint.from_manifest(manifest if include_deleted else check_live(uri, manifest), uri)

    def manifest(self, uri: str) -> Manifest:
        """The full manifest of the checkpoint at a URI (files, checksums, base model fingerprint, versions), also
        of a soft-deleted one (``deleted_at`` set).

        Args:
            uri: the checkpoint (any fsspec URI, local path or ``lora://run/kind/name``).

        Returns:
            The manifest.

        Raises:
            CheckpointFormatError: there is no committed checkpoint at ``uri``, or its manifest is invalid.
            ValueError: ``uri`` is a malformed ``lora://`` URI.
        """
        return read_manifest(self.resolve(uri), self.storage_options)

    def resolve(self, uri: str) -> str:
        """The full URI of a checkpoint given as a URI, a local path, or ``lora://run/kind/name``.

        Args:
            uri: the checkpoint; ``lora://`` URIs resolve under :attr:`root`.

        Returns:
            The URI (nothing is read).

        Raises:
            ValueError: ``uri`` is a malformed ``lora://`` URI.
        """
        return resolve(uri, self.root)

    def last_checkpoint(self, run_id: str, checkpoint_type: CheckpointType = "training") -> Checkpoint | None:
        """The newest committed checkpoint of that type in the run, or None.

        Args:
            run_id: the run's id.
            checkpoint_type: ``"training"`` (the resume point) or ``"sampler"``.

        Returns:
            The checkpoint with the highest step (then the latest), or None if the run has none of that type. The
            listing index's answer is confirmed by reading that checkpoint's manifest (an answer of None, by a
            flat listing of the run), so a damaged index never makes a run resume from the wrong checkpoint.

        Raises:
            ValueError: ``run_id`` is not a valid run id.
        """
        choice = newest(self.list_checkpoints(run_id), checkpoint_type)
        if choice is not None and self._protocol.read_manifest(choice.path, self._path_of(choice)) is not None:
            return choice
        # The resume point is never taken from the index alone: confirmed by its manifest (one read), and an
        # index that names none, or one without a manifest, is checked against the manifests themselves.
        live = [e.checkpoint for e in self._entries(run_id, self._scan(run_id)) if e.deleted_at is None]
        confirmed = newest(sorted(live, key=checkpoint_order), checkpoint_type)
        if confirmed != choice:
            log.warning(
                "The listing index of run %r disagrees with its manifests (newest %s checkpoint: %s, not %s); "
                "`lightning-lora-ckpt reindex %s` rewrites it",
                run_id,
                checkpoint_type,
                confirmed.checkpoint_id if confirmed else None,
                choice.checkpoint_id if choice else None,
                run_id,
            )
        return confirmed

    def _path_of(self, checkpoint: Checkpoint) -> str:
        return join(self._root_path, checkpoint.run_id, checkpoint.checkpoint_id)

    # -- mutable metadata -------------------------------------------------------------------------
    def _update(self, uri: str, change: Callable[[Manifest], Manifest]) -> Checkpoint:
        """Change a committed, not soft-deleted checkpoint's manifest (compare-and-swap)."""
        uri = self.resolve(uri)
        updated = update_manifest(uri, lambda m: change(check_live(uri, m)), self.storage_options)
        return Checkpoint.from_manifest(updated, uri)

    def set_ttl(self, uri: str, ttl_seconds: float | str | None) -> Checkpoint:
        """Expire the checkpoint ``ttl_seconds`` from now (``"7d"`` etc. accepted); None removes the TTL.

        Only the manifest changes; the checksummed files are not touched.

        Args:
            uri: the checkpoint (any fsspec URI, local path or ``lora://run/kind/name``).
            ttl_seconds: seconds or a duration like ``"30m"``, ``"7d"``; None removes the expiry.

        Returns:
            The updated record.

        Raises:
            ValueError: ``ttl_seconds`` is not a positive duration, or ``uri`` is a malformed ``lora://`` URI.
            CheckpointFormatError: there is no committed checkpoint at ``uri`` (or it is soft-deleted), or its
                manifest is invalid.
        """
        seconds = parse_duration(ttl_seconds)
        expires = utcnow() + timedelta(seconds=seconds) if seconds is not None else None
        return self._update(uri, lambda m: dataclasses.replace(m, expires_at=expires))

    def publish(self, uri: str) -> Checkpoint:
        """Mark the checkpoint public (``gc`` and bucket lifecycle rules never delete it).

        Args:
            uri: the checkpoint (any fsspec URI, local path or ``lora://run/kind/name``).

        Returns:
            The updated record.

        Raises:
            CheckpointConflictError: the checkpoint is already public.
            CheckpointFormatError: there is no committed checkpoint at ``uri`` (or it is soft-deleted), or its
                manifest is invalid.
            ValueError: ``uri`` is a malformed ``lora://`` URI.
        """
        return self._update(uri, lambda m: _set_public(m, True, uri))

    def unpublish(self, uri: str) -> Checkpoint:
        """Mark the checkpoint private again (``gc`` then deletes it once it has expired).

        Args:
            uri: the checkpoint (any fsspec URI, local path or ``lora://run/kind/name``).

        Returns:
            The updated record.

        Raises:
            CheckpointConflictError: the checkpoint is already private.
            CheckpointFormatError: there is no committed checkpoint at ``uri`` (or it is soft-deleted), or its
                manifest is invalid.
            ValueError: ``uri`` is a malformed ``lora://`` URI.
        """
        return self._update(uri, lambda m: _set_public(m, False, uri))

    # -- integrity and export ---------------------------------------------------------------------
    def verify(self, uri: str) -> VerifyReport:
        """Check every file of a checkpoint against the manifest's size and sha256, then that it decodes.

        Damage is reported in the result, not raised.

        Args:
            uri: the checkpoint (any fsspec URI, local path or ``lora://run/kind/name``).

        Returns:
            The report; ``ok`` is False if a file is missing, unsafe, differs or does not decode.

        Raises:
            CheckpointFormatError: there is no committed checkpoint at ``uri``, or its manifest is invalid.
            ValueError: ``uri`` is a malformed ``lora://`` URI.
        """
        return verify_checkpoint(self.resolve(uri), self.storage_options)

    def download(self, uri: str, output_dir: str | os.PathLike[str], progress: Progress | None = None) -> str:
        """Copy a checkpoint's files into a local ``output_dir``, verifying each (in a temporary sibling renamed
        into place once all are verified).

        Args:
            uri: the checkpoint (any fsspec URI, local path or ``lora://run/kind/name``).
            output_dir: a local directory that is absent or empty.
            progress: called with (file name, bytes done, bytes total) while downloading.

        Returns:
            The absolute path of ``output_dir``.

        Raises:
            FileExistsError: ``output_dir`` exists and is not empty.
            CheckpointFormatError: there is no checkpoint at ``uri``, or a file is missing, unsafe or differs
                from the manifest.
            ValueError: ``uri`` is a malformed ``lora://`` URI.
        """
        return download(self.resolve(uri), output_dir, self.storage_options, progress)

    def compact(self, uri: str) -> Checkpoint:
        """Rewrite a delta snapshot as a base: its weights rebuilt through its chain and written whole, atomically.

        Its name, metadata and full weights stay (so deltas taken against it still rebuild); its parent is no
        longer needed and may be deleted.

        Args:
            uri: the checkpoint (any fsspec URI, local path or ``lora://run/sampler_weights/name``).

        Returns:
            The record of the compacted checkpoint (``snapshot`` ``"base"``).

        Raises:
            CheckpointConflictError: it is not a delta snapshot, or it is published or pinned (unpublish or unpin it
                first).
            CheckpointFormatError: it is missing or damaged, or its chain is broken.
            CheckpointWriteError: the storage kept failing.
            ValueError: ``uri`` is a malformed ``lora://`` URI.
        """
        resolved = self.resolve(uri)
        return Checkpoint.from_manifest(compact(resolved, self.storage_options), resolved)

    def archive(self, uri: str, tar_path: str, progress: Progress | None = None) -> str:
        """Write a verified checkpoint as a ``.tar`` (``.tar.gz`` if the name ends so) at ``tar_path`` (any URI).

        Args:
            uri: the checkpoint (any fsspec URI, local path or ``lora://run/kind/name``).
            tar_path: where the archive goes (any fsspec URI or local path, reached with this store's
                ``storage_options``).
            progress: called with (file name, bytes done, bytes total) while downloading.

        Returns:
            ``tar_path``.

        Raises:
            CheckpointFormatError: there is no checkpoint at ``uri``, or a file is missing, unsafe or differs
                from the manifest.
            ValueError: ``uri`` is a malformed ``lora://`` URI.
        """
        return archive(self.resolve(uri), tar_path, self.storage_options, progress)


def _set_public(manifest: Manifest, public: bool, uri: str) -> Manifest:
    if manifest.public == public:
        raise CheckpointConflictError(f"Checkpoint {uri} is already {'public' if public else 'private'}")
    return dataclasses.replace(manifest, public=public)
