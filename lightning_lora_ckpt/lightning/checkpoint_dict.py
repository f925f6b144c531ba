"""Lightning checkpoint dicts <-> :class:`CheckpointPayload`, and a PEFT adapter inside a LightningModule.

Lightning hands ``CheckpointIO`` one dict per save. :class:`AdapterBinding` (used from a module's
``on_save_checkpoint``) leaves two things in it: ``state_dict`` holding only the adapter under PEFT's
key names, and a ``lora_ckpt`` entry with the PEFT config and the base model reference. A dict without
``optimizer_states`` (Lightning's ``weights_only=True``) becomes a sampler checkpoint; one with it a
training checkpoint whose remaining entries are the training state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import lightning
import peft
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from peft import PeftModel
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel

from ..format.layout import CheckpointType
from ..format.manifest import BaseModelRef
from ..format.payload import CheckpointPayload
from ..format.strict_json import CheckpointFormatError
from ..format.version import __version__
from ..modeling.peft_adapter import (
    adapter_config_of,
    adapter_parameter_names,
    base_reference,
    check_adapter_tensors,
    check_same_lora,
)
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
    With ``defer_copy`` (asynchronous saves) the payload keeps references to the live tensors and state, which
    must be encoded and copied (``payload.stage``) before training next changes them.

    Raises:
        ValueError: the dict has no adapter entry (the module holds no bound PEFT adapter).
        StateEncodingError: a value of the state cannot be stored without pickle.
    """
    rest = dict(checkpoint)
    try:
        lora = rest.pop(LORA_KEY)
    except KeyError:
        raise ValueError(
            f"The checkpoint has no {LORA_KEY!r} entry: the LoRA adapter was not bound. With a Trainer, "
            "lightning-lora-ckpt must be installed (its callback binds the adapter of your LightningModule); "
            "with Fabric, call checkpoint_io.bind(model) once after fabric.setup(...)"
        ) from None
    adapter = rest.pop("state_dict")
    checkpoint_type: CheckpointType = lora.get("checkpoint_type") or (
        "training" if "optimizer_states" in rest else "sampler"
    )
    payload = CheckpointPayload(
        checkpoint_type=checkpoint_type,
        adapter={k: v.detach() for k, v in adapter.items()} if defer_copy else _on_cpu(adapter),
        adapter_config=lora["adapter_config"],
        base_model=BaseModelRef(**lora["base_model"]),
        user_metadata=dict(lora.get("user_metadata") or {}),
        step=_step(rest),
        epoch=int(rest.get("epoch", 0)),
        model_files=lora.get("model_files"),
    )
    if "max_shard_size" in lora:
        payload.max_shard_size = lora["max_shard_size"]
    if checkpoint_type == "training" and defer_copy:
        payload.defer_state(rest)  # encoded while staging, off the training loop
    elif checkpoint_type == "training":
        payload.set_state(rest)
        payload.state_tensors = _on_cpu(payload.state_tensors)
    return payload


def _step(state: dict[str, Any]) -> int:
    """The step a checkpoint is recorded at: Lightning's ``global_step``, else a Fabric state's integer ``step``."""
    step = state.get("global_step", state.get("step", 0))
    return step if type(step) is int and step >= 0 else 0


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
        "lora_rank": manifest.lora_rank,
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
        model: the ``PeftModel`` (for :class:`~.full_binding.FullModelBinding`, the model trained in full); the
            key names it saves are mapped to ``module``'s parameter names once, before any strategy wraps or
            shards the model.
        base_model: the identity of the frozen base, recorded in every checkpoint.
        user_metadata: recorded in every checkpoint's manifest.
        sampler_dtype: the adapter's dtype in sampler checkpoints (training checkpoints keep its own).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        model: torch.nn.Module,
        base_model: BaseModelRef,
        user_metadata: dict[str, Any] | None = None,
        sampler_dtype: torch.dtype | None = None,
    ) -> None:
        prefix = next(f"{name}." for name, m in module.named_modules() if m is model) if module is not model else ""
        self.model = model
        self.base_model = base_model
        self.user_metadata = dict(user_metadata or {})
        self.sampler_dtype = sampler_dtype
        #: saved key (PEFT's) -> parameter name in ``module``
        self.keys = self.saved_names(prefix)
        self.shapes = {key: tuple(_tensor(module, name).shape) for key, name in self.keys.items()}

    def saved_names(self, prefix: str) -> dict[str, str]:
        """The key of each tensor a checkpoint holds -> its name in the bound module (``prefix`` + the model's name).

        Args:
            prefix: the bound model's name in the module, with a trailing dot (or ``""``).

        Returns:
            The adapter's PEFT keys, mapped to the trainable parameters they are saved from.
        """
        return adapter_parameter_names(cast(PeftModel, self.model), prefix)

    @classmethod
    def of_module(cls, module: torch.nn.Module) -> AdapterBinding:
        """Bind the one PEFT LoRA adapter found among ``module``'s submodules (or ``module`` itself).

        The base reference is the adapter's ``base_model_name_or_path`` and the fingerprint of the base's
        config; sampler checkpoints store the adapter at the base's floating dtype.

        Raises:
            ValueError: with the fix, if ``module`` holds no PEFT model, several, several adapters, or an
                adapter the plugin cannot save (not LoRA, ``modules_to_save``, trainable tokens).
        """
        found = [(name, m) for name, m in module.named_modules() if isinstance(m, PeftModel)]
        what = type(module).__name__
        if not found:
            raise ValueError(
                f"{what} holds no peft.PeftModel: LoRACheckpointIO saves LoRA adapters. Wrap your model with "
                "peft.get_peft_model(model, LoraConfig(...)) (or use lightning_lora_ckpt.LoRAModule), or remove "
                "LoRACheckpointIO from the Trainer's plugins"
            )
        if len(found) > 1:
            names = [name or "<the module itself>" for name, _ in found]
            raise ValueError(
                f"{what} holds {len(found)} PEFT models ({names[:5]}); a LoRACheckpointIO checkpoint holds one "
                "adapter: keep one PeftModel in the LightningModule"
            )
        model = found[0][1]
        if len(model.peft_config) != 1:
            raise ValueError(
                f"The PEFT model of {what} has adapters {sorted(model.peft_config)}; a LoRACheckpointIO checkpoint "
                "holds one adapter: delete the others (model.delete_adapter(name)) before fit"
            )
        config = model.peft_config[model.active_adapter]
        if getattr(config.peft_type, "value", config.peft_type) != "LORA":
            raise ValueError(f"The adapter of {what} is {config.peft_type}, not LoRA; LoRACheckpointIO saves LoRA")
        for option in ("modules_to_save", "trainable_token_indices"):
            if getattr(config, option, None):
                raise ValueError(
                    f"The LoRA adapter of {what} sets {option}={getattr(config, option)!r}: fully trained module "
                    "copies are not part of a LoRA checkpoint. Add those modules to target_modules instead"
                )
        base = cast(PreTrainedModel, model.get_base_model())
        name = config.base_model_name_or_path or getattr(base.config, "_name_or_path", "") or "unknown"
        dtype = next((p.dtype for p in base.parameters() if p.is_floating_point()), None)
        return cls(module, model, base_reference(base, name, _quantization(base)), None, dtype)

    def adapter_config(self) -> dict[str, Any]:
        """The adapter's ``adapter_config.json``."""
        return adapter_config_of(cast(PeftModel, self.model))

    def checkpoint_entry(self, checkpoint_type: CheckpointType) -> dict[str, Any]:
        """What the ``lora_ckpt`` entry of a checkpoint dict holds besides the base, the metadata and the type.

        Args:
            checkpoint_type: the type of the checkpoint being saved.

        Returns:
            ``{"adapter_config": ...}``, the adapter's PEFT config.
        """
        return {"adapter_config": self.adapter_config()}

    def to_checkpoint(self, checkpoint: dict[str, Any], checkpoint_type: CheckpointType | None = None) -> None:
        """Replace the gathered ``state_dict`` by the adapter under PEFT's key names and add the ``lora_ckpt``
        entry and the RNG states (for an exact resume).

        The adapter is picked out of what the strategy gathered (the whole module, or only the trainable
        tensors under FSDP2, on rank 0): a dict lookup per adapter tensor, not a walk over the base.
        """
        gathered = checkpoint["state_dict"]
        adapter = {p: gathered[m] for p, m in self.keys.items() if m in gathered}
        checkpoint_type = checkpoint_type or ("training" if "optimizer_states" in checkpoint else "sampler")
        if checkpoint_type == "sampler" and self.sampler_dtype is not None:  # sampler: serving precision
            adapter = {k: v.to(self.sampler_dtype) if v.is_floating_point() else v for k, v in adapter.items()}
        checkpoint["state_dict"] = adapter
        checkpoint[LORA_KEY] = {
            **self.checkpoint_entry(checkpoint_type),
            "base_model": dataclasses.asdict(self.base_model),
            "user_metadata": self.user_metadata,
            "checkpoint_type": checkpoint_type,
        }
        checkpoint["rng_states"] = _collect_rng_states()

    def check(self, adapter: dict[str, torch.Tensor], lora: dict[str, Any]) -> None:
        """Refuse an adapter of another base, LoRA config or tensor set than this binding's.

        Raises:
            ValueError: naming what differs.
        """
        source = lora.get("source", "the checkpoint")
        BaseModelRef(**lora["base_model"]).check_compatible(self.base_model, source)
        if lora.get("lora_rank") == 0:
            raise ValueError(
                f"Checkpoint {source} is a full-parameter checkpoint (lora_rank 0) and this module trains a LoRA "
                "adapter; build the module with rank=0 (LoRAModule.from_checkpoint reads it from the checkpoint)"
            )
        check_same_lora(self.adapter_config(), lora["adapter_config"], source)
        check_adapter_tensors(self.shapes, adapter, source)

    def module_state(self, adapter: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The adapter tensors under the bound module's parameter names."""
        return {self.keys[k]: adapter[k] for k in self.keys}

    def restore_rng(self, checkpoint: dict[str, Any]) -> None:
        """Restore the RNG states :meth:`to_checkpoint` recorded (exact resume of dropout and sampling)."""
        if "rng_states" in checkpoint:
            _set_rng_states(checkpoint["rng_states"])

    def load(
        self, adapter: dict[str, torch.Tensor], lora: dict[str, Any], module: torch.nn.Module, strategy_model: Any
    ) -> None:
        """Load adapter tensors (PEFT key names), refusing another base, LoRA config or tensor set.

        Plain and DDP parameters get a copy each; sharded ones (FSDP1, FSDP2) are loaded through torch's
        distributed state-dict API, which scatters the full tensors.
        """
        self.check(adapter, lora)
        by_module_key = self.module_state(adapter)
        if isinstance(strategy_model, FullyShardedDataParallel):  # FSDP1: addressed through its root wrapper
            root: torch.nn.Module = strategy_model
        else:
            params = {name: _tensor(module, name) for name in by_module_key}
            if not any(isinstance(p, DTensor) for p in params.values()):
                with torch.no_grad():
                    for name, tensor in by_module_key.items():
                        params[name].copy_(tensor)
                return
            root = module
        set_model_state_dict(root, by_module_key, options=StateDictOptions(full_state_dict=True, strict=False))


def _quantization(base: torch.nn.Module) -> str | None:
    """How a base was quantized with bitsandbytes (``"nf4"``, ``"fp4"``, ``"int8"``), from its HF config."""
    config = getattr(getattr(base, "config", None), "quantization_config", None)
    if config is None:
        return None
    settings = config if isinstance(config, dict) else config.to_dict()
    if settings.get("load_in_8bit"):
        return "int8"
    if settings.get("load_in_4bit"):
        return str(settings.get("bnb_4bit_quant_type") or "nf4")
    return None


def _tensor(module: torch.nn.Module, name: str) -> torch.Tensor:
    """The parameter or buffer ``name`` of ``module``."""
    try:
        return module.get_parameter(name)
    except AttributeError:
        return module.get_buffer(name)
