"""Writing full-parameter sampler checkpoints as snapshot chains (``format.snapshots``; Fireworks' base / delta).

The plugin keeps the weight files of the last snapshot it committed. The next full-parameter sampler checkpoint of
the same run and folder is written as a delta against it (``format.snapshot_delta``) when that snapshot is still
committed as it was, has the same weight files of the same sizes, is not the checkpoint being replaced, and the
chain holds fewer than ``max_deltas`` deltas; otherwise (the first snapshot of a process, a chain at its length, a
delta that would save little) it is written as a base, which starts a new chain.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from ..format.digests import DEFAULT_ALGORITHM, digest_hex
from ..format.files import FileContent, LazyFile
from ..format.manifest import FileEntry, Manifest
from ..format.model_layout import weight_files
from ..format.payload import CheckpointPayload
from ..format.snapshot_delta import encode_delta
from ..format.snapshots import delta_name
from ..format.tensor_files import header_names, render_like
from ..storage.dependents import sibling
from ..storage.read import manifest_if_any

#: A delta is kept only if it is at most this fraction of its file: one that saves less is not worth a link (a base
#: is written instead, and reads stay fast).
MAX_DELTA_FRACTION = 0.9


@dataclasses.dataclass(frozen=True)
class _Snapshot:
    """The last snapshot committed: where, its weight files' entries and bytes, and how many deltas its chain holds."""

    uri: str
    name: str
    entries: dict[str, FileEntry]
    weights: dict[str, bytes | bytearray]
    deltas: int


@dataclasses.dataclass
class SnapshotChains:
    """Turns full-parameter sampler saves into snapshot chains.

    Args:
        max_deltas: how many deltas follow a base before the next snapshot is a base again (0: every snapshot is a
            base).
    """

    max_deltas: int
    _last: _Snapshot | None = None
    _pending: _Snapshot | None = None
    #: The buffers of the snapshot before the last one, reused for the next: no new model-sized buffer per save.
    _spares: dict[str, bytearray] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.max_deltas, bool) or not isinstance(self.max_deltas, int) or self.max_deltas < 0:
            raise ValueError(f"max_deltas must be a non-negative integer, got {self.max_deltas!r}")

    def prepare(
        self,
        payload: CheckpointPayload,
        uri: str,
        name: str,
        files: dict[str, FileContent],
        storage_options: Mapping[str, Any] | None,
    ) -> tuple[dict[str, FileContent], Callable[[Manifest], Manifest]]:
        """The files to write for a save, and what completes its manifest, which :meth:`committed` takes once written.

        Args:
            payload: the save's payload.
            uri: where it is committed.
            name: its checkpoint name.
            files: the files ``payload`` encodes to.
            storage_options: fsspec options of ``uri``'s filesystem.

        Returns:
            The files (a delta's weight files as ``<file>.xor.zst``), and a function adding the snapshot fields to
            the manifest built from them (the identity for a checkpoint that is not a snapshot).
        """
        if payload.model_files is None or payload.checkpoint_type != "sampler":
            return files, lambda manifest: manifest
        weights = self._render(files, payload.adapter)
        files = {**files, **{w: memoryview(data) for w, data in weights.items()}}
        parent = self._parent(uri, name, weights, storage_options)
        deltas = {w: encode_delta(parent.weights[w], d) for w, d in weights.items()} if parent else {}
        fields: dict[str, Any] = {"snapshot": "base"}
        if parent and all(d is not None and len(d) <= MAX_DELTA_FRACTION * len(weights[w]) for w, d in deltas.items()):
            files = {n: data for n, data in files.items() if n not in weights}
            files.update({delta_name(w): d for w, d in deltas.items() if d is not None})
            fields = {
                "snapshot": "delta",
                "parent": parent.name,
                "rebuilds": {
                    w: FileEntry(len(d), digest_hex(memoryview(d)), DEFAULT_ALGORITHM) for w, d in weights.items()
                },
                "parent_files": {w: parent.entries[w] for w in weights},
            }

        def finish(manifest: Manifest) -> Manifest:
            chain = parent.deltas + 1 if parent and fields["snapshot"] == "delta" else 0
            self._pending = _Snapshot(uri, name, {}, weights, chain)
            return dataclasses.replace(manifest, **fields)

        return files, finish

    def committed(self, manifest: Manifest) -> None:
        """Remember the snapshot just committed as the parent of the next one (nothing for other checkpoints).

        Args:
            manifest: the manifest written.
        """
        pending, self._pending = self._pending, None
        if manifest.snapshot is not None and pending is not None and pending.name == manifest.name:
            full = manifest.full_files  # a base's entries: its files' digests as the commit computed them
            if self._last is not None:
                self._spares = {w: b for w, b in self._last.weights.items() if isinstance(b, bytearray)}
            self._last = dataclasses.replace(pending, entries={w: full[w] for w in pending.weights})

    def _render(self, files: dict[str, FileContent], tensors: dict[str, Any]) -> dict[str, bytes | bytearray]:
        """The weight files' bytes: laid out like the last snapshot's into a reused buffer when the tensors are its
        tensors (names, dtypes, shapes: the same files, ``render_like``), else serialised anew."""
        names = weight_files(files)
        last = self._last
        if last is not None and sorted(last.weights) == names:
            listed = [n for w in names for n in header_names(last.weights[w])]
            if len(listed) == len(tensors) and set(listed) == set(tensors):
                out = {w: self._buffer(w, len(last.weights[w])) for w in names}
                if all(render_like(last.weights[w], tensors, out[w]) for w in names):
                    return dict(out)
        return {w: _rendered(files[w]) for w in names}

    def _buffer(self, name: str, size: int) -> bytearray:
        """A spare buffer of ``size`` bytes for weight file ``name`` (a new one if none fits)."""
        spare = self._spares.pop(name, None)
        return spare if spare is not None and len(spare) == size else bytearray(size)

    def _parent(
        self, uri: str, name: str, weights: dict[str, bytes | bytearray], storage_options: Mapping[str, Any] | None
    ) -> _Snapshot | None:
        """The last snapshot, if the next one may be a delta of it (see the module docstring)."""
        last = self._last
        if last is None or last.deltas >= self.max_deltas or last.name == name or sibling(uri, last.name) != last.uri:
            return None
        if {w: len(d) for w, d in weights.items()} != {w: len(d) for w, d in last.weights.items()}:
            return None
        current = manifest_if_any(last.uri, storage_options)
        if current is None or current.deleted_at is not None:
            return None
        full = current.full_files
        return last if all(full.get(w) == e for w, e in last.entries.items()) else None


def _rendered(content: FileContent) -> bytes:
    return content.render() if isinstance(content, LazyFile) else bytes(content)
