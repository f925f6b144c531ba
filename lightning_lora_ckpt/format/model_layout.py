"""The file set of a full Hugging Face model directory, as a full-parameter checkpoint (``lora_rank`` 0) holds it.

What ``save_pretrained`` writes: ``config.json``, ``generation_config.json`` if the model has one, the tokenizer's
files, and the weights as ``model.safetensors`` or, above the shard size, ``model-0000i-of-0000N.safetensors`` with
``model.safetensors.index.json`` (Hugging Face's sharding convention). Pure names: no torch, no file access, so a
manifest is validated without loading anything.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MODEL_CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
MODEL_WEIGHTS = "model.safetensors"
MODEL_INDEX = "model.safetensors.index.json"
#: ``str.format`` pattern of the shard names (huggingface_hub's ``filename_pattern``; ``suffix`` is ``-0000i-of-0000N``).
SHARD_PATTERN = "model{suffix}.safetensors"
_SHARD = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")
#: The tokenizer files ``save_pretrained`` writes for the tokenizers transformers ships, and their size caps.
TOKENIZER_FILES: dict[str, int] = {
    "tokenizer.json": 256 << 20,
    "tokenizer_config.json": 16 << 20,
    "special_tokens_map.json": 1 << 20,
    "added_tokens.json": 16 << 20,
    "chat_template.jinja": 1 << 20,
    "chat_template.json": 1 << 20,
    "vocab.json": 64 << 20,
    "vocab.txt": 64 << 20,
    "merges.txt": 64 << 20,
    "tokenizer.model": 64 << 20,
    "spiece.model": 64 << 20,
    "sentencepiece.bpe.model": 64 << 20,
}
#: Size caps of the model directory's JSON and text files (far above any real one): a manifest listing more is
#: refused before anything is read.
MAX_MODEL_FILE_BYTES: dict[str, int] = {
    MODEL_CONFIG: 1 << 20,
    GENERATION_CONFIG: 1 << 20,
    MODEL_INDEX: 64 << 20,
    **TOKENIZER_FILES,
}


def weight_files(names: Iterable[str]) -> list[str]:
    """The weight files among ``names`` (``model.safetensors`` or the shards), in shard order.

    Args:
        names: file names of a model directory.

    Returns:
        The safetensors weight file names, sorted.
    """
    return sorted(n for n in names if n == MODEL_WEIGHTS or _SHARD.fullmatch(n))


def model_file_set_problem(names: Iterable[str]) -> str | None:
    """What is wrong with ``names`` as the file set of a Hugging Face model directory, or None if nothing.

    Valid: ``config.json``; either ``model.safetensors`` alone or ``model.safetensors.index.json`` with shards
    ``model-00001-of-0000N.safetensors`` ... ``model-0000N-of-0000N.safetensors`` (all N of them); optionally
    ``generation_config.json`` and the tokenizer files of :data:`TOKENIZER_FILES`. Any other name (a path, a
    pickle, a file transformers would run) is refused.

    Args:
        names: the file names a manifest lists for the model directory.

    Returns:
        A one-line description of the problem, or None.
    """
    names = set(names)
    shards = sorted(n for n in names if _SHARD.fullmatch(n))
    allowed = {MODEL_CONFIG, GENERATION_CONFIG, MODEL_WEIGHTS, MODEL_INDEX, *TOKENIZER_FILES, *shards}
    unknown = sorted(names - allowed)
    if unknown:
        return (
            f"lists files a Hugging Face model directory does not hold: {[n[:100] for n in unknown[:5]]} "
            f"(allowed: {MODEL_CONFIG}, {GENERATION_CONFIG}, {MODEL_WEIGHTS} or shards with {MODEL_INDEX}, "
            "tokenizer files)"
        )
    if MODEL_CONFIG not in names:
        return f"lists no {MODEL_CONFIG}"
    if not shards:
        if MODEL_WEIGHTS not in names or MODEL_INDEX in names:
            return f"must list {MODEL_WEIGHTS} (unsharded) or shards with {MODEL_INDEX}"
        return None
    total = int(shards[0].removesuffix(".safetensors").rsplit("-of-", 1)[1])  # the N of model-0000i-of-0000N
    expected = [SHARD_PATTERN.format(suffix=f"-{i:05d}-of-{total:05d}") for i in range(1, total + 1)]
    if MODEL_WEIGHTS in names or MODEL_INDEX not in names or shards != expected:
        return (
            f"lists shards {shards[:5]}: a sharded model lists {MODEL_INDEX} and every shard "
            f"model-0000i-of-{total:05d}.safetensors (i = 1..{total}), and no {MODEL_WEIGHTS}"
        )
    return None
