"""One checkpoint's entry in its run's listing index: the listing record of its manifest, in a compact form.

The index (``<run>/.lora-ckpt-index.json``, see ``storage/index.py``) holds one entry per committed checkpoint,
under the key ``<kind>/<name>``: everything a listing, retention and ``gc`` read from a manifest (type, time,
size, step, base model, rank, TTL, public/pinned, soft deletion, user metadata, metrics), but not the file list
and digests, which only reads need and which they take from the manifest itself.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any

from .layout import TYPE_DIRS, validate_name
from .manifest import Manifest, _checkpoint_type, _count, _expect, _metrics
from .records import Checkpoint
from .snapshots import SNAPSHOTS
from .strict_json import CheckpointFormatError, iso_time, parse_time

_KEYS = {
    "checkpoint_type",
    "created_at",
    "size_bytes",
    "step",
    "base_model",
    "lora_rank",
    "public",
    "pinned",
    "expires_at",
    "deleted_at",
    "user_metadata",
    "metrics",
}
#: Written only for checkpoints of a snapshot chain, so the entries of everything else stay as older versions wrote.
_CHAIN_KEYS = {"snapshot", "parent"}


@dataclasses.dataclass(frozen=True)
class IndexEntry:
    """A checkpoint as its run's listing index holds it.

    Attributes:
        checkpoint: its listing record.
        deleted_at: when it was soft-deleted (None: it is live).
    """

    checkpoint: Checkpoint
    deleted_at: datetime | None

    @property
    def public(self) -> bool:
        """Whether it is published."""
        return self.checkpoint.public

    @property
    def pinned(self) -> bool:
        """Whether it is pinned."""
        return self.checkpoint.pinned

    @property
    def expires_at(self) -> datetime | None:
        """When it expires (None: never)."""
        return self.checkpoint.expires_at

    @classmethod
    def from_manifest(cls, manifest: Manifest, path: str) -> IndexEntry:
        """The entry of a checkpoint from its manifest.

        Args:
            manifest: its validated manifest.
            path: its URI.

        Returns:
            The entry.
        """
        return cls(Checkpoint.from_manifest(manifest, path), manifest.deleted_at)

    @staticmethod
    def data_of(manifest: Manifest) -> dict[str, Any]:
        """The JSON-ready entry that writers store for a manifest (what :meth:`from_data` reads back).

        Args:
            manifest: the checkpoint's manifest.

        Returns:
            The entry's data.
        """
        return {
            "checkpoint_type": manifest.checkpoint_type,
            "created_at": iso_time(manifest.created_at),
            "size_bytes": manifest.size_bytes,
            "step": manifest.step,
            "base_model": manifest.base_model.name_or_path,
            "lora_rank": manifest.lora_rank,
            "public": manifest.public,
            "pinned": manifest.pinned,
            "expires_at": iso_time(manifest.expires_at) if manifest.expires_at else None,
            "deleted_at": iso_time(manifest.deleted_at) if manifest.deleted_at else None,
            "user_metadata": manifest.user_metadata,
            "metrics": manifest.metrics,
            **({"snapshot": manifest.snapshot} if manifest.snapshot else {}),
            **({"parent": manifest.parent} if manifest.parent else {}),
        }

    @classmethod
    def from_data(cls, data: Any, run_id: str, kind_dir: str, name: str, path: str) -> IndexEntry:
        """Validate an entry read from an index.

        Args:
            data: the entry's parsed JSON.
            run_id: the run the index belongs to.
            kind_dir: the entry's kind folder (``weights`` / ``sampler_weights``), from its key.
            name: the checkpoint's name, from its key.
            path: the checkpoint's URI.

        Returns:
            The entry.

        Raises:
            CheckpointFormatError: the entry is not exactly what writers write (unknown or missing keys, wrong
                types, a checkpoint type that is not its kind folder's).
        """
        if not isinstance(data, dict) or not _KEYS <= set(data) <= _KEYS | _CHAIN_KEYS:
            raise CheckpointFormatError(
                f"the entry of {kind_dir}/{name} does not hold exactly the fields {sorted(_KEYS)} "
                f"(and {sorted(_CHAIN_KEYS)} in a snapshot chain)"
            )
        try:
            ctype = _checkpoint_type(data["checkpoint_type"])
            if TYPE_DIRS[ctype] != kind_dir:
                raise ValueError(f"a {ctype} checkpoint under {kind_dir}/")
            checkpoint = Checkpoint(
                checkpoint_id=f"{kind_dir}/{name}",
                checkpoint_type=ctype,
                time=parse_time(data["created_at"]),
                path=path,
                size_bytes=_count(data["size_bytes"]),
                public=_expect(data["public"], bool),
                expires_at=parse_time(data["expires_at"]) if data["expires_at"] is not None else None,
                step=_count(data["step"]),
                base_model=_expect(data["base_model"], str),
                lora_rank=_count(data["lora_rank"]),
                run_id=run_id,
                user_metadata=_expect(data["user_metadata"], dict),
                metrics=_metrics(data["metrics"]),
                pinned=_expect(data["pinned"], bool),
                snapshot=_snapshot(data.get("snapshot")),
                parent=validate_name(_expect(data["parent"], str), "parent") if "parent" in data else None,
            )
            deleted = parse_time(data["deleted_at"]) if data["deleted_at"] is not None else None
        except (TypeError, ValueError, OverflowError, AttributeError) as err:
            raise CheckpointFormatError(f"the entry of {kind_dir}/{name} is invalid: {err}") from err
        return cls(checkpoint, deleted)


def _snapshot(value: Any) -> str | None:
    if value not in (None, *SNAPSHOTS):
        raise ValueError(f"unknown snapshot {str(value)[:50]!r}")
    return value
