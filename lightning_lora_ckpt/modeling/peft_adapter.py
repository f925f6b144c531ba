"""PEFT LoRA adapters on a base model: building a ``PeftModel`` from a base reference and an adapter config,
reading an adapter's tensors and config out of one, and loading verified tensors into it.

Nothing here knows Lightning: ``LoRAModule``, the checkpoint plugin, sampling and hotload all build and
read adapters through these functions.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from transformers import PreTrainedModel

from ..format.manifest import BaseModelRef
from .base import config_fingerprint, load_base_model

#: The settings of PEFT's ``LoraConfig``.
LORA_FIELDS = frozenset(f.name for f in dataclasses.fields(LoraConfig))
#: LoRA settings that must match between a checkpoint and the model it is loaded into.
LORA_IDENTITY = ("r", "lora_alpha", "target_modules", "use_rslora", "use_dora")


#: ``init_lora_weights`` values that only choose how training starts (served as saved: initialisation is off).
PLAIN_INITS = frozenset({"gaussian", "eva", "orthogonal", "mica"})
#: Settings that only configure an initialisation, dropped with it.
_INIT_ONLY = ("loftq_config", "eva_config", "corda_config", "lora_ga_config")


def check_servable_config(adapter_config: dict[str, Any], source: str = "the checkpoint") -> None:
    """Refuse a saved PEFT config that would change the frozen base when its adapter is added, or whose tensors
    only make sense on a base PEFT changed.

    Refused: an ``init_lora_weights`` other than a bool, ``"gaussian"``, ``"eva"``, ``"orthogonal"`` or
    ``"mica"`` (``"pissa"``, ``"pissa_niter_<n>"``, ``"olora"``, ``"corda"``, ``"lora_ga"`` subtract the adapter's
    start from the base weights, ``"loftq"`` replaces them by a quantized residual); ``kasa_config`` (KaSA
    truncates the base weights); ``layer_replication`` (duplicates base layers); ``bias`` other than ``"none"``
    (the adapter carries base biases); ``modules_to_save`` and ``trainable_token_indices`` (copies of base
    modules and embedding rows, not LoRA).

    Args:
        adapter_config: the PEFT config, as ``adapter_config.json`` holds it.
        source: the checkpoint's URI, for the message.

    Raises:
        ValueError: naming the setting, its value and the fix.
    """

    def refuse(key: str, why: str) -> ValueError:
        value = str(adapter_config.get(key))[:80]
        return ValueError(f"Checkpoint {source} has {key}={value}: {why}; it is not loaded, nothing was changed")

    init = adapter_config.get("init_lora_weights")
    if init is not None and type(init) is not bool and not (isinstance(init, str) and init.lower() in PLAIN_INITS):
        raise refuse(
            "init_lora_weights",
            "its tensors assume a base PEFT modified at initialisation (PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ) or an "
            "unknown initialisation, and serving them on the original base would be wrong. A PiSSA/OLoRA adapter "
            "must be converted to a plain LoRA before saving, with PEFT's save_pretrained(..., "
            "path_initial_model_for_weight_conversion=<the base as it was before initialisation>)",
        )
    if adapter_config.get("kasa_config") is not None:
        raise refuse("kasa_config", "KaSA truncates the frozen base weights when its adapter is added")
    if adapter_config.get("layer_replication"):
        raise refuse("layer_replication", "PEFT would duplicate layers of the base model")
    if adapter_config.get("bias") not in (None, "none"):
        raise refuse("bias", "the adapter carries bias vectors of the base; loading it would overwrite the base")
    for key in ("modules_to_save", "trainable_token_indices"):
        if adapter_config.get(key):
            raise refuse(key, "copies of base modules or embedding rows are not part of a LoRA adapter")


def saved_lora_config(adapter_config: dict[str, Any], source: str = "the checkpoint") -> LoraConfig:
    """The ``LoraConfig`` of a saved ``adapter_config.json``, for loading its tensors (inference mode).

    A config that would change the base is refused (:func:`check_servable_config`); initialisation is
    switched off (the tensors are loaded right after) and the settings of the initialisation dropped.

    Args:
        adapter_config: the PEFT config, as ``adapter_config.json`` holds it; keys ``LoraConfig`` lacks are
            ignored.
        source: the checkpoint's URI, for error messages.

    Returns:
        The ``LoraConfig``.

    Raises:
        ValueError: the config would change the base, naming the setting.
    """
    check_servable_config(adapter_config, source)
    settings = {k: v for k, v in adapter_config.items() if k in LORA_FIELDS and k not in _INIT_ONLY}
    return LoraConfig(**{**settings, "inference_mode": True, "init_lora_weights": False})


def new_peft_model(base: PreTrainedModel, config: LoraConfig, name_or_path: str, seed: int) -> PeftModel:
    """Wrap a frozen base in a fresh LoRA adapter, initialised from ``seed`` without touching the global RNG.

    Args:
        base: the base model; its parameters are frozen in place.
        config: the LoRA config.
        name_or_path: the base's name, recorded as the adapter config's ``base_model_name_or_path``.
        seed: the seed of the adapter's initialisation.

    Returns:
        The PEFT model.
    """
    for p in base.parameters():
        p.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(base, config)
    model.peft_config[model.active_adapter].base_model_name_or_path = name_or_path
    return model


def base_reference(base: PreTrainedModel, name_or_path: str, quantization: str | None) -> BaseModelRef:
    """The identity a checkpoint records of ``base``: its name and the fingerprint of its config.

    Args:
        base: the loaded base model.
        name_or_path: the name or path it was loaded from.
        quantization: how it was quantized (``"nf4"``, ``"int8"`` or None).

    Returns:
        The reference.
    """
    return BaseModelRef(name_or_path, config_fingerprint(base.config), quantization)


def build_peft_model(
    base_model: BaseModelRef,
    adapter_config: dict[str, Any],
    adapter: dict[str, torch.Tensor],
    *,
    name_or_path: str | None = None,
    dtype: str | torch.dtype = "float32",
    quantization: str | None = None,
    source: str = "the checkpoint",
    allow_pickle: bool = False,
) -> tuple[PeftModel, BaseModelRef]:
    """Load the base a checkpoint names (or ``name_or_path``, which must have its fingerprint) and the adapter.

    Args:
        base_model: the base the checkpoint records.
        adapter_config: the checkpoint's PEFT config.
        adapter: the checkpoint's verified adapter tensors.
        name_or_path: load this base instead of the recorded one, or None.
        dtype: the base's dtype.
        quantization: ``"nf4"``, ``"int8"`` or None (full precision).
        source: the checkpoint's URI, for error messages.
        allow_pickle: let ``name_or_path`` load from pickled weights (the caller trusts it); never applies to the
            base the checkpoint names.

    Returns:
        The model (eval mode, nothing trainable) and the reference of the base actually loaded.

    Raises:
        ValueError: the config would change the base (:func:`check_servable_config`), the base is not the
            checkpoint's, the tensors do not fit the config, or ``dtype`` or ``quantization`` is not supported.
        ImportError: ``quantization`` is set and bitsandbytes is not installed.
    """
    lora_config = saved_lora_config(adapter_config, source)  # refused before any base is loaded
    name = name_or_path or base_model.name_or_path
    revision = adapter_config.get("revision")
    pickle_ok = allow_pickle and name_or_path is not None
    base = load_base_model(name, dtype=dtype, revision=revision, quantization=quantization, allow_pickle=pickle_ok)
    loaded = base_reference(base, name, quantization)
    base_model.check_compatible(loaded, source)
    model = new_peft_model(base, lora_config, name, seed=0)
    load_adapter_tensors(model, adapter, source)
    model.requires_grad_(False)
    return model.eval(), loaded


def adapter_config_of(model: PeftModel, adapter_name: str | None = None) -> dict[str, Any]:
    """An adapter's PEFT config as ``adapter_config.json`` holds it (what ``save_pretrained`` writes).

    Args:
        model: the PEFT model.
        adapter_name: the adapter, or None for the active one.

    Returns:
        The config as plain JSON values, with ``inference_mode`` True.
    """
    config = copy.deepcopy(model.peft_config[adapter_name or model.active_adapter])
    config.inference_mode = True
    return json.loads(json.dumps(config.to_dict(), default=sorted))


def adapter_state_dict(model: PeftModel, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """An adapter's tensors under PEFT's key names (what ``adapter_model.safetensors`` holds).

    Args:
        model: the PEFT model.
        adapter_name: the adapter, or None for the active one.

    Returns:
        The tensors (views of the model's parameters), by PEFT key.
    """
    # save_embedding_layers=False: "auto" looks the base up on the Hub at every save, and the
    # frozen embeddings are never part of a checkpoint.
    return get_peft_model_state_dict(
        model, adapter_name=adapter_name or model.active_adapter, save_embedding_layers=False
    )


def adapter_parameter_names(model: PeftModel, prefix: str = "") -> dict[str, str]:
    """PEFT's adapter key names -> the names of the trainable parameters they are saved from.

    Worked out once by PEFT itself (a dict of names stands in for the tensors), so a caller picks an
    adapter out of any gathered state dict with one lookup per tensor.

    Args:
        model: the PEFT model.
        prefix: prepended to each parameter name (e.g. ``"model."`` for a state dict of a wrapping module).

    Returns:
        The parameter name of each PEFT key.
    """
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    mapping = get_peft_model_state_dict(model, state_dict={n: n for n in trainable}, save_embedding_layers=False)
    return {peft_key: f"{prefix}{name}" for peft_key, name in mapping.items()}


def check_same_lora(ours: dict[str, Any], theirs: dict[str, Any], source: str) -> None:
    """Refuse an adapter config whose LoRA identity (rank, alpha, targets, variants) differs from ``ours``.

    Args:
        ours: the PEFT config of the model being loaded into.
        theirs: the checkpoint's PEFT config.
        source: the checkpoint's URI, for the message.

    Raises:
        ValueError: naming the setting and both values.
    """
    for key in LORA_IDENTITY:
        a, b = _normalise(theirs.get(key)), _normalise(ours.get(key))
        if a != b:
            raise ValueError(
                f"Checkpoint {source} has LoRA {key}={a!r} but this module has {key}={b!r}; build the module "
                "with the checkpoint's LoRA settings (LoRAModule.from_checkpoint reads them from it)"
            )


def check_adapter_tensors(expected: dict[str, tuple[int, ...]], adapter: dict[str, torch.Tensor], source: str) -> None:
    """Refuse adapter tensors whose keys or shapes differ from ``expected`` (PEFT key -> shape).

    Args:
        expected: the shape of each tensor the model holds, by PEFT key.
        adapter: the checkpoint's adapter tensors.
        source: the checkpoint's URI, for the message.

    Raises:
        ValueError: naming the missing, unexpected or misshapen tensors.
    """
    missing, unexpected = sorted(set(expected) - set(adapter)), sorted(set(adapter) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"Adapter tensors of {source} do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for key, tensor in adapter.items():
        if tuple(tensor.shape) != expected[key]:
            raise ValueError(
                f"Adapter tensor {key} of {source} has shape {tuple(tensor.shape)}, the model expects {expected[key]}"
            )


@torch.no_grad()
def load_adapter_tensors(model: PeftModel, adapter: dict[str, torch.Tensor], source: str) -> None:
    """Copy verified adapter tensors into the active adapter of an unsharded model, checking keys and shapes.

    Args:
        model: the PEFT model.
        adapter: the tensors, by PEFT key.
        source: the checkpoint's URI, for error messages.

    Raises:
        ValueError: the keys or shapes differ from the model's; nothing is copied.
    """
    current = adapter_state_dict(model)  # views of the parameters
    check_adapter_tensors({k: tuple(v.shape) for k, v in current.items()}, adapter, source)
    for key, tensor in adapter.items():
        current[key].copy_(tensor)


def frozen_memo(model: torch.nn.Module) -> dict[int, Any]:
    """A ``deepcopy`` memo that shares the frozen base: its parameters and bitsandbytes' per-layer quantization
    state (an int8 layer keeps its quantized weight in ``state``, a 4-bit one its scales in ``quant_state``).

    Args:
        model: the model to copy.

    Returns:
        The memo for ``copy.deepcopy(model, memo)``.
    """
    memo: dict[int, Any] = {id(p): p for p in model.parameters() if not p.requires_grad}
    bnb = sys.modules.get("bitsandbytes")  # loaded by any quantized base
    if bnb is not None:
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear8bitLt):
                memo[id(module.state)] = module.state
            elif isinstance(module, bnb.nn.Linear4bit) and module.quant_state is not None:
                memo[id(module.quant_state)] = module.quant_state
    return memo


def _normalise(value: Any) -> Any:
    return sorted(value) if isinstance(value, (list, set, tuple)) else value
