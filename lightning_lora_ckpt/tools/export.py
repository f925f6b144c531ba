"""Merging a LoRA checkpoint into its base model: a full Hugging Face model directory, loadable with no PEFT.

``merge_adapter`` folds ``W += scale * B @ A`` into every targeted weight (in float32, then cast once
to the output dtype) and writes sharded safetensors, ``config.json``, the generation config and the
tokenizer. The base is streamed: from a directory (or HF snapshot) of safetensors files it is read
tensor by tensor, input shard by input shard, and output shards are flushed as soon as they are
complete, so the whole model is never in memory. A built-in base (no files) is built in memory from
its config and streamed out the same way.

QLoRA checkpoints are plain PEFT adapters whose manifest names the full-precision base: the adapter
is always folded into those full-precision weights (a merged model is never quantized).
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import torch
from peft.utils.other import get_pattern_key
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, GenerationConfig, PretrainedConfig, PreTrainedModel
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME

from ..format.manifest import ADAPTER_CONFIG, BaseModelRef
from ..format.model_files import WEIGHTS_METADATA, plan_shards, shard_index
from ..modeling.base import config_fingerprint, float_dtype, load_config, load_tokenizer
from ..modeling.full_model import check_named_base, write_model_metadata
from ..storage.loading import OpenedCheckpoint, open_checkpoint
from ..storage.local import apply_umask, install_dir
from .base_stream import BaseTensors, open_base

log = logging.getLogger(__name__)

# PEFT LoRA options that change what merging means; a truthy value is refused.
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (a magnitude vector rescales the merged weight)",
    "lora_bias": "lora_bias (a trained bias on lora_B)",
    "modules_to_save": "modules_to_save (fully trained copies of base modules)",
    "trainable_token_indices": "trainable_token_indices (trained embedding rows)",
    "layer_replication": "layer_replication (the adapted model has more layers than the base)",
    "target_parameters": "target_parameters (LoRA on raw parameters, e.g. MoE experts)",
    "alora_invocation_tokens": "activated LoRA (applied only after its invocation tokens, so it cannot be merged)",
    "use_qalora": "QA-LoRA (pooled inputs)",
    "use_bdlora": "BD-LoRA",
    "arrow_config": "Arrow routing between adapters",
}
_LORA_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<half>[AB])\.weight")

ProgressFn = Callable[[str, int, int], None]
_BLOCK_ELEMENTS = 1 << 22  # float32 elements of a weight folded at a time (16 MiB; smaller blocks are slower)
_MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None) if sys.platform.startswith("linux") else None


@dataclasses.dataclass(frozen=True)
class LoRADelta:
    """The low-rank update of one linear weight: ``scale * B @ A`` (transposed for ``fan_in_fan_out`` layers).

    Attributes:
        lora_A: the (r, in) matrix, float32.
        lora_B: the (out, r) matrix, float32.
        scale: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
        fan_in_fan_out: whether the weight is stored (in, out), as in GPT-2's ``Conv1D``.
    """

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scale: float
    fan_in_fan_out: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        """The shape of the weight this delta is added to."""
        out_features, in_features = self.lora_B.shape[0], self.lora_A.shape[1]
        return (in_features, out_features) if self.fan_in_fan_out else (out_features, in_features)

    def merged(self, weight: torch.Tensor, dtype: torch.dtype, scratch: torch.Tensor) -> torch.Tensor:
        """``weight + delta`` summed in float32 and cast to ``dtype`` (a new tensor: ``weight`` is never modified).

        Rows are folded a block at a time in ``scratch``, a float32 buffer of at least one row that the
        caller reuses for every weight: a float32 copy of each weight, freed between the results kept
        for the shard, would fragment the heap and add hundreds of MB to the peak.

        Args:
            weight: the base weight, of shape :attr:`shape`.
            dtype: the result's dtype.
            scratch: a flat float32 buffer of at least one row of ``weight``.

        Returns:
            The merged weight.
        """
        # Row i of the update is left[i] @ right; (B @ A).T == A.T @ B.T for (in, out) weights.
        left, right = (self.lora_A.T, self.lora_B.T) if self.fan_in_fan_out else (self.lora_B, self.lora_A)
        rows, cols = weight.shape
        step = scratch.numel() // cols
        out = torch.empty(weight.shape, dtype=dtype)
        for start in range(0, rows, step):
            end = min(start + step, rows)
            block = scratch[: (end - start) * cols].view(end - start, cols).copy_(weight[start:end])
            out[start:end] = block.addmm_(left[start:end], right, alpha=self.scale)
        return out


def lora_deltas(adapter: dict[str, torch.Tensor], adapter_config: dict[str, Any], source: str) -> dict[str, LoRADelta]:
    """The deltas of a PEFT LoRA adapter (``adapter_model.safetensors`` keys), by base weight name.

    Honours ``use_rslora`` (scale ``alpha/sqrt(r)`` instead of ``alpha/r``), ``rank_pattern``,
    ``alpha_pattern`` and ``fan_in_fan_out``; refuses DoRA and other variants whose merge is not
    ``W + scale * B @ A``, and adapters of non-linear layers (embeddings, convolutions).

    Args:
        adapter: the adapter tensors under PEFT's key names.
        adapter_config: the PEFT config (``adapter_config.json``).
        source: the checkpoint's URI, for error messages.

    Returns:
        The delta of each adapted weight, by the base weight's name (e.g. ``model.layers.0.mlp.up_proj.weight``).

    Raises:
        ValueError: the adapter is not plain LoRA on linear layers, lacks half of a pair, or has tensors
            whose shapes do not match its ranks.
    """
    peft_type = adapter_config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"{source} holds a {peft_type} adapter; merge_adapter merges LoRA adapters only")
    for option, what in _UNSUPPORTED_OPTIONS.items():
        if adapter_config.get(option):
            raise ValueError(
                f"{source} uses {what} ({ADAPTER_CONFIG}: {option}={adapter_config[option]!r}); merge_adapter folds "
                "plain LoRA only: merge it with peft (PeftModel.from_pretrained(base, path).merge_and_unload())"
            )
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in adapter.items():
        match = _LORA_KEY.fullmatch(key)
        if match is None:
            raise ValueError(
                f"{source}: adapter tensor {key!r} is not the lora_A/lora_B weight of a linear layer; "
                "merge_adapter supports LoRA on linear layers only (not embeddings, convolutions or bias training)"
            )
        halves.setdefault(match["module"], {})[match["half"]] = tensor
    r: int = adapter_config["r"]
    alpha: float = adapter_config["lora_alpha"]
    rank_pattern: dict[str, int] = adapter_config.get("rank_pattern") or {}
    alpha_pattern: dict[str, float] = adapter_config.get("alpha_pattern") or {}
    deltas = {}
    for module, pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{source}: {module} has lora_{''.join(pair)} but not both lora_A and lora_B")
        lora_A, lora_B = pair["A"], pair["B"]
        # The ignore below: peft passes keys() too.
        rank = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), r)  # type: ignore[arg-type]
        if lora_A.ndim != 2 or lora_B.ndim != 2 or lora_A.shape[0] != rank or lora_B.shape[1] != rank:
            raise ValueError(
                f"{source}: {module} has lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)}, not the "
                f"(r, in) and (out, r) matrices of a rank-{rank} linear LoRA (convolution LoRA is not supported)"
            )
        # The ignore below: as above.
        module_alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), alpha)  # type: ignore[arg-type]
        scale = module_alpha / (math.sqrt(rank) if adapter_config.get("use_rslora") else rank)
        fan_in_fan_out = bool(adapter_config.get("fan_in_fan_out"))
        deltas[f"{module}.weight"] = LoRADelta(lora_A.float(), lora_B.float(), scale, fan_in_fan_out)
    return deltas


# -- writing ----------------------------------------------------------------------------------------------
def _write_shards(
    directory: str,
    base: BaseTensors,
    deltas: dict[str, LoRADelta],
    dtype: torch.dtype,
    max_shard_size: int | str,
    progress: ProgressFn | None,
) -> int:
    """Fold ``deltas`` into the base's stream, cast floats to ``dtype``, flush each shard once complete.

    Shards are planned up front from the tensor sizes with huggingface_hub (names, sizes, index), so
    a shard is written as soon as its last tensor arrives. Returns the number of shards.
    """

    def out_dtype(spec_dtype: torch.dtype) -> torch.dtype:
        return dtype if spec_dtype.is_floating_point else spec_dtype

    sizes = {name: math.prod(shape) * out_dtype(dt).itemsize for name, (shape, dt) in base.specs.items()}
    plan = plan_shards(sizes, max_shard_size)
    missing = {f: set(names) for f, names in plan.filename_to_tensors.items()}
    pending: dict[str, dict[str, torch.Tensor]] = {f: {} for f in missing}
    total, written = sum(sizes.values()), 0
    scratch = torch.empty(max([_BLOCK_ELEMENTS, *(d.shape[1] for d in deltas.values())]))  # float32, see merged()
    for name, tensor in base.tensors:
        delta, target = deltas.get(name), out_dtype(tensor.dtype)
        filename = plan.tensor_to_filename[name]
        merged = delta.merged(tensor, target, scratch) if delta is not None else tensor.to(target).contiguous()
        pending[filename][name] = merged
        missing[filename].discard(name)
        if not missing[filename]:
            save_file(pending.pop(filename), os.path.join(directory, filename), metadata=WEIGHTS_METADATA)
            _release_freed_memory()
            written += sum(sizes[n] for n in plan.filename_to_tensors[filename])
            if progress is not None:
                progress("merged model", written, total)
    if pending:
        raise RuntimeError(f"The base stream ended before these shards were complete: {sorted(pending)}")
    if plan.is_sharded:
        with open(os.path.join(directory, SAFE_WEIGHTS_INDEX_NAME), "wb") as f:
            f.write(shard_index(plan))
    return len(plan.filename_to_tensors)


def _release_freed_memory() -> None:
    """Hand the memory of a flushed shard back to the OS.

    glibc keeps freed heap chunks of the sizes tensors have (below its adaptive mmap threshold) for
    reuse, fragmented between live tensors: without a trim each shard's memory would stay in the
    process and the peak would grow shard by shard instead of staying at about one shard.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _check_targets(deltas: dict[str, LoRADelta], base: BaseTensors, tied: dict[str, str], source: str) -> None:
    for name, delta in deltas.items():
        if name in tied:
            raise ValueError(
                f"{source} adapts {name}, which this base ties to {tied[name]} (tie_word_embeddings): a merged "
                "model cannot hold both the adapted and the original weight"
            )
        if name not in base.specs:
            raise ValueError(
                f"{source} adapts {name}, which the base's weights do not contain: the adapter was trained on "
                "another architecture, or the base's files name their tensors differently from its modules"
            )
        if base.specs[name][0] != delta.shape:
            raise ValueError(
                f"{source}: {name} has shape {base.specs[name][0]} in the base, the adapter's update has {delta.shape}"
            )


def _save_metadata(
    directory: str,
    name_or_path: str,
    config: PretrainedConfig,
    skeleton: PreTrainedModel,
    dtype: torch.dtype,
    weights_dir: str | None,
    revision: str | None,
) -> None:
    """config.json (the output dtype), the generation config and, when it can be loaded, the tokenizer."""
    generation = None
    if weights_dir and os.path.isfile(os.path.join(weights_dir, "generation_config.json")):
        generation = GenerationConfig.from_pretrained(weights_dir)
    elif skeleton.can_generate():
        generation = skeleton.generation_config
    tokenizer = None
    try:
        tokenizer = load_tokenizer(name_or_path, revision)
    except (OSError, ValueError, TypeError) as err:
        log.warning(
            "No tokenizer written to %s: the tokenizer of %s cannot be loaded (%s)", directory, name_or_path, err
        )
    # transformers makes an empty tokenizer for a directory without tokenizer files: that is no tokenizer.
    if tokenizer is not None and not tokenizer.vocab_size:
        log.warning("No tokenizer written to %s: %s has no tokenizer files", directory, name_or_path)
        tokenizer = None
    write_model_metadata(directory, config, generation, tokenizer, dtype, type(skeleton).__name__)


def _write_full_model(
    directory: str, opened: OpenedCheckpoint, dtype: torch.dtype, max_shard_size: int | str, progress: ProgressFn | None
) -> None:
    """A full-parameter checkpoint's model in ``dtype``: nothing to fold; its own config, generation config and
    tokenizer files, ``config.json`` recording the new dtype."""
    tensors = opened.adapter
    specs = {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}
    _write_shards(directory, BaseTensors(specs, iter(tensors.items()), None), {}, dtype, max_shard_size, progress)
    for name, data in (opened.payload.model_files or {}).items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)
    config = load_config(directory)
    with torch.device("meta"):
        architecture = type(AutoModelForCausalLM.from_config(config)).__name__
    write_model_metadata(directory, config, None, None, dtype, architecture)


def prepare_output(output_dir: str, overwrite: bool) -> None:
    """Check that a local output directory may be written, and create its parent.

    Args:
        output_dir: the absolute path of the output directory.
        overwrite: whether a non-empty directory may be replaced.

    Raises:
        NotADirectoryError: ``output_dir`` exists and is not a directory.
        FileExistsError: it is not empty and ``overwrite`` is False.
    """
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise NotADirectoryError(f"Output {output_dir} exists and is not a directory")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise FileExistsError(
            f"Output directory {output_dir} is not empty; pass overwrite=True (--overwrite) to replace it, "
            "or choose another directory"
        )
    os.makedirs(os.path.dirname(output_dir), exist_ok=True)


def merge_adapter(
    uri: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    dtype: str | torch.dtype = "bfloat16",
    max_shard_size: int | str = "2GB",
    base_model: str | None = None,
    *,
    overwrite: bool = False,
    root: str | None = None,
    storage_options: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
    allow_pickle: bool = False,
) -> str:
    """Write the base model with the checkpoint's LoRA adapter folded in, as a full HF model directory (a
    full-parameter checkpoint: its model in ``dtype``, nothing to fold; ``base_model`` then only checks the base).

    The model is written to a temporary sibling of ``output_dir`` and renamed into place at the end, so a
    failure never leaves a partial model.

    Args:
        uri: a sampler or training checkpoint: fsspec URI, local path or ``lora://run/kind/name``.
        output_dir: a local directory for the model; it must be absent or empty unless ``overwrite``.
        dtype: ``"bfloat16"``, ``"float16"`` or ``"float32"`` (floating tensors are cast once, after folding).
        max_shard_size: the largest safetensors file, e.g. ``"2GB"`` or bytes; several files get an index.
        base_model: the base to fold into instead of the one the manifest names (e.g. a local copy of it);
            its config fingerprint must match the manifest's.
        overwrite: replace a non-empty ``output_dir``.
        root: where ``lora://`` URIs resolve (``$LORA_CKPT_ROOT`` if None).
        storage_options: fsspec options for the checkpoint's filesystem.
        progress: called with (label, bytes written, total bytes) after each shard.
        allow_pickle: let the ``base_model`` you name load from pickled (``.bin``) weights, which can run code when
            unpickled: only for a base you trust. The base a manifest names loads from safetensors only.

    Returns:
        The absolute path of ``output_dir``.

    Raises:
        CheckpointFormatError: the checkpoint is missing, damaged or malformed.
        ValueError: ``dtype`` or ``max_shard_size`` is not supported, ``allow_pickle`` without ``base_model``,
            the base is not the checkpoint's or is quantized, or the adapter cannot be merged (not plain LoRA on
            linear layers, or it does not fit the base's weights).
        FileExistsError: ``output_dir`` is not empty and ``overwrite`` is False.
        NotADirectoryError: ``output_dir`` exists and is not a directory.
        OSError: transformers finds no base model at ``base_model`` or the recorded name.
    """
    dtype = float_dtype(dtype, "dtype")
    if allow_pickle and base_model is None:
        raise ValueError(
            "allow_pickle=True is for a base you name yourself: pass base_model= too (the base a checkpoint names "
            "loads from safetensors weights only)"
        )
    plan_shards({}, max_shard_size)  # a bad size fails now, not after the base is read
    output_dir = os.path.abspath(os.fspath(output_dir))
    prepare_output(output_dir, overwrite)
    opened = open_checkpoint(uri, root, storage_options)
    uri, manifest, adapter_config = opened.uri, opened.manifest, opened.adapter_config
    if manifest.full_parameter:
        if base_model is not None:
            check_named_base(manifest.base_model, base_model, uri)
        _install(output_dir, lambda tmp: _write_full_model(tmp, opened, dtype, max_shard_size, progress))
        return output_dir
    deltas = lora_deltas(opened.adapter, adapter_config, uri)

    name_or_path = base_model or manifest.base_model.name_or_path
    revision = adapter_config.get("revision")
    config = load_config(name_or_path, revision)
    manifest.base_model.check_compatible(BaseModelRef(name_or_path, config_fingerprint(config)), uri)
    if getattr(config, "quantization_config", None):
        raise ValueError(
            f"Base model {name_or_path!r} is a quantized checkpoint; merge_adapter folds adapters into "
            "full-precision weights: pass base_model= a full-precision copy of the same base"
        )
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    base = open_base(name_or_path, skeleton, revision, allow_pickle=allow_pickle and base_model is not None)
    _check_targets(deltas, base, skeleton.all_tied_weights_keys, uri)

    def write(tmp: str) -> None:
        _write_shards(tmp, base, deltas, dtype, max_shard_size, progress)
        _save_metadata(tmp, name_or_path, config, skeleton, dtype, base.weights_dir, revision)

    _install(output_dir, write)
    return output_dir


def _install(output_dir: str, write: Callable[[str], None]) -> None:
    """Run ``write`` on a temporary sibling of ``output_dir``, then rename it into place (nothing partial is left)."""
    parent, name = os.path.split(output_dir)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        write(tmp)
        apply_umask(tmp)
        install_dir(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
