"""The checkpoint format: file names of a checkpoint directory and its ``checkpoint.json`` manifest.

The manifest is written last; a directory without one is not a checkpoint. It lists every other file
with its size and digest (BLAKE3, or sha256 in older checkpoints: the immutable content) next to mutable metadata (expiry, public flag), so the
metadata can change without touching or invalidating the checksummed files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable
from datetime import datetime
from typing import Any

from .digests import ALGORITHMS, HEX_DIGEST, Algorithm
from .layout import CheckpointType, validate_name
from .model_layout import MAX_MODEL_FILE_BYTES, model_file_set_problem
from .snapshots import Snapshot, snapshot_problem, stored_names
from .strict_json import CheckpointFormatError, iso_time, load_json_object, parse_time

FORMAT = "lightning-lora-ckpt"
FORMAT_VERSION = 1

MANIFEST = "checkpoint.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"

#: The training state's files, which a training checkpoint holds besides its weights.
STATE_FILES = (STATE_TENSORS, STATE_JSON)
#: The files each checkpoint type of a LoRA adapter holds besides the manifest, in write order. A full-parameter
#: checkpoint (``lora_rank`` 0) holds a Hugging Face model directory instead of the two adapter files
#: (``model_layout``), and a training one the same :data:`STATE_FILES`.
FILES: dict[CheckpointType, tuple[str, ...]] = {
    "sampler": (ADAPTER_WEIGHTS, ADAPTER_CONFIG),
    "training": (ADAPTER_WEIGHTS, ADAPTER_CONFIG, *STATE_FILES),
}
MAX_MANIFEST_BYTES = 1 << 20
#: Size caps for the JSON and text files of a checkpoint, far above any real one: a manifest listing more is refused.
MAX_FILE_BYTES = {ADAPTER_CONFIG: 1 << 20, STATE_JSON: 64 << 20, **MAX_MODEL_FILE_BYTES}
_REQUIRED: Any = object()


@dataclasses.dataclass(frozen=True)
class FileEntry:
    """Size and digest of one file of a checkpoint; in ``checkpoint.json``, ``{"size": ..., "<algorithm>": ...}``.

    Attributes:
        size: the file's size in bytes.
        digest: the digest of its bytes, as 64 lowercase hex digits.
        algorithm: ``"blake3"`` (new checkpoints) or ``"sha256"`` (older ones).
    """

    size: int
    digest: str
    algorithm: Algorithm

    def to_json(self) -> dict[str, Any]:
        """The entry as ``checkpoint.json`` holds it: the algorithm names the digest's key."""
        return {"size": self.size, self.algorithm: self.digest}


@dataclasses.dataclass(frozen=True)
class BaseModelRef:
    """The frozen base a checkpoint needs: its HF id, local path or built-in name, and a config fingerprint.

    ``quantization`` records how the base was quantized in training (``"nf4"``, ``"int8"`` or None) so
    loaders rebuild it the same way by default; it is not part of the base's identity.

    Attributes:
        name_or_path: the base's HF id, local path or built-in name.
        fingerprint: the sha256 of its architecture config (``modeling.base.config_fingerprint``).
        quantization: ``"nf4"``, ``"int8"`` or None, as in training.
    """

    name_or_path: str
    fingerprint: str
    quantization: str | None = None

    def check_compatible(self, other: BaseModelRef, checkpoint: str) -> None:
        """Raise ``ValueError`` naming both bases if ``other`` is not the base this checkpoint was trained on.

        Only the fingerprints are compared: the same base under another name or path is compatible.

        Args:
            other: the base about to be used.
            checkpoint: the checkpoint's URI, for the error message.

        Raises:
            ValueError: the fingerprints differ.
        """
        if self.fingerprint != other.fingerprint:
            raise ValueError(
                f"Checkpoint {checkpoint} was trained on base model {self.name_or_path!r} "
                f"(fingerprint {self.fingerprint[:12]}) and cannot be loaded onto {other.name_or_path!r} "
                f"(fingerprint {other.fingerprint[:12]}); pass base_model={self.name_or_path!r}"
            )


@dataclasses.dataclass(frozen=True)
class Manifest:
    """Contents of ``checkpoint.json`` (docs/format.md).

    Attributes:
        checkpoint_type: ``"training"`` or ``"sampler"``.
        run_id: the run the checkpoint belongs to.
        name: the checkpoint's name within its run and type.
        created_at: when it was saved (UTC).
        step: the global step it was saved at.
        epoch: the epoch it was saved in.
        base_model: the frozen base it needs.
        lora_rank: the adapter's LoRA rank ``r``; 0 for a full-parameter checkpoint (a whole Hugging Face model
            directory, ``LoRAModule(rank=0)``).
        files: size and digest of every other file of the checkpoint, by file name.
        expires_at: when ``gc`` may delete it (UTC), or None; mutable.
        public: whether it is published (never deleted by ``gc`` or lifecycle rules); mutable.
        user_metadata: free-form JSON metadata; mutable.
        versions: versions of the packages that wrote it, by package name.
        metrics: the scalar metrics the trainer had logged when it was saved (``callback_metrics``), by name.
        pinned: whether it is pinned (nothing deletes or replaces it); mutable.
        deleted_at: when a retention policy deleted it (UTC): it is then aside (not listed, not loadable) until
            ``gc`` purges it after the grace period or ``CheckpointStore.restore`` brings it back; mutable.
        snapshot: for a full-parameter sampler checkpoint in a snapshot chain, ``"base"`` (its weights whole) or
            ``"delta"`` (weight files stored against ``parent``'s, ``format.snapshots``); None otherwise.
        parent: a delta's parent: the name of the sampler checkpoint of its run it was taken against.
        rebuilds: a delta's full weight files (size and digest), by name: what its ``<file>.xor.zst`` rebuild.
        parent_files: the parent's weight files each delta file was taken against, by name.
    """

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
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    pinned: bool = False
    deleted_at: datetime | None = None
    snapshot: Snapshot | None = None
    parent: str | None = None
    rebuilds: dict[str, FileEntry] = dataclasses.field(default_factory=dict)
    parent_files: dict[str, FileEntry] = dataclasses.field(default_factory=dict)

    @property
    def content_sha256(self) -> str:
        """Identity of the checkpoint's immutable content (the checksummed file list)."""
        files = {k: v.to_json() for k, v in sorted(self.files.items())}
        return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()

    @property
    def full_parameter(self) -> bool:
        """Whether it holds a whole model (``lora_rank`` 0, a Hugging Face model directory) rather than an adapter."""
        return self.lora_rank == 0

    @property
    def size_bytes(self) -> int:
        """Total size of the listed files (the manifest itself not included)."""
        return sum(f.size for f in self.files.values())

    @property
    def full_files(self) -> dict[str, FileEntry]:
        """The entries of the files the checkpoint stands for: :attr:`files`, with a delta's weight files as the
        full files they rebuild."""
        if not self.rebuilds:
            return dict(self.files)
        names = stored_names(self.files, self.rebuilds)
        return {n: self.rebuilds.get(n) or self.files[n] for n in sorted(names)}

    def as_base(self) -> Manifest:
        """The manifest of this checkpoint with its weights whole (a delta rebuilt, as ``download`` writes it).

        Returns:
            Itself unless it is a delta; else a base listing :attr:`full_files`.
        """
        if self.snapshot != "delta":
            return self
        return dataclasses.replace(
            self, snapshot="base", parent=None, files=self.full_files, rebuilds={}, parent_files={}
        )

    def to_dict(self) -> dict[str, Any]:
        """The ``checkpoint.json`` object (what :meth:`from_dict` reads back).

        Returns:
            A JSON-ready dict with ``format`` and ``format_version`` first and times as ISO-8601 UTC.
        """
        data = dataclasses.asdict(self)
        for key in ("files", "rebuilds", "parent_files"):
            data[key] = {name: entry.to_json() for name, entry in getattr(self, key).items()}
        for key in _CHAIN_KEYS:  # absent outside snapshot chains: the manifests of older versions, unchanged
            if not data[key]:
                del data[key]
        data["created_at"] = iso_time(self.created_at)
        data["expires_at"] = iso_time(self.expires_at) if self.expires_at else None
        data["deleted_at"] = iso_time(self.deleted_at) if self.deleted_at else None
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **data}

    def to_json(self) -> bytes:
        """The ``checkpoint.json`` document.

        Returns:
            UTF-8 JSON of :meth:`to_dict`.
        """
        return json.dumps(self.to_dict(), indent=2, allow_nan=False).encode()

    @classmethod
    def from_json(cls, raw: bytes, source: str) -> Manifest:
        """Parse and validate a manifest; ``source`` names it in errors.

        Args:
            raw: the bytes of ``checkpoint.json``.
            source: the manifest's URI, for error messages.

        Returns:
            The manifest.

        Raises:
            CheckpointFormatError: ``raw`` is not strict JSON, is too large, is of another format or a newer
                format version, has unknown or missing keys or a value of the wrong type, or lists other files
                than its checkpoint type holds.
        """
        return cls.from_dict(load_json_object(raw, MAX_MANIFEST_BYTES, f"Invalid checkpoint manifest {source}"), source)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> Manifest:
        """Validate a manifest already parsed from strict JSON (:meth:`from_json`, or a run's listing index).

        Args:
            data: the parsed ``checkpoint.json`` object.
            source: where it came from, for error messages.

        Returns:
            The manifest.

        Raises:
            CheckpointFormatError: as :meth:`from_json`, for everything but the JSON syntax.
        """

        def bad(why: str) -> CheckpointFormatError:
            return CheckpointFormatError(f"Invalid checkpoint manifest {source}: {why}")

        if data.get("format") != FORMAT:
            raise bad(f"'format' is not {FORMAT!r}")
        if data.get("format_version") != FORMAT_VERSION:
            raise bad(f"unsupported format_version {data.get('format_version')!r}; upgrade lightning-lora-ckpt")
        unknown = sorted(set(data) - _MANIFEST_KEYS)
        if unknown:
            raise bad(
                f"unknown keys {[k[:100] for k in unknown[:5]]} (written by a newer lightning-lora-ckpt? upgrade it)"
            )

        def field(key: str, parse: Callable[[Any], Any], default: Any = _REQUIRED) -> Any:
            if key not in data or (default is not _REQUIRED and data[key] is None):
                if default is _REQUIRED:
                    raise bad(f"missing key {key!r}")
                return default
            try:
                return parse(data[key])
            except (TypeError, ValueError, OverflowError, AttributeError) as err:
                raise bad(f"key {key!r}: {err}") from err

        ctype = field("checkpoint_type", _checkpoint_type)
        files = field("files", _files)
        lora_rank = field("lora_rank", _count)
        rebuilds, parent_files = field("rebuilds", _files, {}), field("parent_files", _files, {})
        snapshot = field("snapshot", _text, None)
        parent = field("parent", lambda v: validate_name(_text(v), "parent checkpoint name"), None)
        problem = snapshot_problem(
            checkpoint_type=ctype,
            lora_rank=lora_rank,
            name=str(data.get("name")),
            snapshot=snapshot,
            parent=parent,
            files=files,
            rebuilds=rebuilds,
            parent_files=parent_files,
        ) or file_set_problem(ctype, lora_rank, stored_names(files, rebuilds))
        if problem:
            raise bad(problem)
        for fname, entry in files.items():
            if entry.size > MAX_FILE_BYTES.get(fname, entry.size):
                raise bad(f"{fname} is listed with {entry.size} bytes, more than the {MAX_FILE_BYTES[fname]} allowed")
        manifest = cls(
            checkpoint_type=ctype,
            run_id=field("run_id", lambda v: validate_name(v, "run id")),
            name=field("name", lambda v: validate_name(v, "checkpoint name")),
            created_at=field("created_at", parse_time),
            step=field("step", _count),
            epoch=field("epoch", _count),
            base_model=field("base_model", lambda v: BaseModelRef(**_expect(v, dict))),
            lora_rank=lora_rank,
            files=files,
            expires_at=field("expires_at", parse_time, None),
            public=field("public", lambda v: _expect(v, bool), False),
            user_metadata=field("user_metadata", lambda v: _expect(v, dict), {}),
            versions=field("versions", _versions, {}),
            metrics=field("metrics", _metrics, {}),
            pinned=field("pinned", lambda v: _expect(v, bool), False),
            deleted_at=field("deleted_at", parse_time, None),
            snapshot=snapshot,
            parent=parent,
            rebuilds=rebuilds,
            parent_files=parent_files,
        )
        if not isinstance(manifest.base_model.name_or_path, str) or not isinstance(
            manifest.base_model.fingerprint, str
        ):
            raise bad("base_model must hold strings")
        if not isinstance(manifest.base_model.quantization, (str, type(None))):
            raise bad("base_model.quantization must be a string or null")
        return manifest


def file_set_problem(checkpoint_type: CheckpointType, lora_rank: int, names: set[str]) -> str | None:
    """What is wrong with the file names a manifest lists for its checkpoint type and rank, or None.

    A LoRA checkpoint lists exactly :data:`FILES` of its type; a full-parameter one (``lora_rank`` 0) a Hugging
    Face model directory (``model_layout.model_file_set_problem``), plus :data:`STATE_FILES` if it is a training
    checkpoint.

    Args:
        checkpoint_type: ``"training"`` or ``"sampler"``.
        lora_rank: the manifest's ``lora_rank``.
        names: the listed file names.

    Returns:
        A one-line description of the problem, or None.
    """
    if lora_rank > 0:
        if names != set(FILES[checkpoint_type]):
            expected = sorted(FILES[checkpoint_type])
            return f"a {checkpoint_type} checkpoint must list exactly {expected}, got {sorted(names)[:10]}"
        return None
    state = set(STATE_FILES)
    if checkpoint_type == "training" and not state <= names:
        return f"a full-parameter training checkpoint must list {sorted(state)}, got {sorted(names)[:10]}"
    problem = model_file_set_problem(names - state if checkpoint_type == "training" else names)
    return f"a full-parameter {checkpoint_type} checkpoint (lora_rank 0) {problem}" if problem else None


def _metrics(value: Any) -> dict[str, float]:
    """A manifest's ``metrics``: finite numbers by name (at most 1,000, names at most 200 characters)."""
    metrics = _expect(value, dict)
    if len(metrics) > 1000:
        raise ValueError(f"{len(metrics)} metrics, more than the 1000 allowed")
    out = {}
    for name, number in metrics.items():
        if len(name) > 200 or isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ValueError(f"metric {name[:50]!r} must be a number under a name of at most 200 characters")
        if not math.isfinite(number):
            raise ValueError(f"metric {name[:50]!r} is not finite")
        out[name] = float(number)
    return out


_MANIFEST_KEYS = {"format", "format_version", *(f.name for f in dataclasses.fields(Manifest))}
_CHAIN_KEYS = ("snapshot", "parent", "rebuilds", "parent_files")


def _expect(value: Any, typ: type) -> Any:
    if type(value) is not typ:
        raise TypeError(f"expected {typ.__name__}, got {str(value)[:100]!r}")
    return value


def _count(value: Any) -> int:
    if _expect(value, int) < 0:
        raise ValueError(f"expected a non-negative integer, got {value}")
    return value


def _text(value: Any) -> str:
    if len(_expect(value, str)) > 200:
        raise ValueError("longer than 200 characters")
    return value


def _checkpoint_type(value: Any) -> CheckpointType:
    if value not in ("training", "sampler"):
        raise ValueError(f"unknown checkpoint_type {str(value)[:100]!r}, expected 'training' or 'sampler'")
    return value


def _files(value: Any) -> dict[str, FileEntry]:
    files = {}
    for name, entry in _expect(value, dict).items():
        keys = set(_expect(entry, dict))
        algorithms = [a for a in ALGORITHMS if keys == {"size", a}]
        if not algorithms:
            raise ValueError(f"the entry of {name[:100]!r} must hold exactly 'size' and one of {', '.join(ALGORITHMS)}")
        digest = entry[algorithms[0]]
        if type(entry["size"]) is not int or entry["size"] < 1 or not HEX_DIGEST.fullmatch(str(digest)):
            raise ValueError(f"bad size or {algorithms[0]} for {name[:100]!r} (no file of a checkpoint is empty)")
        files[name] = FileEntry(entry["size"], digest, algorithms[0])
    return files


def _versions(value: Any) -> dict[str, str]:
    if not all(type(v) is str for v in _expect(value, dict).values()):
        raise TypeError("versions must map names to strings")
    return value
