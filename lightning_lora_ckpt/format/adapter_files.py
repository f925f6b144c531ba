"""The two PEFT files of every checkpoint: adapter tensors + PEFT config <-> ``adapter_model.safetensors`` and
``adapter_config.json``, exactly as PEFT's ``save_pretrained`` writes them (so PEFT and vLLM load them as is).

Decoding checks the config before any loader builds layers from it: a setting of the wrong type, or ranks
the tensors do not have, is refused (a loader allocates LoRA layers of the config's ranks first).
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch

from .files import FileContent
from .manifest import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MAX_FILE_BYTES
from .strict_json import CheckpointFormatError, load_json_object
from .tensor_files import load_tensors, safetensors_file

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


def encode_adapter(tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, FileContent]:
    """The adapter's two files; the tensor file is serialised only when written.

    Args:
        tensors: the adapter tensors under PEFT's key names.
        config: the PEFT config, as ``adapter_config.json`` holds it.

    Returns:
        The contents of ``adapter_model.safetensors`` and ``adapter_config.json``, by file name.
    """
    return {
        ADAPTER_WEIGHTS: safetensors_file(tensors, _SAFETENSORS_METADATA),
        ADAPTER_CONFIG: json.dumps(config, indent=2, sort_keys=True).encode(),
    }


def decode_adapter(
    files: dict[str, bytes], lora_rank: int, source: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The (tensors, PEFT config) of an adapter's verified files; ``lora_rank`` is the manifest's.

    Args:
        files: the verified bytes of ``adapter_model.safetensors`` and ``adapter_config.json``, by file name.
        lora_rank: the manifest's ``lora_rank``, which the config's ``r`` must equal.
        source: the checkpoint's URI, for error messages.

    Returns:
        The adapter tensors under PEFT's key names, and the PEFT config.

    Raises:
        CheckpointFormatError: naming ``source``, if a file is malformed or the two do not belong together.
    """
    tensors = load_tensors(files[ADAPTER_WEIGHTS], f"{source}/{ADAPTER_WEIGHTS}")
    config = load_json_object(files[ADAPTER_CONFIG], MAX_FILE_BYTES[ADAPTER_CONFIG], f"{source}/{ADAPTER_CONFIG}")
    if config.get("r") != lora_rank or type(config.get("r")) is not int:
        raise CheckpointFormatError(
            f"Checkpoint {source}: 'r' in {ADAPTER_CONFIG} is {str(config.get('r'))[:50]!r}, "
            f"the manifest's lora_rank is {lora_rank}"
        )
    check_adapter(tensors, config, source)
    return tensors, config


def check_adapter(adapter: dict[str, torch.Tensor], config: dict[str, Any], source: str) -> None:
    """Refuse a PEFT config lacking a setting or with one of the wrong type, or whose ranks the tensors lack.

    Args:
        adapter: the adapter tensors under PEFT's key names.
        config: the PEFT config; it must hold ``r``.
        source: the checkpoint's URI, for error messages.

    Raises:
        CheckpointFormatError: naming ``source`` and the setting.
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
