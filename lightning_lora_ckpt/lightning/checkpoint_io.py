"""``LoRACheckpointIO``: Lightning's CheckpointIO plugin writing sampler weights and training state."""

from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from typing import Any, Literal

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.utilities.types import _PATH
from typing_extensions import override

from ..format import layout
from ..format.layout import CheckpointType
from ..format.manifest import MANIFEST, FileEntry, Manifest
from ..format.payload import CheckpointPayload
from ..format.records import RUN_FILE, Checkpoint, TrainingRun
from ..format.strict_json import CheckpointFormatError, utcnow
from ..storage.commit import (
    commit_checkpoint,
    delete_checkpoint,
    protected_reason,
    retire_checkpoint,
    write_if_absent,
)
from ..storage.fs import CheckpointWriteError, storage_errors, url_to_fs
from ..storage.loading import open_checkpoint
from ..storage.read import read_manifest
from ..storage.store import CheckpointStore
from .async_io import AsyncSaves
from .checkpoint_dict import (
    LORA_KEY,
    AdapterBinding,
    checkpoint_from_opened,
    payload_from_checkpoint,
    versions,
)
from .fabric_support import from_fabric, is_fabric_state, to_fabric
from .local_tier import LocalTier, newest_of
from .resume import install_last_checkpoint_lookup, install_restore_after_setup
from .resume_checks import check_resume_state
from .snapshot_writer import SnapshotChains

log = logging.getLogger(__name__)
OnError = Literal["raise", "warn"]
#: The file suffix of Lightning's checkpoint names, dropped from checkpoint directory names.
CKPT_SUFFIX = ".ckpt"


class LoRACheckpointIO(CheckpointIO):
    """Lightning's checkpoint plugin for LoRA: sampler and training checkpoints in the layout of docs/format.md,
    on any fsspec URI, pickle-free and atomically, for any LightningModule holding a PEFT LoRA adapter.

    Args:
        root: where bare checkpoint names and ``lora://`` URIs resolve (``$LORA_CKPT_ROOT`` if None).
        run_id: the run bare names are saved under (a fresh ``run-<time>-<hex>`` id if None).
        async_save: while a Trainer fits (and under Fabric), copy the tensors to the CPU in a background
            thread while the next training step computes (its optimizer update waits for the copy), then
            write them in another; saves commit in order, errors surface at the next save or at the end
            of fit. Saves outside fit (e.g. ``trainer.save_checkpoint`` after it) commit before returning.
        storage_options: fsspec options for the root's filesystem (e.g. S3 credentials or endpoint; on
            ``s3://`` the retry and timeout settings of ``config_kwargs`` default to
            ``storage.fs.S3_CONFIG_DEFAULTS``).
        on_error: what a save or deletion does when the storage keeps failing after its retries
            (:class:`~lightning_lora_ckpt.CheckpointWriteError`): ``"raise"`` (at once when
            synchronous, else at the next save or the end of fit), or ``"warn"``: log a warning and
            keep training. Either way the failed checkpoint is never visible, and while the last save of
            a type (training or sampler) has failed, deletions of checkpoints of that type (a rolling or
            ``keep_last`` one) are skipped, so older ones stay: a failed training save followed by a
            sampler save that succeeds never lets the last training checkpoint go.
        local_tier: a local directory (fast NVMe) that saves commit to first; each one is then mirrored to
            ``root`` in the background, in order, verified (``lightning.local_tier``). Mirror failures are raised or
            warned per ``on_error``; ``ckpt_path="last"`` takes the newest training checkpoint of either tier.
        max_deltas: full-parameter sampler checkpoints (``LoRAModule(rank=0)``) form snapshot chains: the first of a
            process is a base, the next ones deltas against the previous one (XOR, zstandard), up to this many,
            then a base again (``lightning.snapshot_writer``); 0 writes every one as a base.

    ``save_checkpoint`` accepts ``storage_options={"ttl_seconds": ..., "user_metadata": {...},
    "overwrite": ...}``. Saving to an existing name replaces it atomically, as Lightning does, except a
    published checkpoint (an error naming it); ``overwrite=False`` refuses to replace anything.

    Paths: a bare name goes under ``root/run_id/weights/`` (or ``sampler_weights/``); a path ending in
    ``.ckpt`` (Lightning's ``ModelCheckpoint`` file names) is the checkpoint directory without the suffix,
    and a ``last.ckpt`` link (``save_last="link"``) loads the checkpoint it points to. With Fabric, call
    :meth:`bind` once with the model.
    """

    def __init__(
        self,
        root: str | None = "./checkpoints",
        run_id: str | None = None,
        async_save: bool = True,
        storage_options: dict[str, Any] | None = None,
        on_error: OnError = "raise",
        local_tier: str | os.PathLike[str] | None = None,
        max_deltas: int = 4,
    ) -> None:
        if on_error not in ("raise", "warn"):
            raise ValueError(f"on_error must be 'raise' or 'warn', got {on_error!r}")
        self.root = layout.default_root(root)
        self.run_id = layout.validate_name(run_id, "run id") if run_id else None
        self.async_save = async_save
        self.storage_options = dict(storage_options or {})
        self.on_error = on_error
        self._async = AsyncSaves(self._run)  # idle (no threads) until a save runs in the background
        #: Whether the last save of each type failed: deletions of that type are skipped while it has.
        self._save_failed: dict[CheckpointType, bool] = {"training": False, "sampler": False}
        #: The types of the saves queued and not yet run, in order (they run in this order).
        #: The adapter saves pick out (bound by the plugin's callback at setup, or by :meth:`bind` for Fabric).
        self.adapter_binding: AdapterBinding | None = None
        #: The module loads restore into, while a Trainer runs (or for Fabric); loads give it its parameter names.
        self.bound_module: torch.nn.Module | None = None
        self._fabric_key: str | None = None
        #: Set by the plugin's callback: True while a Trainer fits, False once a fit has ended (saves then commit
        #: before they return); None for an IO no Trainer has used (direct calls, Fabric: asynchronous).
        self.fitting: bool | None = None
        #: The scalar metrics recorded in each checkpoint's manifest, asked at each save (set by the plugin's callback
        #: at setup: the Trainer's ``callback_metrics``); None records none (Fabric).
        self.metrics_source: Callable[[], dict[str, float]] | None = None
        #: The fast local tier saves commit to before they are mirrored to ``root`` (None: saves go to ``root``).
        self.local_tier = (
            LocalTier(local_tier, self.root, self.storage_options, self._mirror_failed) if local_tier else None
        )
        self._mirror_error: CheckpointWriteError | None = None
        self.snapshots = SnapshotChains(max_deltas)
        install_last_checkpoint_lookup(LoRACheckpointIO)
        install_restore_after_setup(LoRACheckpointIO)

    # -- naming -----------------------------------------------------------------------------------
    def ensure_run_id(self) -> str:
        """The run id bare names are saved under, drawn on first use if none was given."""
        if self.run_id is None:
            self.run_id = f"run-{utcnow():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
        return self.run_id

    def bind(self, model: torch.nn.Module, key: str = "model") -> None:
        """Fabric: bind the module whose PEFT adapter ``fabric.save`` / ``fabric.load`` store and restore.

        Call it once, e.g. after ``model, optimizer = fabric.setup(model, optimizer)``.

        Args:
            model: the module (or Fabric's wrapper of it) holding the PEFT LoRA model.
            key: the entry of the Fabric state that holds it (``fabric.save(path, {"model": model, ...})``).

        Raises:
            ValueError: ``model`` holds no single PEFT LoRA adapter the plugin can save, with the fix.
        """
        module = getattr(model, "module", model)  # Fabric's wrapper holds the user's module
        existing = getattr(module, "adapter_binding", None)
        self.adapter_binding = existing if isinstance(existing, AdapterBinding) else AdapterBinding.of_module(module)
        self.bound_module = module
        self._fabric_key = key

    def resolve(self, path: _PATH, checkpoint_type: CheckpointType) -> str:
        """The URI a save of ``checkpoint_type`` to ``path`` writes: bare names go under ``root/run_id/<kind>/``.

        A ``.ckpt`` suffix (Lightning's file names) is dropped: ``<dir>/epoch=0-step=3.ckpt`` is the
        checkpoint ``<dir>/epoch=0-step=3``.
        """
        text = os.fspath(path).removesuffix(CKPT_SUFFIX)
        if "/" not in text and os.sep not in text and "://" not in text:
            return layout.checkpoint_uri(self.root, self.ensure_run_id(), checkpoint_type, text)
        uri = layout.resolve(text, self.root)
        return uri if "://" in uri else os.path.abspath(uri)

    def resolve_existing(self, path: _PATH) -> str:
        """The URI of an existing checkpoint: a bare name is looked up under ``weights/``, then ``sampler_weights/``;
        a local ``.ckpt`` link (``ModelCheckpoint(save_last="link")``) leads to the checkpoint it names."""
        text = os.fspath(path)
        if text.endswith(CKPT_SUFFIX) and os.path.islink(text):
            target = os.readlink(text)
            if os.path.basename(target) != target:  # ModelCheckpoint links to a sibling; anything else is not ours
                raise ValueError(
                    f"{text} links to {target!r}, not to a checkpoint beside it; load that checkpoint by its path"
                )
            path = os.path.join(os.path.dirname(text), target)
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
            FileExistsError: a checkpoint is committed at ``path`` and ``overwrite=False``.
            CheckpointConflictError: the checkpoint at ``path`` is published (never replaced).
            CheckpointWriteError: the storage kept failing (synchronous saves, ``on_error="raise"``).
        """
        self._async.raise_failed()
        self._raise_mirror_failed()
        ttl_seconds, extra_metadata, overwrite = _parse_save_options(storage_options)
        if self.adapter_binding is not None and LORA_KEY not in checkpoint:
            if self._fabric_key is not None and is_fabric_state(checkpoint):
                checkpoint = from_fabric(checkpoint, self.adapter_binding, self._fabric_key)
            else:  # Lightning's dict (weights_only saves call no callback hook: the adapter is picked out here)
                self.adapter_binding.to_checkpoint(checkpoint)
        background = self._background()
        payload = payload_from_checkpoint(checkpoint, defer_copy=background is not None)
        payload.metrics = self.metrics_source() if self.metrics_source is not None else {}
        uri = self.resolve(path, payload.checkpoint_type)
        checkpoint_layout = layout.split_checkpoint_uri(uri)
        if not checkpoint_layout:
            try:
                layout.validate_name(uri.rsplit("/", 1)[-1], "checkpoint name")
            except ValueError as err:
                raise ValueError(f"{err}; the checkpoint is the directory {uri}") from None
        if checkpoint_layout and checkpoint_layout[2] != payload.checkpoint_type:
            raise ValueError(
                f"Cannot save a {payload.checkpoint_type} checkpoint at {uri}: that folder is for "
                f"{checkpoint_layout[2]} checkpoints; save under {layout.TYPE_DIRS[payload.checkpoint_type]}/ instead"
            )
        payload.user_metadata.update(extra_metadata)

        def commit() -> Manifest:
            return self._commit(payload, uri, ttl_seconds, overwrite)

        if background is not None:
            background.save(payload, commit)
        else:
            self._run(commit, payload.checkpoint_type)

    @override
    def load_checkpoint(
        self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Read and verify a checkpoint and rebuild the dict Lightning restores from (tensors on CPU).

        While a Trainer fits (the plugin makes it load after the strategy's setup), the whole state is checked
        against the bound module and the live optimizers and schedulers before Lightning restores any of it.

        Raises:
            CheckpointFormatError: the checkpoint is missing, damaged or malformed (its optimizer state too).
            ValueError: the checkpoint does not fit the bound module (base, LoRA config, adapter shapes) or its
                optimizer and scheduler states do not fit the live ones (see ``check_optimizer_states``).
        """
        self.wait()
        opened = open_checkpoint(self.resolve_existing(path), storage_options=self.storage_options, with_state=None)
        checkpoint = checkpoint_from_opened(opened)
        binding, module = self.adapter_binding, self.bound_module
        if binding is None or module is None:
            return checkpoint
        if self._fabric_key is not None:
            return to_fabric(checkpoint, binding, module, self._fabric_key)
        # A Trainer restores from this dict: the adapter under the bound module's parameter names, checked here
        # (the module loads it non-strictly: the frozen base is not in a checkpoint).
        binding.check(checkpoint["state_dict"], checkpoint[LORA_KEY])
        trainer = getattr(module, "_trainer", None)
        if trainer is not None:
            check_resume_state(checkpoint, trainer, module)
        checkpoint["state_dict"] = binding.module_state(checkpoint["state_dict"])
        return checkpoint

    @override
    def remove_checkpoint(self, path: _PATH) -> None:
        """Delete a whole checkpoint directory, after every write queued before it has committed.

        Skipped (with a warning), so that the checkpoint stays:

        - while the last save of its type (training or sampler) queued before it has failed: a deletion
          only follows the commit of the checkpoint that replaces it;
        - if it is published or pinned (``CheckpointStore.publish``, ``pin``), judged at the moment of the
          deletion: rotations never delete a published or pinned checkpoint.
        """
        text = os.fspath(path)
        if text.endswith(CKPT_SUFFIX) and os.path.islink(text):  # a save_last="link" link: only the link goes
            os.remove(text)
            return

        self.after_saves(lambda: self._delete(path, retire=False))

    def retire_after_saves(self, select: Callable[[], Iterable[_PATH]]) -> None:
        """Soft-delete (``storage.commit.retire_checkpoint``) the checkpoints ``select()`` names, once every save and
        deletion queued before this call has finished: ``select`` runs then, so it sees their commits.

        Each one is skipped as :meth:`remove_checkpoint` skips a deletion (the last save of its type failed; it
        is published or pinned, judged at the moment). Rank 0 only, like every ``CheckpointIO`` call.

        Args:
            select: returns the checkpoints to retire (paths or URIs); it runs in the writer thread while saves
                are asynchronous.
        """

        def retire() -> None:
            for path in select():
                self._delete(path, retire=True)

        self.after_saves(retire)

    def after_saves(self, job: Callable[[], Any]) -> None:
        """Run ``job`` (which queues nothing) after every save and deletion queued before it: in the background while
        saves run there, else now; its errors are handled as a deletion's (``on_error``)."""
        background = self._background()
        if background is not None:
            background.submit(job, None)
        else:
            self._run(job, None)

    def _delete(self, path: _PATH, retire: bool) -> None:
        """Delete (or soft-delete) a checkpoint now, unless the last save of its type failed or it is protected."""
        with storage_errors("delete checkpoint", os.fspath(path)):
            uri = self.resolve_existing(path)  # here, so the lookup sees every earlier queued save
            try:
                manifest: Manifest | None = read_manifest(uri, self.storage_options)
            except CheckpointFormatError:  # nothing committed there (leftovers are still removed)
                manifest = None
        in_layout = layout.split_checkpoint_uri(uri)
        kind = manifest.checkpoint_type if manifest else in_layout[2] if in_layout else None
        if any(self._save_failed[t] for t in ((kind,) if kind else tuple(self._save_failed))):
            log.warning(
                "Not deleting checkpoint %s: the last %s save before it failed, so it may be the newest one left",
                os.fspath(path),
                kind or "checkpoint",
            )
            return
        delete = retire_checkpoint if retire else delete_checkpoint
        if self.local_tier is None:
            delete(uri, self.storage_options, _protected)
            return
        tier = self.local_tier  # behind the mirror of what it deletes, then its local copy too

        def both() -> None:
            if delete(uri, self.storage_options, _protected) is not None:
                tier.forget(uri)

        tier.submit(both, f"delete checkpoint {uri} from")

    @override
    def teardown(self) -> None:
        """Wait for every pending write and mirror; raise the first error."""
        self._async.close()
        if self.local_tier is not None:
            self.local_tier.close()
        self._raise_mirror_failed()

    def last_training_checkpoint(self) -> Checkpoint | None:
        """The run's newest committed training checkpoint, of either tier (what ``ckpt_path="last"`` resumes).

        Returns:
            Its record, or None if the run (or its id) has none.
        """
        if self.run_id is None:
            return None
        durable = CheckpointStore(self.root, self.storage_options).last_checkpoint(self.run_id, "training")
        return newest_of(durable, self.local_tier.newest(self.run_id) if self.local_tier else None)

    def _mirror_failed(self, err: CheckpointWriteError) -> None:
        if self.on_error == "warn":
            log.warning("%s; the checkpoint stays in the local tier (LoRACheckpointIO on_error='warn')", err)
        elif self._mirror_error is None:
            self._mirror_error = err

    def _raise_mirror_failed(self) -> None:
        err, self._mirror_error = self._mirror_error, None
        if err is not None:
            raise err

    # -- background writing -----------------------------------------------------------------------
    @property
    def snapshots_pending(self) -> bool:
        """Whether an asynchronous save may still be reading the live adapter and optimizer tensors."""
        return self._async.snapshots_pending

    def wait_for_snapshots(self) -> None:
        """Block until every asynchronous save queued so far has copied its tensors (optimizer updates
        wait for this by themselves)."""
        self._async.wait_for_snapshots()

    def wait(self) -> None:
        """Block until every queued save, deletion and mirror has finished; raise the first error."""
        self._async.wait()
        if self.local_tier is not None:
            self.local_tier.wait()
        self._raise_mirror_failed()

    def _background(self) -> AsyncSaves | None:
        """Where saves and deletions run: in the background, except after a Trainer's fit has ended: then now,
        after every earlier queued job, so that a save after ``fit`` has committed when it returns."""
        if self.async_save and (self.fitting is not False or self._fabric_key is not None):
            return self._async
        self._async.wait()
        return None

    def _run(self, job: Callable[[], Any], saving: CheckpointType | None) -> Any:
        """Run one save of type ``saving`` (or a deletion: None); a failed save stops later deletions of its type,
        so the older checkpoints it would replace stay."""
        try:
            result = job()
        except CheckpointWriteError as err:
            if saving is not None:
                self._save_failed[saving] = True
            if self.on_error == "raise":
                raise
            log.warning("%s; training continues (LoRACheckpointIO on_error='warn')", err)
            return None
        except BaseException:
            if saving is not None:
                self._save_failed[saving] = True
            raise
        if saving is not None:
            self._save_failed[saving] = False
        return result

    def _commit(
        self, payload: CheckpointPayload, uri: str, ttl_seconds: float | None, overwrite: bool | None
    ) -> Manifest:
        created = utcnow()
        durable, local = uri, self.local_tier.local_uri(uri) if self.local_tier else None
        uri, options = (local, {}) if local else (uri, self.storage_options)
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
                write_if_absent(layout.join(run_root, run_id, RUN_FILE), run.to_json(), options)
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
                metrics=payload.metrics,
            )

        files, finish = self.snapshots.prepare(payload, uri, name, payload.to_files(), options)
        manifest = commit_checkpoint(
            uri, files, lambda f: finish(make_manifest(f)), options, replace=overwrite is not False
        )
        self.snapshots.committed(manifest)
        if local and self.local_tier:
            self.local_tier.mirror(local, durable)
        return manifest


def _parse_save_options(options: Mapping[str, Any] | None) -> tuple[float | None, dict[str, Any], bool | None]:
    options = dict(options or {})
    ttl = options.pop("ttl_seconds", None)
    metadata = options.pop("user_metadata", None) or {}
    overwrite = options.pop("overwrite", None)
    if overwrite is not None and not isinstance(overwrite, bool):
        raise ValueError(f"overwrite must be True, False or None, got {overwrite!r}")
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


def _protected(manifest: Manifest) -> str | None:
    """Why a rotation keeps a checkpoint: it is published or pinned."""
    reason = protected_reason(manifest)
    return f"{reason} (unpublish or unpin it to let it be deleted)" if reason else None
