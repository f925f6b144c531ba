"""``LoRACheckpointIO``: Lightning's CheckpointIO plugin writing sampler weights and training state."""

from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import Any, Literal

from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.utilities.types import _PATH

from . import storage, uris
from .manifest import MANIFEST, Manifest, utcnow
from .payload import CheckpointPayload, decode_checkpoint, snapshot_checkpoint, versions
from .records import RUN_FILE, TrainingRun
from .storage import CheckpointWriteError
from .uris import CheckpointType

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
            ``storage.S3_CONFIG_DEFAULTS``).
        on_error: what a save or deletion does when the storage keeps failing after its retries
            (:class:`~lightning_lora_ckpt.storage.CheckpointWriteError`): ``"raise"`` (at once when
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
        self.root = uris.default_root(root)
        self.run_id = uris.validate_name(run_id, "run id") if run_id else None
        self.async_save = async_save
        self.storage_options = dict(storage_options or {})
        self.on_error = on_error
        self._executor: ThreadPoolExecutor | None = None
        self._stager: ThreadPoolExecutor | None = None
        self._staging: list[Future[None]] = []
        self._pending: list[Future[Any]] = []
        self._write_failed = False

    # -- naming -----------------------------------------------------------------------------------
    def ensure_run_id(self) -> str:
        if self.run_id is None:
            self.run_id = f"run-{utcnow():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
        return self.run_id

    def resolve(self, path: _PATH, checkpoint_type: CheckpointType) -> str:
        """The URI a save of ``checkpoint_type`` to ``path`` writes: bare names go under ``root/run_id/<kind>/``."""
        text = os.fspath(path)
        if "/" not in text and os.sep not in text and "://" not in text:
            return uris.checkpoint_uri(self.root, self.ensure_run_id(), checkpoint_type, text)
        uri = uris.resolve(text, self.root)
        return uri if "://" in uri else os.path.abspath(uri)

    def resolve_existing(self, path: _PATH) -> str:
        """The URI of an existing checkpoint: a bare name is looked up under ``weights/``, then ``sampler_weights/``."""
        candidates = [self.resolve(path, t) for t in ("training", "sampler")]
        if candidates[0] == candidates[1]:  # a full URI: nothing to look up
            return candidates[0]
        for uri in candidates:
            fs, fs_path = storage.url_to_fs(uri, self.storage_options)
            if fs.exists(uris.join(fs_path, MANIFEST)):
                return uri
        return candidates[0]

    # -- CheckpointIO -----------------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        self._raise_failed()
        ttl_seconds, extra_metadata, overwrite = _parse_save_options(storage_options)
        payload = snapshot_checkpoint(checkpoint, defer_copy=self.async_save)
        uri = self.resolve(path, payload.checkpoint_type)
        layout = uris.split_checkpoint_uri(uri)
        if not layout:
            try:
                uris.validate_name(uri.rsplit("/", 1)[-1], "checkpoint name")
            except ValueError as err:
                raise ValueError(
                    f"{err}. Lightning's ModelCheckpoint file names (e.g. 'epoch=0-step=10.ckpt') do not fit; "
                    "save with lightning_lora_ckpt.PeriodicCheckpoint instead"
                ) from None
        if layout and layout[2] != payload.checkpoint_type:
            raise ValueError(
                f"Cannot save a {payload.checkpoint_type} checkpoint at {uri}: that folder is for "
                f"{layout[2]} checkpoints; save under {uris.TYPE_DIRS[payload.checkpoint_type]}/ instead"
            )
        payload.user_metadata.update(extra_metadata)
        staged = self._stage(payload) if self.async_save else None

        def write() -> Manifest:
            if staged is not None:
                staged.result()
            return self._write(payload, uri, ttl_seconds, overwrite)

        self._submit(write, is_save=True)

    def load_checkpoint(
        self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Read and verify a checkpoint and rebuild the dict Lightning restores from (tensors on CPU)."""
        self.wait()
        uri = self.resolve_existing(path)
        manifest = storage.read_manifest(uri, self.storage_options)
        files = storage.read_files(uri, manifest, list(manifest.files), self.storage_options)
        return decode_checkpoint(manifest, files, uri)

    def remove_checkpoint(self, path: _PATH) -> None:
        """Delete a whole checkpoint directory, after every write queued before it has committed.

        If the save queued last before it failed, the deletion is skipped: the checkpoint it would
        replace stays.
        """

        def delete() -> None:
            if self._write_failed:
                log.warning("Not deleting checkpoint %s: the save before it failed", os.fspath(path))
                return
            with storage.storage_errors("delete checkpoint", os.fspath(path)):
                uri = self.resolve_existing(path)  # here, so the lookup sees every earlier queued save
            storage.delete_checkpoint(uri, self.storage_options)

        self._submit(delete, is_save=False)

    def teardown(self) -> None:
        """Wait for every pending write; raise the first error."""
        self.wait()
        for executor in (self._executor, self._stager):
            if executor is not None:
                executor.shutdown()
        self._executor = self._stager = None

    # -- background writing -----------------------------------------------------------------------
    def _stage(self, payload: CheckpointPayload) -> Future[None]:
        """Copy the payload's tensors in the background while the next step computes (see ``wait_for_snapshots``)."""
        if self._stager is None:
            self._stager = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-ckpt-stager")
        staged = self._stager.submit(payload.stage)
        self._staging.append(staged)
        return staged

    @property
    def snapshots_pending(self) -> bool:
        """Whether an asynchronous save may still be reading the live tensors."""
        return bool(self._staging)

    def wait_for_snapshots(self) -> None:
        """Block until every asynchronous save queued so far has copied its tensors.

        Until then a save reads the live adapter and optimizer tensors: ``LoRAModule`` calls this before
        the next optimizer update changes them (after that step's forward and backward ran).
        """
        staging, self._staging = self._staging, []
        for staged in staging:
            staged.exception()  # a failed copy is raised by its save, at the next save or the end of fit

    def wait(self) -> None:
        """Block until every queued save and deletion has finished; raise the first error."""
        pending, self._pending = self._pending, []
        errors = [f.exception() for f in pending]
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first

    def _raise_failed(self) -> None:
        failed = [f for f in self._pending if f.done() and f.exception() is not None]
        self._pending = [f for f in self._pending if not f.done()]
        if failed:
            raise RuntimeError(f"An earlier asynchronous checkpoint write failed: {failed[0].exception()}") from (
                failed[0].exception()
            )

    def _submit(self, job: Callable[[], Any], is_save: bool) -> None:
        if not self.async_save:
            self._run(job, is_save)
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-ckpt-writer")
        self._pending.append(self._executor.submit(self._run, job, is_save))

    def _run(self, job: Callable[[], Any], is_save: bool) -> Any:
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

    def _write(self, payload: CheckpointPayload, uri: str, ttl_seconds: float | None, overwrite: bool) -> Manifest:
        created = utcnow()
        layout = uris.split_checkpoint_uri(uri)
        run_id, name = (layout[1], layout[3]) if layout else (self.ensure_run_id(), uri.rsplit("/", 1)[-1])
        if layout:
            run = TrainingRun(
                run_id=run_id,
                base_model=payload.base_model.name_or_path,
                base_model_fingerprint=payload.base_model.fingerprint,
                lora_rank=payload.lora_rank,
                lora_config=payload.adapter_config,
                created_at=created,
                user_metadata=payload.user_metadata,
            )
            with storage.storage_errors("write checkpoint", uri):  # run.json is part of a run's first save
                storage.write_json_if_absent(
                    uris.join(layout[0], run_id, RUN_FILE), run.to_json(), self.storage_options
                )

        def make_manifest(files: dict[str, Any]) -> Manifest:
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

        return storage.commit_checkpoint(
            uri, payload.to_files(), make_manifest, self.storage_options, replace=overwrite
        )


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
