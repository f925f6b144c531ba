"""The tensors of a base model as an ordered stream, for ``merge_adapter``: read tensor by tensor from its
safetensors files (a local directory or a Hub snapshot), or taken from a model built in memory (a built-in base)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open
from transformers import PreTrainedModel
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from ..modeling.base import is_builtin, load_base_model
from ..modeling.full_model import saved_state_dict

# Dtype names in safetensors headers that a base may hold (a float8 base is a quantized checkpoint).
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclasses.dataclass
class BaseTensors:
    """The base's tensors to write: (shape, dtype) of each by name, and an iterator yielding them in that order.

    Attributes:
        specs: the shape and dtype of each tensor, by name.
        tensors: yields (name, tensor) in the order of ``specs``, once.
        weights_dir: where the base's files are, if it has files.
    """

    specs: dict[str, tuple[tuple[int, ...], torch.dtype]]
    tensors: Iterator[tuple[str, torch.Tensor]]
    weights_dir: str | None


def _safetensors_files(directory: str) -> list[str] | None:
    """The safetensors weight files of a HF model directory in shard order, or None if it has none."""
    index = os.path.join(directory, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return [os.path.join(directory, name) for name in sorted(set(weight_map.values()))]
    single = os.path.join(directory, SAFE_WEIGHTS_NAME)
    return [single] if os.path.isfile(single) else None


def _stream_files(files: list[str], skeleton: PreTrainedModel) -> BaseTensors:
    """Read safetensors headers now, tensors one at a time later; tied copies (e.g. lm_head) are dropped."""
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    keys_by_file: dict[str, list[str]] = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            keys_by_file[path] = list(f.keys())
            for key in keys_by_file[path]:
                tensor_slice = f.get_slice(key)
                dtype = _SAFETENSORS_DTYPES.get(tensor_slice.get_dtype())
                if dtype is None:
                    raise ValueError(
                        f"Base tensor {key} in {path} has dtype {tensor_slice.get_dtype()}: merge_adapter needs "
                        "full-precision base weights (a quantized checkpoint cannot be merged into)"
                    )
                specs[key] = (tuple(tensor_slice.get_shape()), dtype)
    for tied, source in skeleton.all_tied_weights_keys.items():
        if tied in specs and source in specs:
            del specs[tied]

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for path, keys in keys_by_file.items():
            for key in keys:
                if key in specs:
                    # A tensor is a view of a memory map of its whole file, which stays resident (pages read)
                    # as long as any tensor of that map lives: one map per tensor keeps only live tensors'
                    # pages in memory, not the whole input shard. Opening costs a header read.
                    with safe_open(path, framework="pt") as f:
                        tensor = f.get_tensor(key)
                    yield key, tensor

    return BaseTensors(specs, tensors(), os.path.dirname(files[0]))


def _stream_model(model: PreTrainedModel) -> BaseTensors:
    """The tensors ``save_pretrained`` would write for an in-memory model, under the same names."""
    state = saved_state_dict(model)
    specs = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    return BaseTensors(specs, iter(state.items()), None)


def open_base(
    name_or_path: str, skeleton: PreTrainedModel, revision: str | None, allow_pickle: bool = False
) -> BaseTensors:
    """Stream a base from its safetensors files when it has them, else build or load it in memory.

    Args:
        name_or_path: a local HF directory, a Hub id (its safetensors and JSON files are downloaded) or a built-in name.
        skeleton: the base's model on the meta device (its tied weights are left out of the stream).
        revision: the Hub revision.
        allow_pickle: let a base without safetensors weights load from pickled ones (a base the caller named).

    Returns:
        The stream.

    Raises:
        ValueError: a tensor of the base's files is quantized (not a full-precision dtype).
    """
    directory = None
    if os.path.isdir(name_or_path):
        directory = name_or_path
    elif not is_builtin(name_or_path):
        from huggingface_hub import snapshot_download

        directory = snapshot_download(name_or_path, revision=revision, allow_patterns=["*.safetensors", "*.json"])
    files = _safetensors_files(directory) if directory else None
    if files:
        return _stream_files(files, skeleton)
    # A built-in name (built from its config: that is the base). A base with pickled (.bin) weights only loads
    # when the caller named it and passed allow_pickle=True; load_base_model refuses it otherwise.
    base = _stream_model(load_base_model(name_or_path, torch.float32, revision, allow_pickle=allow_pickle))
    base.weights_dir = directory
    return base
