"""Hotloading full-parameter checkpoints into the model a ``SamplingClient`` already holds (never rebuilding it).

A delta snapshot (``format.snapshots``) of the served weights is applied in memory: each weight file is laid out
again from the model's tensors (its remembered safetensors header, then each tensor's bytes at its offsets), the
delta is XORed into that copy (``apply_delta``) and the result checked against the full file's digest in the
delta's manifest; only once every file matches are the new bytes copied into the tensors' storages, so a delta that
lies leaves the client serving exactly what it served. Any other full-parameter checkpoint (a base, a delta of
another snapshot, a client loaded in another dtype than its files) is opened through its chain and copied in.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from ..format.digests import digest_hex
from ..format.files import ReadBytes
from ..format.layout import join, resolve
from ..format.manifest import STATE_FILES, BaseModelRef, FileEntry, Manifest
from ..format.model_layout import weight_files
from ..format.snapshot_delta import apply_delta
from ..format.snapshots import delta_name
from ..format.strict_json import CheckpointFormatError, load_json_object
from ..storage.loading import OpenedCheckpoint, open_checkpoint
from ..storage.read import read_checkpoint
from .full_model import saved_state_dict

#: What a client says when a checkpoint and the model it serves are not both full-parameter ones.
NO_ADAPTER = (
    "Cannot hotload {uri} into this client: a full-parameter checkpoint (or a client serving one) has no adapter "
    "to swap; open it with SamplingClient.from_checkpoint"
)
# (tensor, first byte, end) of each tensor of a weight file, in file offsets.
_Placement = tuple[torch.Tensor, int, int]


@dataclasses.dataclass(frozen=True)
class ServedWeights:
    """What a full-parameter client remembers of the checkpoint it serves, to tell whether a delta is its child.

    Attributes:
        weights: the entries (size, digest) of its full weight files, by name.
        headers: each weight file's safetensors header: the 8-byte little-endian length and the JSON header.
        metadata: the entries of its other files (config, generation config, tokenizer, shard index), by name.
        dtypes: the dtype of each tensor in the weight files, by saved name.
    """

    weights: dict[str, FileEntry]
    headers: dict[str, bytes]
    metadata: dict[str, FileEntry]
    dtypes: dict[str, torch.dtype]

    @classmethod
    def of(cls, opened: OpenedCheckpoint) -> ServedWeights:
        """The state of a full-parameter checkpoint just opened (a delta's ``files`` are its rebuilt full files).

        Args:
            opened: the checkpoint.

        Returns:
            Its entries and headers.
        """
        weights, metadata = _split(opened.manifest)
        headers = {w: _header_of(opened.files[w]) for w in weights}
        return cls(weights, headers, metadata, {k: v.dtype for k, v in opened.adapter.items()})


@dataclasses.dataclass(frozen=True)
class Hotloaded:
    """The outcome of :func:`load_weights_in_place`.

    Attributes:
        uri: the checkpoint's resolved URI.
        manifest: its manifest.
        served: what the client now serves (to pass to the next call).
        in_place: True if its deltas were applied to the model's tensors, False if its full weights were read
            (through its chain) and copied in.
    """

    uri: str
    manifest: Manifest
    served: ServedWeights
    in_place: bool


def load_weights_in_place(
    model: PreTrainedModel,
    served: ServedWeights,
    uri: str | os.PathLike[str],
    root: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    *,
    base_model: BaseModelRef,
) -> Hotloaded:
    """Make ``model`` hold the weights of the full-parameter checkpoint at ``uri``, in its own tensors.

    A delta of the served checkpoint whose tensors are the model's (names, dtypes, shapes; contiguous) is applied in
    memory and checked before a byte of the model changes; any other one is opened (its chain rebuilt) and copied in.

    Args:
        model: the client's model, loaded from the checkpoint ``served`` describes.
        served: what the model serves.
        uri: the checkpoint (any fsspec URI, local path or ``lora://``).
        root: where ``lora://`` URIs resolve.
        storage_options: fsspec options of the checkpoint's filesystem.
        base_model: the base the client serves; the checkpoint must have been trained from it.

    Returns:
        The checkpoint, what is now served, and which way it was loaded.

    Raises:
        CheckpointFormatError: the checkpoint is missing, damaged or malformed, or a delta's rebuilt file differs
            from the digest its manifest records (the model is then left exactly as it was).
        ValueError: the checkpoint is not a full-parameter one, was trained on another base, or its weights are not
            the model's tensors (names and shapes); nothing is copied then.
    """
    resolved = resolve(uri, root)

    def names(manifest: Manifest) -> list[str]:  # only a child's deltas: anything else is read by open_checkpoint
        return [delta_name(w) for w in manifest.rebuilds] if _is_child(manifest, served, base_model) else []

    layout = _layout(model, served)
    if layout is not None:
        manifest, files = read_checkpoint(resolved, names, storage_options)
        if _is_child(manifest, served, base_model) and _apply_deltas(layout, served, manifest, files, resolved):
            weights = {w: manifest.full_files[w] for w in served.weights}
            return Hotloaded(resolved, manifest, dataclasses.replace(served, weights=weights), True)
    opened = open_checkpoint(resolved, root, storage_options, base_model=base_model)
    if not opened.manifest.full_parameter:
        raise ValueError(NO_ADAPTER.format(uri=opened.uri))
    _copy_weights(model, opened.adapter, opened.uri)
    return Hotloaded(opened.uri, opened.manifest, ServedWeights.of(opened), False)


@torch.no_grad()
def _copy_weights(model: PreTrainedModel, weights: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy every weight (by saved name) into ``model``'s tensors, cast to their dtype; refused (ValueError) before
    anything is copied unless the names and shapes are exactly the model's."""
    saved = saved_state_dict(model)
    misshapen = sorted(k for k in set(saved) & set(weights) if saved[k].shape != weights[k].shape)
    if saved.keys() != weights.keys() or misshapen:
        raise ValueError(
            f"Cannot hotload {source}: its weights are not this client's model's tensors (missing "
            f"{sorted(set(saved) - set(weights))[:3]}, unexpected {sorted(set(weights) - set(saved))[:3]}, other "
            f"shapes {misshapen[:3]}); open it with SamplingClient.from_checkpoint"
        )
    for name, tensor in saved.items():
        tensor.copy_(weights[name])


def _split(manifest: Manifest) -> tuple[dict[str, FileEntry], dict[str, FileEntry]]:
    """The full weight files' entries and the other model files' entries (state files left out)."""
    full = manifest.full_files
    weights = {w: full[w] for w in weight_files(full)}
    return weights, {n: e for n, e in full.items() if n not in weights and n not in STATE_FILES}


def _header_of(data: ReadBytes) -> bytes:
    """The length prefix and JSON header of a verified safetensors file (already decoded: its header fits)."""
    return bytes(data[: 8 + int.from_bytes(bytes(data[:8]), "little")])


def _is_child(manifest: Manifest, served: ServedWeights, base_model: BaseModelRef) -> bool:
    """Whether ``manifest`` is a delta taken against exactly the served weights, with the same other files."""
    return (
        manifest.snapshot == "delta"
        and manifest.deleted_at is None
        and manifest.base_model.fingerprint == base_model.fingerprint
        and manifest.parent_files == served.weights
        and _split(manifest) == (manifest.rebuilds, served.metadata)
    )


def _layout(model: PreTrainedModel, served: ServedWeights) -> dict[str, list[_Placement]] | None:
    """Where each of the model's saved tensors lies in the served weight files, or None unless every file is exactly
    the model's tensors, back to back after the header, each in the model's dtype and shape and contiguous."""
    saved, seen = saved_state_dict(model), set()
    layout: dict[str, list[_Placement]] = {}
    for weights, header in served.headers.items():
        tensors = load_json_object(header[8:], len(header), f"The served {weights}'s header")
        tensors.pop("__metadata__", None)
        placed, position = [], len(header)
        for name, info in sorted(tensors.items(), key=lambda item: item[1]["data_offsets"]):
            tensor = saved.get(name)
            start, end = (len(header) + offset for offset in info["data_offsets"])
            if (
                tensor is None
                or name in seen
                or served.dtypes.get(name) != tensor.dtype
                or list(tensor.shape) != info["shape"]
                or not tensor.is_contiguous()
                or start != position
                or end - start != tensor.numel() * tensor.element_size()
            ):
                return None
            placed.append((tensor, start, end))
            seen.add(name)
            position = end
        if position != served.weights[weights].size:
            return None
        layout[weights] = placed
    return layout if seen == set(saved) else None


def _apply_deltas(
    layout: dict[str, list[_Placement]],
    served: ServedWeights,
    manifest: Manifest,
    files: Mapping[str, ReadBytes],
    uri: str,
) -> bool:
    """Rebuild each weight file from the model's tensors and its delta, check it, then copy it into the tensors.

    Returns False (nothing written) if a rebuilt file's header differs from the served one (another layout).
    """
    rebuilt = {}
    for weights, placed in layout.items():
        header, entry = served.headers[weights], manifest.rebuilds[weights]
        buffer = bytearray(entry.size)
        out = np.frombuffer(buffer, dtype=np.uint8)
        out[: len(header)] = np.frombuffer(header, dtype=np.uint8)
        for tensor, start, end in placed:
            out[start:end] = _bytes(tensor).cpu().numpy()
        name = delta_name(weights)
        apply_delta(buffer, files[name], join(uri, name))
        if bytes(buffer[: len(header)]) != header:
            return False
        if digest_hex(memoryview(buffer), entry.algorithm) != entry.digest:
            raise CheckpointFormatError(
                f"Checkpoint {uri}: its {weights}, rebuilt from the served weights and {name}, is not the file its "
                "manifest records (digest mismatch); the client still serves the weights it had"
            )
        rebuilt[weights] = out
    with torch.no_grad():
        for weights, placed in layout.items():
            for tensor, start, end in placed:
                _bytes(tensor).copy_(torch.from_numpy(rebuilt[weights][start:end]))
    return True


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's storage as flat bytes (on its device; a view, so writes go into the tensor)."""
    return tensor.detach().view(-1).view(torch.uint8)
