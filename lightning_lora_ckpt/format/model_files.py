"""A full model's weights <-> the safetensors files of a Hugging Face model directory, both directions symmetric.

Writing plans the shards with huggingface_hub (the names and index ``save_pretrained`` writes), so
``AutoModelForCausalLM.from_pretrained`` loads the directory as is; ``merge_adapter`` writes its shards by the same
plan. Reading checks the index against the shards: every tensor in the shard the index names, none twice.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from huggingface_hub import StateDictSplit, split_state_dict_into_shards_factory

from .files import FileContent, ReadBytes
from .model_layout import MAX_MODEL_FILE_BYTES, MODEL_CONFIG, MODEL_INDEX, SHARD_PATTERN, weight_files
from .strict_json import CheckpointFormatError, load_json_object
from .tensor_files import load_tensors, safetensors_file

#: The metadata ``save_pretrained`` writes into every safetensors weight file.
WEIGHTS_METADATA = {"format": "pt"}
#: The largest weight file of a full-parameter checkpoint unless its module says otherwise.
DEFAULT_MAX_SHARD_SIZE = "2GB"


def plan_shards(sizes: dict[str, int], max_shard_size: int | str) -> StateDictSplit:
    """huggingface_hub's shard plan (file names, tensor -> file map, index metadata) for tensors of these sizes.

    Args:
        sizes: the bytes of each tensor, by name, in write order.
        max_shard_size: the largest shard, as bytes or a string like ``"2GB"``.

    Returns:
        The plan; ``is_sharded`` is False when everything fits ``model.safetensors``.

    Raises:
        ValueError: ``max_shard_size`` is not a size, with the fix.
    """
    try:
        return split_state_dict_into_shards_factory(
            sizes, get_storage_size=int, filename_pattern=SHARD_PATTERN, max_shard_size=max_shard_size
        )
    except ValueError as err:
        raise ValueError(
            f"max_shard_size={max_shard_size!r} is not a size ({err}); pass bytes or a string like '500MB' or '2GB'"
        ) from err


def shard_index(plan: StateDictSplit) -> bytes:
    """``model.safetensors.index.json`` of a sharded plan (``metadata`` and ``weight_map``).

    Args:
        plan: a plan of :func:`plan_shards`.

    Returns:
        The index document.
    """
    return json.dumps(
        {"metadata": plan.metadata, "weight_map": plan.tensor_to_filename}, indent=2, sort_keys=True
    ).encode()


def encode_model(
    tensors: dict[str, torch.Tensor], metadata_files: dict[str, bytes], max_shard_size: int | str
) -> dict[str, FileContent]:
    """The files of a model directory: its metadata files as they are, then the weights, sharded above the size.

    Args:
        tensors: the weights under the names ``save_pretrained`` writes (tied copies left out).
        metadata_files: ``config.json``, ``generation_config.json`` and the tokenizer files, by name.
        max_shard_size: the largest weight file, as bytes or a string like ``"2GB"``.

    Returns:
        The contents of every file, by name; tensor files are serialised only when written.

    Raises:
        ValueError: ``max_shard_size`` is not a size.
    """
    plan = plan_shards({k: v.numel() * v.element_size() for k, v in tensors.items()}, max_shard_size)
    files: dict[str, FileContent] = dict(metadata_files)
    for filename, names in plan.filename_to_tensors.items():
        files[filename] = safetensors_file({n: tensors[n] for n in names}, WEIGHTS_METADATA)
    if plan.is_sharded:
        files[MODEL_INDEX] = shard_index(plan)
    return files


def decode_model(files: dict[str, ReadBytes], source: str) -> tuple[dict[str, torch.Tensor], dict[str, bytes]]:
    """The (weights, metadata files) of a model directory's verified files.

    Args:
        files: the verified bytes of the directory's files, by name (a valid file set, as the manifest checks).
        source: the checkpoint's URI, for error messages.

    Returns:
        The weights by name, and the other files (config, generation config, tokenizer) as bytes.

    Raises:
        CheckpointFormatError: naming ``source`` and the file: ``config.json`` or the index is not a JSON object
            of the right shape, or the shards do not hold exactly the tensors the index maps to them.
    """
    shards = weight_files(files)
    config = load_json_object(files[MODEL_CONFIG], MAX_MODEL_FILE_BYTES[MODEL_CONFIG], f"{source}/{MODEL_CONFIG}")
    if not isinstance(config.get("model_type"), str):
        raise CheckpointFormatError(f"Checkpoint {source}: {MODEL_CONFIG} names no model_type")
    tensors: dict[str, torch.Tensor] = {}
    by_shard: dict[str, set[str]] = {}
    for shard in shards:
        loaded = load_tensors(files[shard], f"{source}/{shard}")
        twice = sorted(set(loaded) & set(tensors))
        if twice:
            raise CheckpointFormatError(f"Checkpoint {source}: {shard} holds {twice[:3]} again; the shards overlap")
        tensors.update(loaded)
        by_shard[shard] = set(loaded)
    if MODEL_INDEX in files:
        _check_index(files[MODEL_INDEX], by_shard, source)
    metadata = {name: bytes(data) for name, data in files.items() if name not in shards and name != MODEL_INDEX}
    return tensors, metadata


def _check_index(raw: ReadBytes, by_shard: dict[str, set[str]], source: str) -> None:
    """Refuse an index whose ``weight_map`` differs from what the shards hold."""
    where = f"{source}/{MODEL_INDEX}"
    index = load_json_object(raw, MAX_MODEL_FILE_BYTES[MODEL_INDEX], where)
    weight_map: Any = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointFormatError(f"{where}: 'weight_map' must map tensor names to shard file names")
    actual = {name: shard for shard, names in by_shard.items() for name in names}
    if weight_map != actual:
        wrong = sorted(k for k in set(weight_map) | set(actual) if weight_map.get(k) != actual.get(k))
        raise CheckpointFormatError(
            f"{where}: 'weight_map' does not match the shards for {wrong[:3]}: the index and the shards do not belong "
            "together"
        )
