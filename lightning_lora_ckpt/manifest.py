"""The checkpoint format: file names of a checkpoint directory and its ``checkpoint.json`` manifest.

The manifest is written last; a directory without one is not a checkpoint. It lists every other file
with size and sha256 (the immutable content) next to mutable metadata (expiry, public flag), so the
metadata can change without touching or invalidating the checksummed files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from datetime import datetime, timezone
from typing import Any

from .uris import CheckpointType, validate_name

FORMAT = "lightning-lora-ckpt"
FORMAT_VERSION = 1

MANIFEST = "checkpoint.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"

#: The files each checkpoint type holds besides the manifest, in write order.
FILES: dict[CheckpointType, tuple[str, ...]] = {
    "sampler": (ADAPTER_WEIGHTS, ADAPTER_CONFIG),
    "training": (ADAPTER_WEIGHTS, ADAPTER_CONFIG, STATE_TENSORS, STATE_JSON),
}
MAX_MANIFEST_BYTES = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


class CheckpointFormatError(ValueError):
    """A checkpoint directory is missing, incomplete, tampered with or not in this format."""


@dataclasses.dataclass(frozen=True)
class FileEntry:
    """Size and sha256 of one file of a checkpoint."""

    size: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class BaseModelRef:
    """The frozen base a checkpoint needs: its HF id, local path or built-in name, and a config fingerprint.

    ``quantization`` records how the base was quantized in training (``"nf4"``, ``"int8"`` or None) so
    loaders rebuild it the same way by default; it is not part of the base's identity.
    """

    name_or_path: str
    fingerprint: str
    quantization: str | None = None

    def check_compatible(self, other: BaseModelRef, checkpoint: str) -> None:
        """Raise ``ValueError`` naming both bases if ``other`` is not the base this checkpoint was trained on."""
        if self.fingerprint != other.fingerprint:
            raise ValueError(
                f"Checkpoint {checkpoint} was trained on base model {self.name_or_path!r} "
                f"(fingerprint {self.fingerprint[:12]}) and cannot be loaded onto {other.name_or_path!r} "
                f"(fingerprint {other.fingerprint[:12]}); pass base_model={self.name_or_path!r}"
            )


@dataclasses.dataclass(frozen=True)
class Manifest:
    """Contents of ``checkpoint.json``."""

    checkpoint_type: CheckpointType
    run_id: str
    name: str
    created_at: datetime
    step: int
    epoch: int
    base_model: BaseModelRef
    lora_rank: int
    files: dict[str, FileEntry]
    expires_at: datetime | None = None
    public: bool = False
    user_metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    versions: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def content_sha256(self) -> str:
        """Identity of the checkpoint's immutable content (the checksummed file list)."""
        files = {k: dataclasses.asdict(v) for k, v in sorted(self.files.items())}
        return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def to_json(self) -> bytes:
        data = dataclasses.asdict(self)
        data["created_at"] = iso_time(self.created_at)
        data["expires_at"] = iso_time(self.expires_at) if self.expires_at else None
        return json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **data}, indent=2).encode()

    @classmethod
    def from_json(cls, raw: bytes, source: str) -> Manifest:
        """Parse and validate a manifest; ``source`` names it in errors."""

        def bad(why: str) -> CheckpointFormatError:
            return CheckpointFormatError(f"Invalid checkpoint manifest {source}: {why}")

        if len(raw) > MAX_MANIFEST_BYTES:
            raise bad(f"larger than {MAX_MANIFEST_BYTES} bytes")
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as err:
            raise bad(f"not JSON ({err})") from err
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise bad(f"'format' is not {FORMAT!r}")
        if data.get("format_version") != FORMAT_VERSION:
            raise bad(f"unsupported format_version {data.get('format_version')!r}; upgrade lightning-lora-ckpt")
        try:
            ctype = data["checkpoint_type"]
            if ctype not in FILES:
                raise bad(f"unknown checkpoint_type {ctype!r}")
            files = {str(k): FileEntry(**v) for k, v in data["files"].items()}
            if set(files) != set(FILES[ctype]):
                raise bad(f"a {ctype} checkpoint must list exactly {sorted(FILES[ctype])}, got {sorted(files)}")
            for fname, entry in files.items():
                if type(entry.size) is not int or entry.size < 0 or not _SHA256.fullmatch(str(entry.sha256)):
                    raise bad(f"bad size or sha256 for {fname}")
            manifest = cls(
                checkpoint_type=ctype,
                run_id=validate_name(data["run_id"], "run id"),
                name=validate_name(data["name"], "checkpoint name"),
                created_at=parse_time(data["created_at"]),
                step=_int(data["step"]),
                epoch=_int(data["epoch"]),
                base_model=BaseModelRef(**data["base_model"]),
                lora_rank=_int(data["lora_rank"]),
                files=files,
                expires_at=parse_time(data["expires_at"]) if data.get("expires_at") else None,
                public=bool(data.get("public", False)),
                user_metadata=dict(data.get("user_metadata") or {}),
                versions=dict(data.get("versions") or {}),
            )
        except CheckpointFormatError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise bad(f"{type(err).__name__}: {err}") from err
        if not isinstance(manifest.base_model.name_or_path, str) or not isinstance(
            manifest.base_model.fingerprint, str
        ):
            raise bad("base_model must hold strings")
        if not isinstance(manifest.base_model.quantization, (str, type(None))):
            raise bad("base_model.quantization must be a string or null")
        return manifest


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def iso_time(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def parse_time(value: Any) -> datetime:
    t = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _int(value: Any) -> int:
    if type(value) is not int:
        raise TypeError(f"expected an integer, got {value!r}")
    return value
