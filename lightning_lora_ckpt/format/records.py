"""Metadata records users see: :class:`Checkpoint` and :class:`TrainingRun` (``run.json``)."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from typing import Any

from .layout import TYPE_DIRS, CheckpointType
from .manifest import Manifest
from .strict_json import CheckpointFormatError, iso_time, load_json_object, parse_time

RUN_FILE = "run.json"
#: The most bytes a ``run.json`` may hold (a real one is well under 10 KiB): a larger one is refused unread.
MAX_RUN_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One committed checkpoint, as listed by :class:`~lightning_lora_ckpt.CheckpointStore`.

    Attributes:
        checkpoint_id: ``weights/<name>`` (training) or ``sampler_weights/<name>`` (sampler).
        checkpoint_type: ``"training"`` or ``"sampler"``.
        time: when it was saved (UTC).
        path: the full URI of the checkpoint directory.
        size_bytes: total size of its files (the manifest not included).
        public: whether it is published (never deleted by ``gc`` or bucket lifecycle rules).
        expires_at: when ``gc`` may delete it (UTC), or None if it never expires.
        step: the global step it was saved at.
        base_model: the name or path of the base model it was trained on.
        lora_rank: the adapter's LoRA rank ``r``.
        run_id: the run it belongs to.
        user_metadata: free-form JSON metadata stored in its manifest.
        metrics: the scalar metrics logged when it was saved (``trainer.callback_metrics``), by name.
        pinned: whether it is pinned (nothing deletes or replaces it).
        snapshot: ``"base"`` or ``"delta"`` for a full-parameter sampler checkpoint of a snapshot chain, else None.
        parent: a delta's parent checkpoint (its name, a sampler checkpoint of the same run), else None.
    """

    checkpoint_id: str
    checkpoint_type: CheckpointType
    time: datetime
    path: str
    size_bytes: int
    public: bool
    expires_at: datetime | None
    step: int
    base_model: str
    lora_rank: int
    run_id: str
    user_metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    pinned: bool = False
    snapshot: str | None = None
    parent: str | None = None

    @classmethod
    def from_manifest(cls, manifest: Manifest, path: str) -> Checkpoint:
        """The record of a checkpoint from its manifest.

        Args:
            manifest: the checkpoint's validated manifest.
            path: the checkpoint directory's URI.

        Returns:
            The record.
        """
        return cls(
            checkpoint_id=f"{TYPE_DIRS[manifest.checkpoint_type]}/{manifest.name}",
            checkpoint_type=manifest.checkpoint_type,
            time=manifest.created_at,
            path=path,
            size_bytes=manifest.size_bytes,
            public=manifest.public,
            expires_at=manifest.expires_at,
            step=manifest.step,
            base_model=manifest.base_model.name_or_path,
            lora_rank=manifest.lora_rank,
            run_id=manifest.run_id,
            user_metadata=manifest.user_metadata,
            metrics=manifest.metrics,
            pinned=manifest.pinned,
            snapshot=manifest.snapshot,
            parent=manifest.parent,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (times as ISO-8601 UTC).

        Returns:
            The fields as a dict; ``time`` and ``expires_at`` as strings (``expires_at`` None if unset).
        """
        data = dataclasses.asdict(self)
        data["time"] = iso_time(self.time)
        data["expires_at"] = iso_time(self.expires_at) if self.expires_at else None
        return data


@dataclasses.dataclass(frozen=True)
class TrainingRun:
    """A run: the base and LoRA config its checkpoints share, and its newest checkpoints.

    Attributes:
        run_id: the run's id (its folder under the root).
        base_model: the name or path of the base model.
        base_model_fingerprint: the sha256 of the base's architecture config.
        lora_rank: the LoRA rank ``r``.
        lora_config: the PEFT LoRA config, as a dict.
        created_at: when the run was created (UTC).
        user_metadata: free-form JSON metadata.
        last_checkpoint: the newest training checkpoint (filled in by
            :meth:`~lightning_lora_ckpt.CheckpointStore.get_run`), or None.
        last_sampler_checkpoint: the newest sampler checkpoint (likewise), or None.
    """

    run_id: str
    base_model: str
    base_model_fingerprint: str
    lora_rank: int
    lora_config: dict[str, Any]
    created_at: datetime
    user_metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    last_checkpoint: Checkpoint | None = None
    last_sampler_checkpoint: Checkpoint | None = None

    def to_json(self) -> bytes:
        """The ``run.json`` document (the last-checkpoint fields are derived from listings, not stored).

        Returns:
            The JSON document's bytes (sorted keys, ``created_at`` as ISO-8601 UTC).
        """
        data = {
            "run_id": self.run_id,
            "base_model": self.base_model,
            "base_model_fingerprint": self.base_model_fingerprint,
            "lora_rank": self.lora_rank,
            "lora_config": self.lora_config,
            "created_at": iso_time(self.created_at),
            "user_metadata": self.user_metadata,
        }
        return json.dumps(data, indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes, source: str) -> TrainingRun:
        """Parse a ``run.json`` document (the last-checkpoint fields are left None).

        Args:
            raw: the document's bytes.
            source: its URI, for the error message.

        Returns:
            The run.

        Raises:
            CheckpointFormatError: (a ``ValueError``) naming ``source``: ``raw`` is larger than
                :data:`MAX_RUN_BYTES`, is not strict JSON (or nested too deeply), lacks a required key or holds a
                value of the wrong type.
        """
        data = load_json_object(raw, MAX_RUN_BYTES, f"Invalid run metadata {source}")
        try:
            for key, types in _RUN_TYPES.items():
                if type(data[key]) not in types:
                    raise TypeError(f"{key} is {type(data[key]).__name__}, expected {types[0].__name__}")
            user_metadata = data.get("user_metadata")
            if user_metadata is not None and type(user_metadata) is not dict:
                raise TypeError(f"user_metadata is {type(user_metadata).__name__}, expected dict")
            return cls(
                run_id=data["run_id"],
                base_model=data["base_model"],
                base_model_fingerprint=data["base_model_fingerprint"],
                lora_rank=data["lora_rank"],
                lora_config=data["lora_config"],
                created_at=parse_time(data["created_at"]),
                user_metadata=user_metadata or {},
            )
        except (ValueError, KeyError, TypeError) as err:
            what = f"no key {err}" if isinstance(err, KeyError) else str(err)[:200]
            raise CheckpointFormatError(f"Invalid run metadata {source}: {what}") from err


#: The types of the required keys of ``run.json``.
_RUN_TYPES: dict[str, tuple[type, ...]] = {
    "run_id": (str,),
    "base_model": (str,),
    "base_model_fingerprint": (str,),
    "lora_rank": (int,),
    "lora_config": (dict,),
    "created_at": (str,),
}


@dataclasses.dataclass(frozen=True)
class Cursor:
    """Where a page of :meth:`CheckpointStore.list_user_checkpoints` sits in the whole listing.

    Attributes:
        offset: the index of the page's first checkpoint in the whole listing.
        limit: the page size asked for.
        total_count: how many checkpoints the whole listing holds.
    """

    offset: int
    limit: int
    total_count: int


@dataclasses.dataclass(frozen=True)
class CheckpointPage:
    """One page of :meth:`CheckpointStore.list_user_checkpoints`.

    Attributes:
        checkpoints: at most ``limit`` checkpoints, newest first.
        cursor: where the page sits in the whole listing.
    """

    checkpoints: list[Checkpoint]
    cursor: Cursor


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """Result of :meth:`CheckpointStore.verify`: ``problems`` is empty when every file matches the manifest.

    Attributes:
        path: the checkpoint's URI.
        files: the size of each file the manifest lists, by file name.
        problems: one message per damaged file, or for contents that do not decode.
    """

    path: str
    files: dict[str, int]
    problems: list[str]

    @property
    def ok(self) -> bool:
        """Whether the checkpoint is intact (no problems)."""
        return not self.problems
