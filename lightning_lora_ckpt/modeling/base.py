"""Base models and tokenizers: HF ids, local HF directories, and built-in offline configs.

Built-in names build a randomly initialised model from a config with a fixed seed, so the same name
always gives the same base weights without any download; they share the tokenizer shipped in
``assets/tokenizer``. Any base can be loaded quantized with bitsandbytes (``nf4`` or ``int8``, QLoRA).

A base's name often comes from a checkpoint's manifest, which anyone may have written, so loading one never
runs code it ships: configs, models and tokenizers load with ``trust_remote_code=False``, and weights only
from safetensors files (a pickled ``.bin`` is refused, never unpickled), unless the caller opts in.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from ..format.strict_json import CheckpointFormatError

log = logging.getLogger(__name__)

TOKENIZER_DIR = Path(__file__).parent.parent / "assets" / "tokenizer"
BUILTIN_INIT_SEED = 0
#: ``quantization`` values of :func:`load_base_model` (and ``LoRAModule``).
QUANTIZATIONS = ("nf4", "int8")

_TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
    # HF's default 0.02 makes the frozen, tied random head so flat that no adapter can sharpen its
    # predictions; 0.3 gives LoRA room to learn (the demo's loss falls from ~9 to ~2).
    "initializer_range": 0.3,
}
#: Built-in base models: name -> (model_type, config overrides).
BUILTIN_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-qwen3": ("qwen3", {"vocab_size": 1024, **_TINY}),
    "tiny-llama": ("llama", {"vocab_size": 1024, **_TINY}),
    # tiny-qwen3 with 32-wide attention heads, the narrowest vLLM's CPU attention serves (docs/serving.md).
    "tiny-qwen3-hd32": ("qwen3", {"vocab_size": 1024, **_TINY, "head_dim": 32}),
    # The real Qwen3-0.6B architecture, randomly initialised: for benchmarks without a download.
    "qwen3-0.6b-shape": (
        "qwen3",
        {
            "vocab_size": 151936,
            "hidden_size": 1024,
            "intermediate_size": 3072,
            "num_hidden_layers": 28,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "max_position_embeddings": 40960,
            "rope_theta": 1000000.0,
            "tie_word_embeddings": True,
        },
    ),
}
# Keys that describe how a model is run or stored, not which weights it has.
_RUNTIME_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "architectures",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "quantization_config",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "_attn_implementation_autoset",
    }
)


def is_builtin(name_or_path: str) -> bool:
    """Whether ``name_or_path`` is a built-in base (a key of :data:`BUILTIN_MODELS`).

    Args:
        name_or_path: a base model's name or path.

    Returns:
        True for a built-in name.
    """
    return name_or_path in BUILTIN_MODELS


def load_config(name_or_path: str, revision: str | None = None, *, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model config of a built-in name, HF id or local directory.

    Args:
        name_or_path: a built-in name, HF id or local HF model directory.
        revision: the Hub revision (ignored for built-in names).
        trust_remote_code: run the Python code a base ships for its config (``auto_map``); only for a base
            you trust, never for one a checkpoint names.

    Returns:
        The config; a built-in one has ``_name_or_path`` set to the name.

    Raises:
        OSError: transformers finds no config for ``name_or_path``.
        CheckpointFormatError: the base needs its own code and ``trust_remote_code`` is False.
    """
    if is_builtin(name_or_path):
        model_type, overrides = BUILTIN_MODELS[name_or_path]
        config = AutoConfig.for_model(model_type, **overrides)
        config._name_or_path = name_or_path
        return config
    return _without_remote_code(
        name_or_path,
        trust_remote_code,
        lambda: AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code),
    )


def load_base_model(
    name_or_path: str,
    dtype: torch.dtype | str = torch.float32,
    revision: str | None = None,
    quantization: str | None = None,
    *,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> PreTrainedModel:
    """Load (or, for a built-in name, deterministically build) the frozen base causal LM.

    ``quantization`` (``"nf4"`` or ``"int8"``) quantizes every linear layer but the output head with
    bitsandbytes, on the CPU; ``dtype`` is then the dtype of the other weights and of the 4-bit matmuls.
    A built-in name quantizes the same weights it gives unquantized, so the quantized base is a
    deterministic function of (name, dtype, quantization).

    Args:
        name_or_path: a built-in name, HF id or local HF model directory.
        dtype: ``float32``, ``bfloat16`` or ``float16``, as a torch dtype or its name.
        revision: the Hub revision (ignored for built-in names).
        quantization: ``"nf4"``, ``"int8"`` or None (full precision).
        trust_remote_code: run the Python code a base ships (``auto_map``); only for a base you trust, never
            for one a checkpoint names.
        allow_pickle: also load pickled (``.bin``) weights, which can run code when unpickled; only for a
            base you trust. By default only safetensors weights load.

    Returns:
        The causal LM, on the CPU.

    Raises:
        ValueError: ``dtype`` or ``quantization`` is not supported.
        ImportError: ``quantization`` is set and bitsandbytes is not installed.
        OSError: transformers finds no model at ``name_or_path``.
        CheckpointFormatError: (a ``ValueError``) the base needs its own code and ``trust_remote_code`` is
            False, or a local base holds no safetensors weights and ``allow_pickle`` is False.
    """
    dtype = float_dtype(dtype, "dtype")
    bnb_config = quantization_config(quantization, dtype)
    if not is_builtin(name_or_path):
        if not allow_pickle:
            _require_safetensors(name_or_path)
        # device_map="cpu": quantize where every base is built; Lightning moves the module to its device.
        quantized = {"quantization_config": bnb_config, "device_map": "cpu"} if bnb_config else {}
        model = _without_remote_code(
            name_or_path,
            trust_remote_code,
            lambda: AutoModelForCausalLM.from_pretrained(
                name_or_path,
                dtype=dtype,
                revision=revision,
                trust_remote_code=trust_remote_code,
                use_safetensors=None if allow_pickle else True,
                **quantized,
            ),
        )
        return _without_cpu_repacking(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(BUILTIN_INIT_SEED)
        model = AutoModelForCausalLM.from_config(load_config(name_or_path), dtype=dtype)
    if bnb_config is not None:
        # transformers' own bitsandbytes loading path, fed the built weights instead of a checkpoint's.
        model = (
            type(model)
            .from_pretrained(
                None,
                config=model.config,
                state_dict=model.state_dict(),
                dtype=dtype,
                quantization_config=bnb_config,
                device_map="cpu",
            )
            .train()
        )  # from_pretrained returns eval mode; from_config, like the unquantized build, train mode
    model.config._name_or_path = name_or_path
    return _without_cpu_repacking(model)


#: The floating dtypes a base, a merged model or sampler weights may be stored in, by name.
FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def float_dtype(dtype: str | torch.dtype, argument: str) -> torch.dtype:
    """``dtype`` (a name or a torch dtype) as one of :data:`FLOAT_DTYPES`; ``ValueError`` naming ``argument``
    otherwise.

    Args:
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or the torch dtype.
        argument: the argument's name, for the message.

    Returns:
        The torch dtype.

    Raises:
        ValueError: ``dtype`` is another dtype or name.
    """
    resolved = FLOAT_DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if resolved not in FLOAT_DTYPES.values():
        raise ValueError(f"{argument}={dtype!r} is not supported; use one of {sorted(FLOAT_DTYPES)}")
    return cast("torch.dtype", resolved)  # not None: None is not in FLOAT_DTYPES.values()


def quantization_config(quantization: str | None, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """The ``BitsAndBytesConfig`` of a ``quantization`` name: QLoRA's nf4 with double quantization, or LLM.int8().

    Args:
        quantization: ``"nf4"``, ``"int8"`` or None.
        dtype: the compute dtype of the 4-bit matmuls (nf4 only).

    Returns:
        The config, or None for None.

    Raises:
        ValueError: ``quantization`` is another name.
        ImportError: bitsandbytes is not installed.
    """
    if quantization is None:
        return None
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r} is not supported; use one of {QUANTIZATIONS} or None")
    require_bitsandbytes(f"quantization={quantization!r}")
    if quantization == "int8":
        cast_logger = logging.getLogger("bitsandbytes.autograd._functions")
        if not any(isinstance(f, _FirstOnly) for f in cast_logger.filters):
            cast_logger.addFilter(_FirstOnly("MatMul8bitLt: inputs will be cast"))
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )


def require_bitsandbytes(feature: str) -> Any:
    """Import bitsandbytes, or explain how to install it for ``feature``.

    Args:
        feature: what needs bitsandbytes, for the message.

    Returns:
        The ``bitsandbytes`` module.

    Raises:
        ImportError: bitsandbytes is not installed.
    """
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError(
            f"{feature} needs bitsandbytes: pip install 'lightning-lora-ckpt[qlora]' (or bitsandbytes>=0.45)"
        ) from err
    return bitsandbytes


class _FirstOnly(logging.Filter):
    """Passes the first record whose message starts with ``prefix`` and drops the rest.

    LLM.int8() logs that it casts inputs to float16 at every matmul of every layer, every step.
    """

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        first, self.seen = not self.seen, True
        return first


def _without_cpu_repacking(model: PreTrainedModel) -> PreTrainedModel:
    # On CPUs with AVX512-BF16, bitsandbytes' Linear4bit repacks its weight in place at the first eval
    # forward without grad, after which train-mode outputs change and gradients through the layer are
    # silently wrong: one validation or sampling pass would corrupt training. Keep the one layout.
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            # The ignore below: torch types Module.__setattr__ for tensors/modules only.
            module.support_avx512bf16_for_cpu = False  # type: ignore[assignment]
    return model


@functools.lru_cache(maxsize=8)
def load_tokenizer(
    name_or_path: str, revision: str | None = None, *, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """The tokenizer of a base model; built-in names use the tokenizer shipped with this package.

    Results are cached per (name_or_path, revision, trust_remote_code).

    Args:
        name_or_path: a built-in name, HF id or local HF model directory.
        revision: the Hub revision (ignored for built-in names).
        trust_remote_code: run the Python code a base ships for its tokenizer; only for a base you trust.

    Returns:
        The tokenizer.

    Raises:
        OSError: transformers finds no tokenizer at ``name_or_path``.
        CheckpointFormatError: the tokenizer needs its own code and ``trust_remote_code`` is False.
    """
    source = str(TOKENIZER_DIR) if is_builtin(name_or_path) else name_or_path
    return _without_remote_code(
        name_or_path,
        trust_remote_code,
        lambda: AutoTokenizer.from_pretrained(
            source, revision=None if is_builtin(name_or_path) else revision, trust_remote_code=trust_remote_code
        ),
    )


def export_builtin(name: str, output_dir: str | os.PathLike[str]) -> str:
    """Write a built-in base as a model directory (safetensors weights, config, tokenizer) that vLLM, transformers
    and this package load; checkpoints trained on the built-in name load onto it (same fingerprint).

    Args:
        name: a built-in name (:data:`BUILTIN_MODELS`).
        output_dir: a directory that is absent or empty.

    Returns:
        The absolute path of the directory.

    Raises:
        ValueError: ``name`` is not a built-in base.
        FileExistsError: ``output_dir`` is not empty.
    """
    if not is_builtin(name):
        raise ValueError(f"{name!r} is not a built-in base; choose one of {', '.join(BUILTIN_MODELS)}")
    target = Path(output_dir).absolute()
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not empty; choose an empty or new output directory")
    load_base_model(name).save_pretrained(target)
    load_tokenizer(name).save_pretrained(target)
    return str(target)


#: The weight files of a local base that load without unpickling (what ``save_pretrained`` writes).
_SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
#: The most bytes of a local base's ``config.json`` read to check where it points for its weights.
_MAX_CONFIG_BYTES = 16 << 20


def _require_safetensors(name_or_path: str) -> None:
    """Refuse a local base directory whose weights would load only by unpickling (``.bin``) files.

    Hub ids are loaded with ``use_safetensors=True``, which downloads and reads safetensors files only.
    """
    if not os.path.isdir(name_or_path):
        return
    fix = (
        "pickled weights can run code when loaded, and a base's name may come from a checkpoint anyone wrote. "
        "If you trust this base, convert it once (AutoModelForCausalLM.from_pretrained(path).save_pretrained(path) "
        "writes model.safetensors) or load it yourself with allow_pickle=True"
    )
    if not any(os.path.isfile(os.path.join(name_or_path, name)) for name in _SAFE_WEIGHTS):
        raise CheckpointFormatError(
            f"Base model {name_or_path!r} has no safetensors weights ({' or '.join(_SAFE_WEIGHTS)}); refusing to "
            f"load it: {fix}"
        )
    config_path = os.path.join(name_or_path, "config.json")
    named = None
    if os.path.isfile(config_path):
        with open(config_path, "rb") as f, contextlib.suppress(ValueError):
            config = json.loads(f.read(_MAX_CONFIG_BYTES))
            named = config.get("transformers_weights") if isinstance(config, dict) else None
    if named is not None and not (
        isinstance(named, str) and named.endswith((".safetensors", ".safetensors.index.json"))
    ):
        raise CheckpointFormatError(
            f"Base model {name_or_path!r}: its config.json names transformers_weights={str(named)[:100]!r}, not a "
            f"safetensors file; refusing to load it: {fix}"
        )


def _without_remote_code(name_or_path: str, trust_remote_code: bool, load: Callable[[], Any]) -> Any:
    """Run ``load``; transformers' refusal to run a base's own code becomes a one-line error with the fix."""
    try:
        return load()
    except ValueError as err:
        if trust_remote_code or "trust_remote_code" not in str(err):
            raise
        raise CheckpointFormatError(
            f"Base model {name_or_path!r} needs Python code of its own to load (auto_map in its config); this package "
            "never runs code a base directory or a checkpoint ships. Use a base whose model type transformers knows, "
            "or, only if you trust it, load it yourself with trust_remote_code=True"
        ) from None


def config_fingerprint(config: PretrainedConfig) -> str:
    """sha256 of the architecture-defining part of a model config (identical for the same base anywhere).

    Run-time keys (dtype, quantization, cache and output flags, the name or path) are left out.

    Args:
        config: the model config.

    Returns:
        64 lowercase hex digits.
    """
    data = {k: v for k, v in config.to_dict().items() if k not in _RUNTIME_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def base_fingerprint_of_dir(path: str | os.PathLike[str]) -> str | None:
    """The :func:`config_fingerprint` of the model directory ``path``, or None where it has none to check against.

    What checks a checkpoint against a base served from a directory (``hotload``, the vLLM resolver plugin) use.

    Args:
        path: a local Hugging Face model directory (anything else gives None).

    Returns:
        The fingerprint; None if ``path`` holds no ``config.json``, or one that does not load (without running
        code it ships; the reason is logged as a warning).
    """
    if not os.path.isfile(os.path.join(path, "config.json")):
        return None
    try:
        return config_fingerprint(load_config(os.fspath(path)))
    except (OSError, ValueError) as err:
        log.warning("cannot read the config of the base model %s (%s: %s)", path, type(err).__name__, err)
        return None
