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

from .files import FileContent, ReadBytes
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
#: A plain module name (or a dotted path of them; ``\.`` may stand for a literal dot): PEFT runs the names
#: and pattern keys of a config as regular expressions; these hold no repetition, so matching them is cheap.
_PLAIN_NAME = re.compile(r"(?:[A-Za-z0-9_\-.]|\\\.){1,256}")
#: Settings PEFT matches against module names as regular expressions (strings, lists, or dict keys).
_NAME_SETTINGS = (
    "target_modules",
    "exclude_modules",
    "modules_to_save",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
)


def encode_adapter(tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, FileContent]:
    """The adapter's two files; the tensor file is serialised only when written.

    Args:
        tensors: the adapter tensors under PEFT's key names.
        config: the PEFT config, as ``adapter_config.json`` holds it.

    Returns:
        The contents of ``adapter_model.safetensors`` and ``adapter_config.json``, by file name.

    Raises:
        CheckpointFormatError: a module name or pattern of ``config`` is a regular expression no loader of
            this package accepts (see :func:`check_module_names`): nothing is written that would not load.
    """
    check_module_names(config, None)
    return {
        ADAPTER_WEIGHTS: safetensors_file(tensors, _SAFETENSORS_METADATA),
        ADAPTER_CONFIG: json.dumps(config, indent=2, sort_keys=True).encode(),
    }


def decode_adapter(
    files: dict[str, ReadBytes], lora_rank: int, source: str
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
    check_module_names(config, source)
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


def check_module_names(config: dict[str, Any], source: str | None) -> None:
    """Refuse module names and pattern keys PEFT would run as arbitrary regular expressions.

    PEFT matches a string ``target_modules``/``exclude_modules``, the entries of ``layers_pattern`` and
    ``modules_to_save`` and the keys of ``rank_pattern``/``alpha_pattern`` against every module name as
    regular expressions: one like ``(.*.*)*z`` takes exponential time, so a loader would hang. Accepted:
    ``"all-linear"`` and plain module names or dotted paths (letters, digits, ``_``, ``-``, ``.``, ``\\.``;
    at most 256 characters each), which hold no repetition: matching them is cheap. The check's own work is
    linear in the config's size.

    Args:
        config: the PEFT config, as ``adapter_config.json`` holds it.
        source: the checkpoint's URI, for error messages; None for a config being saved.

    Raises:
        CheckpointFormatError: naming ``source``, the setting and the fix.
    """
    where = f"Checkpoint {source}" if source is not None else "The LoRA adapter to save"
    for key in _NAME_SETTINGS:
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, str):
            names: list[Any] = [] if key == "target_modules" and value == "all-linear" else [value]
        elif isinstance(value, dict):
            names = list(value)
        elif isinstance(value, list):
            names = value
        else:
            raise CheckpointFormatError(
                f"{where}: {ADAPTER_CONFIG} has {key} of type {type(value).__name__}, not module names"
            )
        for name in names:
            if type(name) is not str or not _PLAIN_NAME.fullmatch(name):
                raise CheckpointFormatError(
                    f"{where}: {ADAPTER_CONFIG} has {key} entry {str(name)[:100]!r}, which is not a "
                    "plain module name: regular expressions are refused (PEFT would run them against every module "
                    "name); list the module names instead (letters, digits, '_', '-', '.')"
                )
