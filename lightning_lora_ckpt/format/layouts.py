"""Per-layer adapter tensors <-> tensors stacked over layers (MaxText's ``jax.lax.scan`` layout), and the
``layout.json`` of a stacked directory; docs/layouts.md describes both.

Pure transforms (no I/O): :func:`stack_layers` groups every ``<prefix>layers.<i>.<rest>`` tensor by
``(<prefix>, <rest>)`` into one ``[L, *shape]`` tensor named ``<prefix>layers.{layers}.<rest>``;
:func:`unstack_layers` rebuilds the per-layer tensors bit-exactly, in their original key order.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any

import torch

from .model_layout import MODEL_WEIGHTS, model_file_set_problem
from .strict_json import CheckpointFormatError, load_json_object

#: What stands for the layer index in a stacked tensor's name: ``name.replace(PLACEHOLDER, str(i))`` is layer i's key.
PLACEHOLDER = "{layers}"
#: The files of a stacked directory: the stacked tensors of an adapter, or of a full model (then with its config,
#: generation config and tokenizer files as they are).
STACKED_WEIGHTS = "adapter_model.stacked.safetensors"
STACKED_MODEL_WEIGHTS = "model.stacked.safetensors"
LAYOUT_FILE = "layout.json"
LAYOUT_VERSION = 1
_MAX_LAYOUT_BYTES = 16 << 20
#: A per-layer key: the first ``layers.<i>.`` (no leading zeros, so the index prints back as it was).
_LAYER_KEY = re.compile(r"(?P<prefix>(?:.*?\.)?layers)\.(?P<index>0|[1-9][0-9]{0,8})\.(?P<rest>.+)", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class StackedAdapter:
    """An adapter in the stacked layout.

    Attributes:
        tensors: the stacked tensors (``[L, *shape]``, named with :data:`PLACEHOLDER`) and the non-layer tensors
            as they were, by name.
        num_layers: L of each stack, by the prefix its names start with (``base_model.model.model.layers``).
        keys: the per-layer key names in their original order.
    """

    tensors: dict[str, torch.Tensor]
    num_layers: dict[str, int]
    keys: list[str]


def stack_layers(adapter: Mapping[str, torch.Tensor]) -> StackedAdapter:
    """Stack the per-layer tensors of ``adapter`` over layers.

    Args:
        adapter: the tensors under PEFT's key names.

    Returns:
        The stacked adapter; non-layer tensors (``embed_tokens``, ``lm_head``, ...) are kept as they are.

    Raises:
        ValueError: naming the key and the fix, if the layers of a stack differ (shape, dtype, a tensor some layer
            lacks, a layer with no tensors) or a key already holds :data:`PLACEHOLDER`.
    """
    groups: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    others: dict[str, torch.Tensor] = {}
    layers: dict[str, set[int]] = {}
    fix = "MaxText's scan layout needs identical layers; keep this adapter per layer (--layout unstacked)"
    for key, tensor in adapter.items():
        if PLACEHOLDER in key:
            raise ValueError(f"Cannot stack {key!r}: the name holds the placeholder {PLACEHOLDER!r}; {fix}")
        match = _LAYER_KEY.fullmatch(key)
        if match is None:
            others[key] = tensor
            continue
        index = int(match["index"])
        groups.setdefault((match["prefix"], match["rest"]), {})[index] = tensor
        layers.setdefault(match["prefix"], set()).add(index)
    num_layers = {prefix: max(found) + 1 for prefix, found in layers.items()}
    stacked: dict[str, torch.Tensor] = {}
    for (prefix, rest), by_layer in groups.items():
        count = num_layers[prefix]
        first = by_layer[min(by_layer)]
        for i in range(count):
            key = f"{prefix}.{i}.{rest}"
            if i not in by_layer:
                raise ValueError(f"Cannot stack {key!r}: layer {i} has no {rest!r} though other layers do; {fix}")
            if by_layer[i].shape != first.shape or by_layer[i].dtype != first.dtype:
                raise ValueError(
                    f"Cannot stack {key!r}: it is {by_layer[i].dtype} {list(by_layer[i].shape)} but layer "
                    f"{min(by_layer)} has {first.dtype} {list(first.shape)}; {fix}"
                )
        stacked[f"{prefix}.{PLACEHOLDER}.{rest}"] = torch.stack([by_layer[i] for i in range(count)])
    return StackedAdapter({**stacked, **others}, num_layers, list(adapter))


def unstack_layers(stacked: StackedAdapter) -> dict[str, torch.Tensor]:
    """The per-layer tensors of a stacked adapter, bit-exact, in their original key order.

    Args:
        stacked: the stacked adapter.

    Returns:
        The tensors under PEFT's key names (each its own contiguous copy).

    Raises:
        ValueError: a stacked tensor does not fit ``num_layers``, or the tensors do not give exactly ``keys``.
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in stacked.tensors.items():
        if PLACEHOLDER not in name:
            out[name] = tensor
            continue
        prefix = name.partition(f".{PLACEHOLDER}.")[0]
        count = stacked.num_layers.get(prefix)
        if count is None or tensor.ndim == 0 or tensor.shape[0] != count:
            raise ValueError(
                f"Stacked tensor {name!r} has shape {list(tensor.shape)}, but num_layers gives {prefix!r} {count} layers"
            )
        for i in range(count):
            out[name.replace(PLACEHOLDER, str(i), 1)] = tensor[i].clone()
    if len(out) != len(stacked.keys) or set(out) != set(stacked.keys):
        extra, missing = sorted(set(out) - set(stacked.keys)), sorted(set(stacked.keys) - set(out))
        raise ValueError(f"The stacked tensors give keys {extra[:5]} not in the layout's keys, and lack {missing[:5]}")
    return {key: out[key] for key in stacked.keys}


def encode_layout(
    stacked: StackedAdapter,
    adapter_config: dict[str, Any],
    source: dict[str, Any],
    weights_sha256: str,
    model_files: dict[str, str] | None = None,
) -> bytes:
    """``layout.json``: what rebuilds the PEFT adapter from :data:`STACKED_WEIGHTS` (a full model: its directory
    from :data:`STACKED_MODEL_WEIGHTS` and its other files) exactly.

    Args:
        stacked: the stacked tensors.
        adapter_config: the PEFT config (``adapter_config.json``; ``{}`` for a full model).
        source: the identity of the checkpoint it came from (run, name, type, step, content digest, base model).
        weights_sha256: the sha256 of the stacked weights file as written.
        model_files: a full model's other files (config, generation config, tokenizer) -> their sha256.

    Returns:
        The file's bytes.
    """
    layout = {
        "layout": "stacked",
        "version": LAYOUT_VERSION,
        "placeholder": PLACEHOLDER,
        "num_layers": stacked.num_layers,
        "weights": {
            "file": STACKED_MODEL_WEIGHTS if model_files is not None else STACKED_WEIGHTS,
            "sha256": weights_sha256,
        },
        "keys": stacked.keys,
        "adapter_config": adapter_config,
        "source": source,
        **({"model_files": model_files} if model_files is not None else {}),
    }
    return json.dumps(layout, indent=2).encode()


def decode_layout(raw: bytes | memoryview, source: str) -> dict[str, Any]:
    """The checked contents of a ``layout.json``.

    Args:
        raw: the file's bytes.
        source: its URI, for error messages.

    Returns:
        The layout, as :func:`encode_layout` writes it.

    Raises:
        CheckpointFormatError: naming ``source``, if it is not a stacked layout this version reads.
    """
    layout = load_json_object(raw, _MAX_LAYOUT_BYTES, source)

    def bad(why: str) -> CheckpointFormatError:
        return CheckpointFormatError(f"{source}: {why}; it is not a layout.json written by `convert --layout stacked`")

    if layout.get("layout") != "stacked" or layout.get("version") != LAYOUT_VERSION:
        raise bad(f"layout {str(layout.get('layout'))[:50]!r} version {str(layout.get('version'))[:20]!r}")
    if layout.get("placeholder") != PLACEHOLDER:
        raise bad(f"placeholder {str(layout.get('placeholder'))[:50]!r} is not {PLACEHOLDER!r}")
    counts, keys = layout.get("num_layers"), layout.get("keys")
    if not isinstance(counts, dict) or not all(type(n) is int and n > 0 for n in counts.values()):
        raise bad("num_layers is not a map of prefixes to positive layer counts")
    if not isinstance(keys, list) or not all(type(k) is str for k in keys) or len(set(keys)) != len(keys):
        raise bad("keys is not a list of distinct tensor names")
    model_files = layout.get("model_files")
    if model_files is not None and (
        not isinstance(model_files, dict)
        or not all(type(v) is str for v in model_files.values())
        or model_file_set_problem([*model_files, MODEL_WEIGHTS]) is not None
        or MODEL_WEIGHTS in model_files
    ):
        raise bad("model_files is not a map of a model directory's config and tokenizer files to their sha256")
    weights, expected = layout.get("weights"), STACKED_WEIGHTS if model_files is None else STACKED_MODEL_WEIGHTS
    if not isinstance(weights, dict) or weights.get("file") != expected or type(weights.get("sha256")) is not str:
        raise bad(f"weights does not name {expected} and its sha256")
    for field in ("adapter_config", "source"):
        if not isinstance(layout.get(field), dict):
            raise bad(f"{field} is not an object")
    return layout


def stacked_from_layout(tensors: dict[str, torch.Tensor], layout: dict[str, Any]) -> StackedAdapter:
    """The stacked adapter of a decoded :data:`STACKED_WEIGHTS` and its :func:`decode_layout` layout."""
    return StackedAdapter(tensors, dict(layout["num_layers"]), list(layout["keys"]))
