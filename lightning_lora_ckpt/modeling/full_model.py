"""Whole models as Hugging Face model directories: what ``save_pretrained`` would write of a model (its weights,
config, generation config, tokenizer), and a model and tokenizer rebuilt from those files.

Used by full-parameter checkpoints (``LoRAModule(rank=0)``: saving, ``SamplingClient``) and by ``merge_adapter``,
so a merged model and a full-parameter checkpoint are the same kind of directory. Nothing here knows Lightning.
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
from collections.abc import Iterator

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.core_model_loading import revert_weight_conversion
from transformers.modeling_utils import remove_tied_weights_from_state_dict
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from ..format.manifest import BaseModelRef
from ..format.model_layout import GENERATION_CONFIG, TOKENIZER_FILES
from ..format.strict_json import CheckpointFormatError
from .base import config_fingerprint, load_config


def saved_state_dict(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The tensors ``save_pretrained`` writes for ``model``, under its names (tied copies and ignored keys dropped,
    transformers' load-time weight conversions reverted).

    Args:
        model: the model (its tensors may be on the meta device: only names and shapes are then meaningful).

    Returns:
        The tensors, by saved name.
    """
    state = {k: v for k, v in model.state_dict().items() if k not in (model._keys_to_ignore_on_save or ())}
    return revert_weight_conversion(model, remove_tied_weights_from_state_dict(state, model))


def saved_weight_names(model: PreTrainedModel) -> list[str]:
    """The names of the tensors ``save_pretrained`` writes for ``model``, each one of its state dict's keys.

    Args:
        model: the model.

    Returns:
        The names, in state-dict order.

    Raises:
        ValueError: transformers renames or fuses the model's weights when saving (a conversion mapping), which
            full-parameter checkpoints do not support, with the fix.
    """
    saved = list(saved_state_dict(model))
    renamed = sorted(set(saved) - set(model.state_dict()))
    if renamed:
        raise ValueError(
            f"{type(model).__name__} saves weights under other names than its parameters ({renamed[:3]}: transformers "
            "converts them when saving); full-parameter checkpoints (rank=0) need a model saved as it is: train a "
            "LoRA adapter (rank>0) instead"
        )
    return saved


def write_model_metadata(
    directory: str,
    config: PretrainedConfig,
    generation: GenerationConfig | None,
    tokenizer: PreTrainedTokenizerBase | None,
    dtype: torch.dtype,
    architecture: str,
) -> None:
    """Write ``config.json`` (recording ``dtype`` and ``architecture``), the generation config and the tokenizer, as
    ``save_pretrained`` does.

    Args:
        directory: an existing local directory.
        config: the model's config (not modified).
        generation: its generation config, or None for none.
        tokenizer: its tokenizer, or None for none.
        dtype: the dtype the weights are stored in.
        architecture: the model class's name (``config.architectures``).
    """
    config = copy.deepcopy(config)
    config.dtype = str(dtype).removeprefix("torch.")
    config.architectures = [architecture]
    config.save_pretrained(directory)
    if generation is not None:
        generation.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def model_metadata_files(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, dtype: torch.dtype
) -> dict[str, bytes]:
    """The bytes of the files :func:`write_model_metadata` writes for ``model`` (weights not included).

    Args:
        model: the model; its generation config is written if it can generate.
        tokenizer: its tokenizer, or None.
        dtype: the dtype the weights are stored in, recorded in ``config.json``.

    Returns:
        The files, by name.
    """
    generation = model.generation_config if model.can_generate() else None
    with tempfile.TemporaryDirectory(prefix="lora-ckpt-model-") as tmp:
        write_model_metadata(tmp, model.config, generation, tokenizer, dtype, type(model).__name__)
        files = {}
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as f:
                files[name] = f.read()
    return files


@contextlib.contextmanager
def _files_in_dir(files: dict[str, bytes]) -> Iterator[str]:
    """A temporary local directory holding ``files`` (names already validated by the manifest)."""
    with tempfile.TemporaryDirectory(prefix="lora-ckpt-model-") as tmp:
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        yield tmp


def check_named_base(recorded: BaseModelRef, name_or_path: str, source: str) -> None:
    """Refuse a base a caller names for a full-parameter checkpoint unless it is the base the checkpoint was trained
    from (only its config is read: the checkpoint holds every weight).

    Args:
        recorded: the base the manifest records.
        name_or_path: the base the caller names (built-in name, HF id or local directory).
        source: the checkpoint's URI, for the message.

    Raises:
        ValueError: the fingerprints differ, naming both bases.
        OSError: transformers finds no config for ``name_or_path``.
    """
    recorded.check_compatible(BaseModelRef(name_or_path, config_fingerprint(load_config(name_or_path))), source)


def load_full_model(
    model_files: dict[str, bytes],
    weights: dict[str, torch.Tensor],
    base_model: BaseModelRef,
    dtype: torch.dtype,
    source: str,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """The model (eval mode, nothing trainable) and tokenizer of a full-parameter checkpoint's verified contents.

    No code the checkpoint ships runs (configs and tokenizers load with ``trust_remote_code=False``); the config
    must be the architecture of the base the manifest records, and the weights exactly the tensors that
    architecture saves, with their shapes.

    Args:
        model_files: ``config.json``, ``generation_config.json`` and the tokenizer files, by name.
        weights: every weight, by saved name.
        base_model: the base the manifest records.
        dtype: the dtype to load the weights in.
        source: the checkpoint's URI, for error messages.

    Returns:
        The model on the CPU, and the checkpoint's tokenizer (None if it holds no tokenizer files).

    Raises:
        CheckpointFormatError: the config is not the recorded base's architecture, needs code of its own, or the
            weights are not the tensors it saves.
    """
    with _files_in_dir(model_files) as tmp:
        config = load_config(tmp)
        if config_fingerprint(config) != base_model.fingerprint:
            raise CheckpointFormatError(
                f"Checkpoint {source}: its config.json is not the architecture of base model "
                f"{base_model.name_or_path!r} its manifest records (fingerprint {base_model.fingerprint[:12]}); "
                "the checkpoint is damaged or was assembled from another model"
            )
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        expected = {k: tuple(v.shape) for k, v in saved_state_dict(skeleton).items()}
        missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
        misshapen = sorted(k for k in set(expected) & set(weights) if tuple(weights[k].shape) != expected[k])
        if missing or unexpected or misshapen:
            raise CheckpointFormatError(
                f"Checkpoint {source}: its weights do not fit its config.json: missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}, other shapes {misshapen[:3]}"
            )
        model = type(skeleton).from_pretrained(None, config=config, state_dict=weights, dtype=dtype)
        if GENERATION_CONFIG in model_files:
            model.generation_config = GenerationConfig.from_pretrained(tmp)
        has_tokenizer = any(name in TOKENIZER_FILES for name in model_files)
        tokenizer = AutoTokenizer.from_pretrained(tmp, trust_remote_code=False) if has_tokenizer else None
    model.requires_grad_(False)
    return model.eval(), tokenizer
