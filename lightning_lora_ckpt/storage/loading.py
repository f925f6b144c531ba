"""The one way to open a checkpoint: URI -> verified manifest + decoded :class:`CheckpointPayload`.

Sampling, merging, Hub push, hotload, ``LoRAModule.from_checkpoint`` and resume all open checkpoints
here, so a check added once (sizes, checksums, config types, ranks, base model) applies to every reader.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from ..format.files import ReadBytes
from ..format.layout import resolve
from ..format.manifest import STATE_FILES, BaseModelRef, Manifest
from ..format.payload import CheckpointPayload
from ..format.strict_json import CheckpointFormatError, iso_time
from .chain import rebuild_weights
from .read import read_checkpoint


@dataclasses.dataclass(frozen=True)
class OpenedCheckpoint:
    """A checkpoint read and verified: where it is, its manifest, the verified bytes of the files read, and
    their decoded contents.

    Attributes:
        uri: the checkpoint directory's resolved URI.
        manifest: its validated manifest.
        files: the verified bytes of the files read, by file name (a delta snapshot's: the full files it stands for).
        payload: their decoded contents.
    """

    uri: str
    manifest: Manifest
    files: dict[str, ReadBytes]
    payload: CheckpointPayload

    @property
    def adapter(self) -> dict[str, Any]:
        """The adapter tensors under PEFT's key names (a full-parameter checkpoint: every weight of its model)."""
        return self.payload.adapter

    @property
    def adapter_config(self) -> dict[str, Any]:
        """The adapter's PEFT config (``adapter_config.json``; ``{}`` for a full-parameter checkpoint)."""
        return self.payload.adapter_config


def open_checkpoint(
    uri: str | os.PathLike[str],
    root: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    *,
    with_state: bool | None = False,
    base_model: BaseModelRef | None = None,
    deadline_s: float | None = None,
) -> OpenedCheckpoint:
    """Read, verify and decode the checkpoint at ``uri`` (any fsspec URI, local path or ``lora://``).

    Args:
        uri: the checkpoint directory.
        root: where ``lora://`` URIs resolve (``$LORA_CKPT_ROOT`` if None).
        storage_options: fsspec options of the checkpoint's filesystem.
        with_state: also read the training state (optimizer, loops, RNG): True requires a training
            checkpoint, None reads it if the checkpoint has one.
        base_model: refuse the checkpoint unless it was trained on this base.
        deadline_s: the most seconds to wait for the manifest of a checkpoint replaced while it is read
            (``read.READ_DEADLINE_S`` if None).

    Returns:
        The opened checkpoint: one committed version, whole, even if it was replaced while it was read; its
        payload holds the training state only ``with_state``. A delta snapshot's weights are rebuilt through its
        chain (``storage.chain``): ``files`` holds the full model directory.

    Raises:
        CheckpointFormatError: the checkpoint is missing, damaged or malformed, or was deleted (or kept being
            replaced) while it was read.
        ValueError: ``with_state`` on a sampler checkpoint, or a checkpoint of another base.
    """
    resolved = resolve(uri, root)

    def names(manifest: Manifest) -> list[str]:  # checked again on each version, if it was replaced meanwhile
        if manifest.deleted_at is not None:
            raise CheckpointFormatError(
                f"Checkpoint {resolved} was deleted by a retention policy at {iso_time(manifest.deleted_at)}; "
                f"bring it back with `lightning-lora-ckpt restore {resolved}` before gc purges it"
            )
        if with_state and manifest.checkpoint_type != "training":
            raise ValueError(f"{resolved} is a sampler checkpoint; the training state needs a training checkpoint")
        if base_model is not None:
            manifest.base_model.check_compatible(base_model, resolved)
        return [n for n in manifest.files if with_state is not False or n not in STATE_FILES]

    manifest, files = read_checkpoint(resolved, names, storage_options, deadline_s=deadline_s)
    files = rebuild_weights(resolved, manifest, files, storage_options)
    return OpenedCheckpoint(resolved, manifest, files, CheckpointPayload.from_files(manifest, files, resolved))
