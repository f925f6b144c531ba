"""``CheckpointStore``: listing and inspecting the runs and checkpoints under a root URI."""

from __future__ import annotations

from typing import Any

from . import storage, uris
from .manifest import MANIFEST, CheckpointFormatError, Manifest
from .records import RUN_FILE, Checkpoint, TrainingRun
from .uris import KIND_DIRS, CheckpointType


class CheckpointStore:
    """Management of the checkpoints under ``root`` (any fsspec URI; ``$LORA_CKPT_ROOT`` if None).

    Only committed checkpoints (those with a ``checkpoint.json``) are ever listed; listing reads the
    small manifests, never weight files.
    """

    def __init__(self, root: str | None = None, storage_options: dict[str, Any] | None = None) -> None:
        self.root = uris.default_root(root)
        self.storage_options = dict(storage_options or {})
        self.fs, self._root_path = storage.url_to_fs(self.root, self.storage_options)

    def _uri(self, *parts: str) -> str:
        return uris.join(self.root, *parts)

    def list_runs(self) -> list[TrainingRun]:
        """Every run under the root, oldest first."""
        if not self.fs.exists(self._root_path):
            return []
        ids = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._root_path, detail=False)]
        runs = [self.get_run(run_id) for run_id in sorted(ids) if self._is_run(run_id)]
        return sorted(runs, key=lambda r: r.created_at)

    def _is_run(self, run_id: str) -> bool:
        try:
            uris.validate_name(run_id)
        except ValueError:
            return False
        return self.fs.exists(uris.join(self._root_path, run_id, RUN_FILE))

    def get_run(self, run_id: str) -> TrainingRun:
        """The run's metadata, with its newest training and sampler checkpoints."""
        uris.validate_name(run_id, "run id")
        source = self._uri(run_id, RUN_FILE)
        try:
            raw = self.fs.cat_file(uris.join(self._root_path, run_id, RUN_FILE))
        except FileNotFoundError:
            raise KeyError(f"No run {run_id!r} under {self.root} ({source} does not exist)") from None
        run = TrainingRun.from_json(raw, source)
        checkpoints = self.list_checkpoints(run_id)
        newest = {
            t: max((c for c in checkpoints if c.checkpoint_type == t), key=_order, default=None)
            for t in KIND_DIRS.values()
        }
        return TrainingRun(
            **{
                **run.__dict__,
                "last_checkpoint": newest["training"],
                "last_sampler_checkpoint": newest["sampler"],
            }
        )

    def list_checkpoints(self, run_id: str) -> list[Checkpoint]:
        """Committed checkpoints of a run, oldest first (by step, then time)."""
        uris.validate_name(run_id, "run id")
        manifest_paths = []
        for kind_dir in KIND_DIRS:
            folder = uris.join(self._root_path, run_id, kind_dir)
            if self.fs.exists(folder):
                names = (p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False))
                manifest_paths += [uris.join(folder, n, MANIFEST) for n in names if not n.startswith(".")]
        raws = self.fs.cat(manifest_paths, on_error="omit") if manifest_paths else {}
        checkpoints = []
        for path, raw in raws.items():
            uri = self._uri(run_id, *path.rsplit("/", 3)[-3:-1])
            try:
                checkpoints.append(Checkpoint.from_manifest(Manifest.from_json(raw, path), uri))
            except CheckpointFormatError:
                continue  # a damaged manifest is never offered for resume
        return sorted(checkpoints, key=_order)

    def get(self, uri: str) -> Checkpoint:
        """The checkpoint at a URI (``lora://`` resolves against this store's root)."""
        uri = uris.resolve(uri, self.root)
        return Checkpoint.from_manifest(storage.read_manifest(uri, self.storage_options), uri)

    def last_checkpoint(self, run_id: str, checkpoint_type: CheckpointType = "training") -> Checkpoint | None:
        """The newest committed checkpoint of that type in the run, or None."""
        candidates = [c for c in self.list_checkpoints(run_id) if c.checkpoint_type == checkpoint_type]
        return candidates[-1] if candidates else None


def _order(c: Checkpoint) -> tuple[int, Any]:
    return (c.step, c.time)
