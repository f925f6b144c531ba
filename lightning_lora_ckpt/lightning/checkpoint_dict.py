"""Lightning checkpoint dicts <-> :class:`CheckpointPayload`, and a PEFT adapter inside a LightningModule.

Lightning hands ``CheckpointIO`` one dict per save. :class:`AdapterBinding` (used from a module's
``on_save_checkpoint``) leaves two things in it: ``state_dict`` holding only the adapter under PEFT's
key names, and a ``lora_ckpt`` entry with the PEFT config and the base model reference. A dict without
``optimizer_states`` (Lightning's ``weights_only=True``) becomes a sampler checkpoint; one with it a
training checkpoint whose remaining entries are the training state.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import lightning
import peft
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from peft import PeftModel
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.tensor import DTensor

from ..format.layout import CheckpointType
from ..format.manifest import BaseModelRef
from ..format.payload import CheckpointPayload
from ..format.strict_json import CheckpointFormatError
from ..format.version import __version__
from ..modeling.peft_adapter import adapter_config_of, adapter_parameter_names, check_adapter_tensors, check_same_lora
from ..storage.loading import OpenedCheckpoint

LORA_KEY = "lora_ckpt"


def versions() -> dict[str, str]:
    """The versions recorded in a manifest: this package, Lightning, PEFT and torch."""
    return {
        "lightning_lora_ckpt": __version__,
        "lightning": lightning.__version__,
        "peft": peft.__version__,
        "torch": torch.__version__.split("+")[0],
    }


def payload_from_checkpoint(checkpoint: dict[str, Any], defer_copy: bool = False) -> CheckpointPayload:
    """Turn a Lightning checkpoint dict into a :class:`CheckpointPayload`.

    A synchronous save, written before training resumes, uses tensors already on the CPU as they are.
    With ``defer_copy`` (asynchronous saves) the payload keeps references to the live tensors, which must
    be copied (``payload.map_tensors``) before training next changes them.

    Raises:
        ValueError: the dict has no adapter entry (the module holds no bound PEFT adapter).
        StateEncodingError: a value of the state cannot be stored without pickle.
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
        payload.set_state(rest)
        if not defer_copy:
            payload.state_tensors = _on_cpu(payload.state_tensors)
    return payload


def checkpoint_from_opened(opened: OpenedCheckpoint) -> dict[str, Any]:
    """Rebuild the Lightning checkpoint dict of an opened checkpoint (tensors on the CPU).

    Raises:
        CheckpointFormatError: the training state is malformed.
    """
    manifest = opened.manifest
    checkpoint: dict[str, Any] = {
        "epoch": manifest.epoch,
        "global_step": manifest.step,
        "pytorch-lightning_version": manifest.versions.get("lightning", lightning.__version__),
    }
    try:
        checkpoint.update(opened.payload.state(opened.uri))
    except CheckpointFormatError:
        raise
    except (ValueError, KeyError, RecursionError) as err:
        raise CheckpointFormatError(f"Checkpoint {opened.uri} cannot be decoded: {err}") from err
    checkpoint["state_dict"] = opened.adapter
    checkpoint[LORA_KEY] = {
        "adapter_config": opened.adapter_config,
        "base_model": dataclasses.asdict(manifest.base_model),
        "user_metadata": manifest.user_metadata,
        "source": opened.uri,
    }
    return checkpoint


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


class AdapterBinding:
    """One PEFT model inside a LightningModule, and how its adapter travels in Lightning checkpoint dicts.

    Args:
        module: the LightningModule (or any ``nn.Module``) holding ``model``.
        model: the ``PeftModel``; its adapter's key names are mapped to ``module``'s parameter names once,
            before any strategy wraps or shards the model.
        base_model: the identity of the frozen base, recorded in every checkpoint.
        user_metadata: recorded in every checkpoint's manifest.
        sampler_dtype: the adapter's dtype in sampler checkpoints (training checkpoints keep its own).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        model: PeftModel,
        base_model: BaseModelRef,
        user_metadata: dict[str, Any] | None = None,
        sampler_dtype: torch.dtype | None = None,
    ) -> None:
        prefix = next(f"{name}." for name, m in module.named_modules() if m is model) if module is not model else ""
        self.model = model
        self.base_model = base_model
        self.user_metadata = dict(user_metadata or {})
        self.sampler_dtype = sampler_dtype
        #: PEFT key -> parameter name in ``module``
        self.keys = adapter_parameter_names(model, prefix)
        self.shapes = {key: tuple(module.get_parameter(name).shape) for key, name in self.keys.items()}

    def adapter_config(self) -> dict[str, Any]:
        """The adapter's ``adapter_config.json``."""
        return adapter_config_of(self.model)

    def to_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Replace the gathered ``state_dict`` by the adapter under PEFT's key names and add the ``lora_ckpt``
        entry and the RNG states (for an exact resume).

        The adapter is picked out of what the strategy gathered (the whole module, or only the trainable
        tensors under FSDP2, on rank 0): a dict lookup per adapter tensor, not a walk over the base.
        """
        gathered = checkpoint["state_dict"]
        adapter = {p: gathered[m] for p, m in self.keys.items() if m in gathered}
        if "optimizer_states" not in checkpoint and self.sampler_dtype is not None:  # sampler: serving precision
            adapter = {k: v.to(self.sampler_dtype) for k, v in adapter.items()}
        checkpoint["state_dict"] = adapter
        checkpoint[LORA_KEY] = {
            "adapter_config": self.adapter_config(),
            "base_model": dataclasses.asdict(self.base_model),
            "user_metadata": self.user_metadata,
        }
        checkpoint["rng_states"] = _collect_rng_states()

    def from_checkpoint(self, checkpoint: dict[str, Any], module: torch.nn.Module, strategy_model: Any) -> None:
        """Load the adapter of a checkpoint dict written by :meth:`to_checkpoint` into ``module``, restore the
        RNG states, and empty ``state_dict`` (nothing is left for Lightning's own strict loading).

        Raises:
            ValueError: the dict has no adapter entry, or one of another base, LoRA config or tensor set.
        """
        lora = checkpoint.get(LORA_KEY)
        if lora is None:
            raise ValueError(
                "This checkpoint was not written by LoRACheckpointIO (no 'lora_ckpt' entry); add "
                "plugins=[LoRACheckpointIO(...)] to the Trainer that loads it"
            )
        self.load(checkpoint["state_dict"], lora, module, strategy_model)
        checkpoint["state_dict"] = {}
        if "rng_states" in checkpoint:
            _set_rng_states(checkpoint["rng_states"])

    def load(
        self, adapter: dict[str, torch.Tensor], lora: dict[str, Any], module: torch.nn.Module, strategy_model: Any
    ) -> None:
        """Load adapter tensors (PEFT key names), refusing another base, LoRA config or tensor set.

        Plain and DDP parameters get a copy each; sharded ones (FSDP1, FSDP2) are loaded through torch's
        distributed state-dict API, which scatters the full tensors.
        """
        source = lora.get("source", "the checkpoint")
        BaseModelRef(**lora["base_model"]).check_compatible(self.base_model, source)
        check_same_lora(self.adapter_config(), lora["adapter_config"], source)
        check_adapter_tensors(self.shapes, adapter, source)
        by_module_key: dict[str, Any] = {self.keys[k]: adapter[k] for k in self.keys}
        if isinstance(strategy_model, FullyShardedDataParallel):  # FSDP1: addressed through its root wrapper
            root: torch.nn.Module = strategy_model
        else:
            params = {name: module.get_parameter(name) for name in by_module_key}
            if not any(isinstance(p, DTensor) for p in params.values()):
                with torch.no_grad():
                    for name, tensor in by_module_key.items():
                        params[name].copy_(tensor)
                return
            root = module
        set_model_state_dict(root, by_module_key, options=StateDictOptions(full_state_dict=True, strict=False))
