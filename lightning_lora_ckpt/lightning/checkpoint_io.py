"""``LoRACheckpointIO``: Lightning's CheckpointIO plugin writing sampler weights and training state."""

from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, Literal

from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.utilities.types import _PATH
from typing_extensions import override

from ..format import layout
from ..format.layout import CheckpointType
from ..format.manifest import MANIFEST, FileEntry, Manifest
from ..format.payload import CheckpointPayload
from ..format.records import RUN_FILE, TrainingRun
from ..format.strict_json import utcnow
from ..storage.commit import commit_checkpoint, delete_checkpoint, write_if_absent
from ..storage.fs import CheckpointWriteError, storage_errors, url_to_fs
from ..storage.loading import open_checkpoint
from .async_io import AsyncSaves
from .checkpoint_dict import checkpoint_from_opened, payload_from_checkpoint, versions

log = logging.getLogger(__name__)
OnError = Literal["raise", "warn"]


class LoRACheckpointIO(CheckpointIO):
    """Writes LoRA checkpoints in the layout of DESIGN.md to any fsspec URI, pickle-free and atomically.

    Args:
        root: where bare checkpoint names and ``lora://`` URIs resolve (``$LORA_CKPT_ROOT`` if None).
        run_id: the run bare names are saved under (a fresh ``run-<time>-<hex>`` id if None).
        async_save: copy the tensors to the CPU in a background thread while the next training step
            computes (its optimizer update waits for the copy), then write them in another; saves
            commit in order, errors surface at the next save or at the end of fit.
        storage_options: fsspec options for the root's filesystem (e.g. S3 credentials or endpoint; on
            ``s3://`` the retry and timeout settings of ``config_kwargs`` default to
            ``storage.fs.S3_CONFIG_DEFAULTS``).
        on_error: what a save or deletion does when the storage keeps failing after its retries
            (:class:`~lightning_lora_ckpt.CheckpointWriteError`): ``"raise"`` (at once when
            synchronous, else at the next save or the end of fit), or ``"warn"``: log a warning and
            keep training. Either way the failed checkpoint is never visible, and a deletion queued
            after a failed save (a rolling or ``keep_last`` one) is skipped, so older ones stay.

    ``save_checkpoint`` accepts ``storage_options={"ttl_seconds": ..., "user_metadata": {...},
    "overwrite": True}``; without ``overwrite`` saving over a committed checkpoint is an error.
    """

    def __init__(
        self,
        root: str | None = "./checkpoints",
        run_id: str | None = None,
        async_save: bool = True,
        storage_options: dict[str, Any] | None = None,
        on_error: OnError = "raise",
    ) -> None:
        if on_error not in ("raise", "warn"):
            raise ValueError(f"on_error must be 'raise' or 'warn', got {on_error!r}")
        self.root = layout.default_root(root)
        self.run_id = layout.validate_name(run_id, "run id") if run_id else None
        self.async_save = async_save
        self.storage_options = dict(storage_options or {})
        self.on_error = on_error
        self._async = AsyncSaves(self._run) if async_save else None
        self._write_failed = False

    # -- naming -----------------------------------------------------------------------------------
    def ensure_run_id(self) -> str:
        """The run id bare names are saved under, drawn on first use if none was given."""
        if self.run_id is None:
            self.run_id = f"run-{utcnow():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
        return self.run_id

    def resolve(self, path: _PATH, checkpoint_type: CheckpointType) -> str:
        """The URI a save of ``checkpoint_type`` to ``path`` writes: bare names go under ``root/run_id/<kind>/``."""
        text = os.fspath(path)
        if "/" not in text and os.sep not in text and "://" not in text:
            return layout.checkpoint_uri(self.root, self.ensure_run_id(), checkpoint_type, text)
        uri = layout.resolve(text, self.root)
        return uri if "://" in uri else os.path.abspath(uri)

    def resolve_existing(self, path: _PATH) -> str:
        """The URI of an existing checkpoint: a bare name is looked up under ``weights/``, then ``sampler_weights/``."""
        candidates = [self.resolve(path, t) for t in ("training", "sampler")]
        if candidates[0] == candidates[1]:  # a full URI: nothing to look up
            return candidates[0]
        for uri in candidates:
            fs, fs_path = url_to_fs(uri, self.storage_options)
            if fs.exists(layout.join(fs_path, MANIFEST)):
                return uri
        return candidates[0]

    # -- CheckpointIO -----------------------------------------------------------------------------
    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        """Save a Lightning checkpoint dict as the checkpoint at ``path`` (see the class docstring).

        Raises:
            ValueError: bad ``storage_options``, a name that is not valid, or a folder of the other type.
            FileExistsError: a checkpoint is committed at ``path`` and ``overwrite`` was not given.
            CheckpointWriteError: the storage kept failing (synchronous saves, ``on_error="raise"``).
        """
        if self._async is not None:
            self._async.raise_failed()
        ttl_seconds, extra_metadata, overwrite = _parse_save_options(storage_options)
        payload = payload_from_checkpoint(checkpoint, defer_copy=self._async is not None)
        uri = self.resolve(path, payload.checkpoint_type)
        checkpoint_layout = layout.split_checkpoint_uri(uri)
        if not checkpoint_layout:
            try:
                layout.validate_name(uri.rsplit("/", 1)[-1], "checkpoint name")
            except ValueError as err:
                raise ValueError(
                    f"{err}. Lightning's ModelCheckpoint file names (e.g. 'epoch=0-step=10.ckpt') do not fit; "
                    "save with lightning_lora_ckpt.PeriodicCheckpoint instead"
                ) from None
        if checkpoint_layout and checkpoint_layout[2] != payload.checkpoint_type:
            raise ValueError(
                f"Cannot save a {payload.checkpoint_type} checkpoint at {uri}: that folder is for "
                f"{checkpoint_layout[2]} checkpoints; save under {layout.TYPE_DIRS[payload.checkpoint_type]}/ instead"
            )
        payload.user_metadata.update(extra_metadata)

        def commit() -> Manifest:
            return self._commit(payload, uri, ttl_seconds, overwrite)

        if self._async is not None:
            self._async.save(payload, commit)
        else:
            self._run(commit, True)

    @override
    def load_checkpoint(
        self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Read and verify a checkpoint and rebuild the dict Lightning restores from (tensors on CPU).

        Raises:
            CheckpointFormatError: the checkpoint is missing, damaged or malformed.
        """
        self.wait()
        opened = open_checkpoint(self.resolve_existing(path), storage_options=self.storage_options, with_state=None)
        return checkpoint_from_opened(opened)

    @override
    def remove_checkpoint(self, path: _PATH) -> None:
        """Delete a whole checkpoint directory, after every write queued before it has committed.

        If the save queued last before it failed, the deletion is skipped: the checkpoint it would
        replace stays.
        """

        def delete() -> None:
            if self._write_failed:
                log.warning("Not deleting checkpoint %s: the save before it failed", os.fspath(path))
                return
            with storage_errors("delete checkpoint", os.fspath(path)):
                uri = self.resolve_existing(path)  # here, so the lookup sees every earlier queued save
            delete_checkpoint(uri, self.storage_options)

        if self._async is not None:
            self._async.submit(delete, is_save=False)
        else:
            self._run(delete, False)

    @override
    def teardown(self) -> None:
        """Wait for every pending write; raise the first error."""
        if self._async is not None:
            self._async.close()

    # -- background writing -----------------------------------------------------------------------
    @property
    def snapshots_pending(self) -> bool:
        """Whether an asynchronous save may still be reading the live adapter and optimizer tensors."""
        return self._async is not None and self._async.snapshots_pending

    def wait_for_snapshots(self) -> None:
        """Block until every asynchronous save queued so far has copied its tensors (optimizer updates
        wait for this by themselves)."""
        if self._async is not None:
            self._async.wait_for_snapshots()

    def wait(self) -> None:
        """Block until every queued save and deletion has finished; raise the first error."""
        if self._async is not None:
            self._async.wait()

    def _run(self, job: Callable[[], Any], is_save: bool) -> Any:
        """Run one commit or deletion; a failed save stops later queued deletions (older checkpoints stay)."""
        try:
            result = job()
        except CheckpointWriteError as err:
            self._write_failed = self._write_failed or is_save
            if self.on_error == "raise":
                raise
            log.warning("%s; training continues (LoRACheckpointIO on_error='warn')", err)
            return None
        except BaseException:
            self._write_failed = self._write_failed or is_save
            raise
        if is_save:
            self._write_failed = False
        return result

    def _commit(self, payload: CheckpointPayload, uri: str, ttl_seconds: float | None, overwrite: bool) -> Manifest:
        created = utcnow()
        checkpoint_layout = layout.split_checkpoint_uri(uri)
        if checkpoint_layout:
            run_root, run_id, _, name = checkpoint_layout
            run = TrainingRun(
                run_id=run_id,
                base_model=payload.base_model.name_or_path,
                base_model_fingerprint=payload.base_model.fingerprint,
                lora_rank=payload.lora_rank,
                lora_config=payload.adapter_config,
                created_at=created,
                user_metadata=payload.user_metadata,
            )
            with storage_errors("write checkpoint", uri):  # run.json is part of a run's first save
                write_if_absent(layout.join(run_root, run_id, RUN_FILE), run.to_json(), self.storage_options)
        else:
            run_id, name = self.ensure_run_id(), uri.rsplit("/", 1)[-1]

        def make_manifest(files: dict[str, FileEntry]) -> Manifest:
            return Manifest(
                checkpoint_type=payload.checkpoint_type,
                run_id=run_id,
                name=name,
                created_at=created,
                step=payload.step,
                epoch=payload.epoch,
                base_model=payload.base_model,
                lora_rank=payload.lora_rank,
                files=files,
                expires_at=created + timedelta(seconds=ttl_seconds) if ttl_seconds else None,
                user_metadata=payload.user_metadata,
                versions=versions(),
            )

        return commit_checkpoint(uri, payload.to_files(), make_manifest, self.storage_options, replace=overwrite)


def _parse_save_options(options: Mapping[str, Any] | None) -> tuple[float | None, dict[str, Any], bool]:
    options = dict(options or {})
    ttl = options.pop("ttl_seconds", None)
    metadata = options.pop("user_metadata", None) or {}
    overwrite = bool(options.pop("overwrite", False))
    if options:
        raise ValueError(
            f"Unknown storage_options {sorted(options)} for LoRACheckpointIO.save_checkpoint; "
            "supported: 'ttl_seconds', 'user_metadata', 'overwrite'"
        )
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or ttl <= 0):
        raise ValueError(f"ttl_seconds must be a positive number of seconds or None, got {ttl!r}")
    if not isinstance(metadata, dict):
        raise ValueError(f"user_metadata must be a dict, got {type(metadata).__name__}")
    try:
        json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"user_metadata must be JSON-serialisable: {err}") from err
    return ttl, metadata, overwrite
