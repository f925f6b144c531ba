"""Splitting a Lightning checkpoint dict into the files of a checkpoint directory, and joining them back.

``LoRAModule.on_save_checkpoint`` leaves two things in the dict: ``state_dict`` holding only the adapter
under PEFT's key names, and a ``lora_ckpt`` entry with the PEFT config and the base model reference.
A dict without ``optimizer_states`` (Lightning's ``weights_only=True``) becomes a sampler checkpoint;
one with it a training checkpoint whose remaining entries go to ``training_state.{safetensors,json}``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from typing import Any

import lightning
import peft
import safetensors.torch
import torch

from . import __version__
from .manifest import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MAX_FILE_BYTES,
    STATE_JSON,
    STATE_TENSORS,
    BaseModelRef,
    CheckpointFormatError,
    Manifest,
    load_json_object,
)
from .state_codec import decode_training_state, encode_state, snapshot_tensor
from .storage import FileContent, LazyFile
from .uris import CheckpointType

LORA_KEY = "lora_ckpt"
_SAFETENSORS_METADATA = {"format": "pt"}  # what PEFT's save_pretrained writes
#: PEFT's key of a LoRA matrix (lora_A is (r, in), lora_B (out, r); embeddings alike).
_LORA_HALF = re.compile(r".*\.lora_(?:embedding_)?([AB])(?:\.weight)?")
#: Types of the PEFT config settings loaders use (each may be absent or null).
_CONFIG_TYPES: dict[str, tuple[type, ...]] = {
    "peft_type": (str,),
    "lora_alpha": (int, float),
    "lora_dropout": (int, float),
    "target_modules": (list, str),
    "rank_pattern": (dict,),
    "alpha_pattern": (dict,),
    "use_rslora": (bool,),
    "use_dora": (bool,),
    "fan_in_fan_out": (bool,),
}


@dataclasses.dataclass
class CheckpointPayload:
    """A CPU snapshot of everything a checkpoint holds, ready to be serialised off the training thread."""

    checkpoint_type: CheckpointType
    adapter: dict[str, torch.Tensor]
    adapter_config: dict[str, Any]
    base_model: BaseModelRef
    user_metadata: dict[str, Any]
    step: int
    epoch: int
    state_tree: Any = None
    state_tensors: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    @property
    def lora_rank(self) -> int:
        return int(self.adapter_config.get("r", 0))

    def stage(self) -> None:
        """Replace every tensor by a contiguous CPU copy, which later in-place updates cannot change."""
        self.adapter = {k: snapshot_tensor(v) for k, v in self.adapter.items()}
        self.state_tensors = {k: snapshot_tensor(v) for k, v in self.state_tensors.items()}

    def to_files(self) -> dict[str, FileContent]:
        """The file contents, in the order of ``FILES``; tensor files are serialised only when written."""
        files: dict[str, FileContent] = {
            ADAPTER_WEIGHTS: _safetensors_file(self.adapter, _SAFETENSORS_METADATA),
            ADAPTER_CONFIG: json.dumps(self.adapter_config, indent=2, sort_keys=True).encode(),
        }
        if self.checkpoint_type == "training":
            files[STATE_TENSORS] = _safetensors_file(self.state_tensors)
            files[STATE_JSON] = json.dumps(self.state_tree, allow_nan=False).encode()
        return files


def _safetensors_file(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> LazyFile:
    return LazyFile(
        write=lambda path: safetensors.torch.save_file(tensors, path, metadata=metadata),
        render=functools.partial(safetensors.torch.save, tensors, metadata=metadata),
    )


def snapshot_checkpoint(checkpoint: dict[str, Any], defer_copy: bool = False) -> CheckpointPayload:
    """Turn a Lightning checkpoint dict into a :class:`CheckpointPayload`.

    A synchronous save, written before training resumes, uses tensors already on the CPU as they are.
    With ``defer_copy`` (asynchronous saves) the payload keeps references to the live tensors, and
    :meth:`CheckpointPayload.stage` must copy them before training next changes them.
    """
    rest = dict(checkpoint)
    try:
        lora = rest.pop(LORA_KEY)
    except KeyError:
        raise ValueError(
            f"The checkpoint has no {LORA_KEY!r} entry: LoRACheckpointIO saves LoRAModule checkpoints; "
            "use lightning_lora_ckpt.LoRAModule as the LightningModule"
        ) from None
    adapter = rest.pop("state_dict")
    checkpoint_type: CheckpointType = "training" if "optimizer_states" in rest else "sampler"
    payload = CheckpointPayload(
        checkpoint_type=checkpoint_type,
        adapter={k: v.detach() for k, v in adapter.items()} if defer_copy else _on_cpu(adapter),
        adapter_config=lora["adapter_config"],
        base_model=BaseModelRef(**lora["base_model"]),
        user_metadata=dict(lora.get("user_metadata") or {}),
        step=int(rest.get("global_step", 0)),
        epoch=int(rest.get("epoch", 0)),
    )
    if checkpoint_type == "training":
        payload.state_tree, tensors = encode_state(rest)
        payload.state_tensors = tensors if defer_copy else _on_cpu(tensors)
    return payload


def _on_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors, copied only where needed.

    A tensor whose memory an earlier one already uses (the same tensor held twice in the state, e.g. a
    callback's best score) is copied: safetensors refuses to write shared memory.
    """
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen:
            tensor = tensor.clone()
        seen.add(pointer)
        out[key] = tensor
    return out


def versions() -> dict[str, str]:
    return {
        "lightning_lora_ckpt": __version__,
        "lightning": lightning.__version__,
        "peft": peft.__version__,
        "torch": torch.__version__.split("+")[0],
    }


def decode_checkpoint(manifest: Manifest, files: dict[str, bytes], source: str) -> dict[str, Any]:
    """Rebuild the Lightning checkpoint dict from verified file contents."""
    try:
        adapter = _load_tensors(files[ADAPTER_WEIGHTS], f"{source}/{ADAPTER_WEIGHTS}")
        adapter_config = load_json_object(
            files[ADAPTER_CONFIG], MAX_FILE_BYTES[ADAPTER_CONFIG], f"{source}/{ADAPTER_CONFIG}"
        )
        if adapter_config.get("r") != manifest.lora_rank or type(adapter_config.get("r")) is not int:
            raise CheckpointFormatError(
                f"Checkpoint {source}: 'r' in {ADAPTER_CONFIG} is {str(adapter_config.get('r'))[:50]!r}, "
                f"the manifest's lora_rank is {manifest.lora_rank}"
            )
        _check_adapter(adapter, adapter_config, source)
        checkpoint: dict[str, Any] = {
            "epoch": manifest.epoch,
            "global_step": manifest.step,
            "pytorch-lightning_version": manifest.versions.get("lightning", lightning.__version__),
        }
        if STATE_TENSORS in files:  # absent when only the adapter was read
            tensors = _load_tensors(files[STATE_TENSORS], f"{source}/{STATE_TENSORS}")
            checkpoint.update(decode_training_state(files[STATE_JSON], tensors, f"{source}/{STATE_JSON}"))
    except CheckpointFormatError:
        raise
    except (ValueError, KeyError, RecursionError) as err:
        raise CheckpointFormatError(f"Checkpoint {source} cannot be decoded: {err}") from err
    checkpoint["state_dict"] = adapter
    checkpoint[LORA_KEY] = {
        "adapter_config": adapter_config,
        "base_model": dataclasses.asdict(manifest.base_model),
        "user_metadata": manifest.user_metadata,
        "source": source,
    }
    return checkpoint


def _check_adapter(adapter: dict[str, torch.Tensor], config: dict[str, Any], source: str) -> None:
    """Refuse a PEFT config lacking a setting or with one of the wrong type, or whose ranks the tensors do not have.

    Loaders build LoRA layers of the config's ranks before loading the tensors: a rank the tensors lack
    (say r=10**6 beside rank-16 tensors) would allocate without bound.
    """

    def bad(why: str) -> CheckpointFormatError:
        return CheckpointFormatError(f"Checkpoint {source}: {ADAPTER_CONFIG} {why[:300]}")

    missing = [key for key in ("lora_alpha", "target_modules") if key not in config]
    if missing:
        raise bad(f"has no {missing}; it is not a LoRA config as PEFT writes it")
    for key, types in _CONFIG_TYPES.items():
        value = config.get(key)
        if value is not None and type(value) not in types:
            raise bad(f"has {key}={value!r}, expected {' or '.join(t.__name__ for t in types)}")
    if isinstance(config.get("target_modules"), list) and not all(type(m) is str for m in config["target_modules"]):
        raise bad(f"has target_modules={config['target_modules']!r}, expected module names")
    alphas = list((config.get("alpha_pattern") or {}).values())
    ranks = [config["r"], *(config.get("rank_pattern") or {}).values()]
    if not all(type(a) in (int, float) for a in alphas) or not all(type(r) is int and r > 0 for r in ranks):
        raise bad(f"has ranks {ranks[:10]} and alphas {alphas[:10]}, expected positive integers and numbers")
    halves = ((_LORA_HALF.fullmatch(key), tensor) for key, tensor in adapter.items())
    found = {t.shape[0 if m[1] == "A" else 1] for m, t in halves if m and t.ndim >= 2}
    if not found <= set(ranks) or max(ranks) > max(found, default=0):
        raise bad(
            f"gives LoRA ranks {sorted(set(ranks))} (r, rank_pattern) but the tensors of {ADAPTER_WEIGHTS} have ranks "
            f"{sorted(found)}: the two files do not belong together"
        )


def _load_tensors(data: bytes, source: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (never a pickle); ``CheckpointFormatError`` naming ``source`` if it is not one."""
    try:
        return safetensors.torch.load(data)
    except (safetensors.SafetensorError, ValueError, TypeError) as err:
        raise CheckpointFormatError(f"{source} is not a valid safetensors file: {err}") from err
