"""Inference from sampler weights: ``SamplingClient`` and ``SamplingParams`` (Tinker's sampling API).

A client holds one base model and one LoRA adapter, or one full model (a full-parameter checkpoint).
``load_adapter`` swaps in another adapter of the same base without touching the base weights, or another
full-parameter checkpoint's weights into the same model (hotload); ``identity`` always says which checkpoint it serves.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Literal, cast

import torch
from peft import LoraConfig, PeftModel, set_peft_model_state_dict
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from ..format.manifest import BaseModelRef, Manifest
from ..storage.loading import OpenedCheckpoint, open_checkpoint
from .base import float_dtype, load_tokenizer
from .full_model import check_named_base, load_full_model
from .peft_adapter import LORA_FIELDS, adapter_state_dict, build_peft_model, check_adapter_tensors, saved_lora_config
from .snapshot_hotload import NO_ADAPTER, Hotloaded, ServedWeights, load_weights_in_place

#: ``quantization`` of :meth:`SamplingClient.from_checkpoint` that rebuilds the base as it was in training.
AS_TRAINED = "as-trained"


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """``temperature=0`` is greedy; ``top_k=0`` and ``top_p=1`` disable those filters; ``stop`` takes
    strings and/or token ids (default: the tokenizer's end-of-sequence token); the same ``seed`` gives
    the same samples.

    Attributes:
        max_tokens: the most tokens generated per sample.
        temperature: the softmax temperature; 0 (or less) picks the most likely token.
        top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p`` (1: all).
        top_k: keep the ``top_k`` most likely tokens (0: all).
        stop: a stop string or token id, or a list of them; None stops at the end-of-sequence token.
        seed: the seed of the sampling generator; None draws a fresh one.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: str | int | list[str | int] | None = None
    seed: int | None = None


@dataclasses.dataclass(frozen=True)
class SampledSequence:
    """One sampled continuation.

    Attributes:
        tokens: the generated token ids (a stop token that ended the sample included).
        logprobs: the model's log-probability of each generated token, before temperature, top-k and top-p.
        text: the decoded tokens without special tokens, cut before the first stop string.
        finish_reason: ``"stop"`` if a stop token or string ended it, ``"length"`` if ``max_tokens`` did.
        prompt_len: the number of prompt tokens.
    """

    tokens: list[int]
    logprobs: list[float]  # the model's log-softmax of each generated token, before temperature/top-k/top-p
    text: str
    finish_reason: Literal["stop", "length"]
    prompt_len: int

    @property
    def completion_len(self) -> int:
        """The number of generated tokens."""
        return len(self.tokens)


@dataclasses.dataclass(frozen=True)
class SampleResponse:
    """The samples of one :meth:`SamplingClient.sample` call.

    Attributes:
        sequences: one per sample, less those whose prompt and tokens exceed the client's ``max_seq_len``
            (none at all if the prompt alone reaches it).
    """

    sequences: list[SampledSequence]


@dataclasses.dataclass(frozen=True)
class AdapterIdentity:
    """Which adapter a client serves: its checkpoint (run, name, URI) and the sha256 of its content.

    Attributes:
        run_id: the checkpoint's run, or None for an in-memory adapter.
        name: the checkpoint's name, or None for an in-memory adapter.
        uri: the checkpoint's URI, or None for an in-memory adapter.
        content_sha256: the manifest's ``content_sha256`` (its checksummed file list), or for an in-memory
            adapter the sha256 of its tensors.
    """

    run_id: str | None
    name: str | None
    uri: str | None
    content_sha256: str


class SamplingClient:
    """Samples from a base model with one LoRA adapter, or from a full model (see :meth:`from_checkpoint`).

    The arguments are kept as attributes of the same names; ``last_hotload`` is the outcome of the last
    full-parameter :meth:`load_adapter` (``in_place``: whether a delta was applied to the weights in memory), or None.

    Args:
        model: the base with its adapter, or a full model (set to eval mode).
        tokenizer: the base's tokenizer.
        base_model: the reference of the loaded base; hotloaded adapters must have been trained on it.
        identity: which adapter ``model`` holds.
        max_seq_len: the longest prompt plus sample, or None for no limit.
    """

    def __init__(
        self,
        model: PeftModel | PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        base_model: BaseModelRef,
        identity: AdapterIdentity,
        max_seq_len: int | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.base_model = base_model
        self.identity = identity
        self.max_seq_len = max_seq_len
        self._adapters = 0
        self._served: ServedWeights | None = None  # a full model loaded from a checkpoint: what it serves
        self.last_hotload: Hotloaded | None = None

    @classmethod
    def from_checkpoint(
        cls,
        uri: str | os.PathLike[str],
        base_model: str | None = None,
        root: str | None = None,
        storage_options: dict[str, Any] | None = None,
        max_seq_len: int | None = None,
        *,
        dtype: str = "float32",
        quantization: str | None = AS_TRAINED,
        allow_pickle: bool = False,
    ) -> SamplingClient:
        """A client for any sampler or training checkpoint.

        A full-parameter checkpoint (``lora_rank`` 0) is a whole model: it is loaded from the checkpoint's own
        files (weights, config, tokenizer) in ``dtype``, with no base and no PEFT; ``base_model``, if given, must
        have the fingerprint of the base it was trained from, and ``quantization`` must be left as trained.

        Args:
            uri: the checkpoint (any fsspec URI, local path or ``lora://``).
            base_model: load this base instead of the recorded one (it must have the same fingerprint).
            root: where ``lora://`` URIs resolve.
            storage_options: fsspec options of the checkpoint's filesystem.
            max_seq_len: prompts this long get no samples; longer samples are dropped.
            dtype: dtype of the base's weights.
            quantization: ``"nf4"``, ``"int8"`` or None (full precision); by default as in training.
            allow_pickle: let the ``base_model`` you name load from pickled (``.bin``) weights, which can run code
                when unpickled: only for a base you trust. The base a checkpoint names loads from safetensors only.

        Returns:
            The client, serving the checkpoint's adapter.

        Raises:
            CheckpointFormatError: the checkpoint is missing, damaged or malformed.
            ValueError: ``allow_pickle`` without ``base_model``, ``base_model`` is not the checkpoint's base, the
                checkpoint's config would change the base (PiSSA/OLoRA/CorDA/LoftQ/LoRA-GA initialisation, KaSA,
                ...), or ``dtype`` or ``quantization`` is not supported.
            ImportError: the base is to be quantized and bitsandbytes is not installed.
        """
        if allow_pickle and base_model is None:
            raise ValueError(
                "allow_pickle=True is for a base you name yourself: pass base_model= too (the base a checkpoint "
                "names loads from safetensors weights only)"
            )
        opened = open_checkpoint(uri, root, storage_options)
        recorded = opened.manifest.base_model
        identity = checkpoint_identity(opened.uri, opened.manifest)
        if opened.manifest.full_parameter:
            return cls._full(opened, base_model, max_seq_len, dtype, quantization, identity)
        model, loaded = build_peft_model(
            recorded,
            opened.adapter_config,
            opened.adapter,
            name_or_path=base_model,
            dtype=dtype,
            quantization=recorded.quantization if quantization == AS_TRAINED else quantization,
            source=opened.uri,
            allow_pickle=allow_pickle,
        )
        tokenizer = load_tokenizer(loaded.name_or_path, opened.adapter_config.get("revision"))
        return cls(model, tokenizer, loaded, identity, max_seq_len)

    @classmethod
    def _full(
        cls,
        opened: OpenedCheckpoint,
        base_model: str | None,
        max_seq_len: int | None,
        dtype: str,
        quantization: str | None,
        identity: AdapterIdentity,
    ) -> SamplingClient:
        """A client for a full-parameter checkpoint: its own model and tokenizer (see :meth:`from_checkpoint`)."""
        recorded = opened.manifest.base_model
        if quantization not in (AS_TRAINED, None):
            raise ValueError(
                f"{opened.uri} is a full-parameter checkpoint: quantization={quantization!r} applies to the base of a "
                "LoRA adapter; leave it unset"
            )
        if base_model is not None:
            check_named_base(recorded, base_model, opened.uri)
        model, tokenizer = load_full_model(
            opened.payload.model_files or {}, opened.adapter, recorded, float_dtype(dtype, "dtype"), opened.uri
        )
        client = cls(model, tokenizer or load_tokenizer(recorded.name_or_path), recorded, identity, max_seq_len)
        client._served = ServedWeights.of(opened)
        return client

    # -- hotload ----------------------------------------------------------------------------------
    def load_adapter(
        self, uri: str | os.PathLike[str], root: str | None = None, storage_options: dict[str, Any] | None = None
    ) -> AdapterIdentity:
        """Serve another adapter of the same base (any LoRA rank or targets) without reloading the base, or, in a
        client of a full-parameter checkpoint, another full-parameter checkpoint's weights in the same model.

        An adapter with the current one's LoRA config (e.g. a later checkpoint of the same run) is copied
        into the current adapter's tensors; any other is added next to it, switched to, and the old one
        deleted. Either way nothing changes unless the whole new adapter fits, and the base weights never
        change: a config that would make PEFT change them (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA initialisation,
        KaSA, layer replication, base biases) is refused, and only the adapter's own tensors are written.

        A full-parameter checkpoint goes into the model's own tensors, which is never rebuilt
        (``modeling.snapshot_hotload``): a delta snapshot of the served checkpoint is applied in place, reading
        only its deltas, and checked against its manifest before a tensor changes; any other (a base, another
        chain's snapshot, a client loaded in another dtype than the files) is read whole, through its chain, and
        copied in. :attr:`last_hotload` says which way it went. The tokenizer stays the one loaded.

        Args:
            uri: the checkpoint (any fsspec URI, local path or ``lora://``).
            root: where ``lora://`` URIs resolve.
            storage_options: fsspec options of the checkpoint's filesystem.

        Returns:
            The new :attr:`identity`.

        Raises:
            CheckpointFormatError: the checkpoint is missing, damaged or malformed.
            ValueError: the checkpoint was trained on another base, its config would change the base, its
                tensors do not fit its config or this client's model, or one of it and this client's model is a
                full-parameter one and the other not (no adapter to swap).
        """
        if self._served is not None and not isinstance(self.model, PeftModel):
            hotloaded = load_weights_in_place(
                self.model, self._served, uri, root, storage_options, base_model=self.base_model
            )
            self._served, self.last_hotload = hotloaded.served, hotloaded
            self.identity = checkpoint_identity(hotloaded.uri, hotloaded.manifest)
            return self.identity
        opened = open_checkpoint(uri, root, storage_options, base_model=self.base_model)
        if opened.manifest.full_parameter or not isinstance(self.model, PeftModel):
            raise ValueError(NO_ADAPTER.format(uri=opened.uri))
        lora_config = saved_lora_config(opened.adapter_config, opened.uri)  # refused here: nothing changed yet
        if not self._copy_into_active(self.model, lora_config, opened.adapter):
            self._add_and_switch(self.model, lora_config, opened.adapter, opened.uri)
        self.identity = checkpoint_identity(opened.uri, opened.manifest)
        return self.identity

    @torch.no_grad()
    def _copy_into_active(self, model: PeftModel, config: LoraConfig, state: dict[str, torch.Tensor]) -> bool:
        """Copy ``state`` into the active adapter's tensors if it has the same config, keys and shapes."""
        active = model.active_adapter
        current = model.peft_config[active]
        if any(
            getattr(current, f) != getattr(config, f) for f in LORA_FIELDS - {"inference_mode", "init_lora_weights"}
        ):
            return False
        tensors = adapter_state_dict(model, active)  # views of its parameters
        if tensors.keys() != state.keys() or any(tensors[k].shape != state[k].shape for k in state):
            return False
        for key, tensor in state.items():
            tensors[key].copy_(tensor)
        return True

    def _add_and_switch(self, model: PeftModel, config: LoraConfig, state: dict[str, torch.Tensor], uri: str) -> None:
        old, self._adapters = model.active_adapter, self._adapters + 1
        name = f"adapter{self._adapters}"
        try:
            model.add_adapter(name, config)
            # Exactly the new adapter's own keys and shapes: PEFT's loader would also load any other key of the
            # file (a base weight) into the model.
            expected = {k: tuple(v.shape) for k, v in adapter_state_dict(model, name).items()}
            check_adapter_tensors(expected, state, uri)
            result: Any = set_peft_model_state_dict(model, state, adapter_name=name)  # peft: `-> namedtuple`
            if any(name in key for key in result.missing_keys):
                raise ValueError(f"Adapter {uri} does not fit its own config: missing {result.missing_keys[:3]}")
        except BaseException:
            if name in model.peft_config:  # whatever part of it was added goes; the old one stays active
                model.delete_adapter(name)
            raise
        model.set_adapter(name)
        model.delete_adapter(old)
        model.eval()

    # -- scoring and sampling ---------------------------------------------------------------------
    @torch.no_grad()
    def compute_logprobs(self, tokens: list[int]) -> list[float | None]:
        """Log-probability of each token given the ones before it (None for the first).

        Args:
            tokens: token ids.

        Returns:
            One value per token.
        """
        ids = torch.tensor([tokens], device=self._device)
        logprobs = torch.log_softmax(self.model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        return [None, *logprobs.gather(-1, ids[0, 1:, None])[:, 0].tolist()]

    @torch.no_grad()
    def sample(
        self, prompt: str | list[int], sampling_params: SamplingParams | None = None, num_samples: int = 1
    ) -> SampleResponse:
        """``num_samples`` continuations of ``prompt`` (text or token ids), generated as one batch with a KV cache.

        Args:
            prompt: text (tokenized without special tokens) or token ids.
            sampling_params: the sampling settings, or None for the defaults.
            num_samples: how many continuations.

        Returns:
            The samples; empty if the prompt alone reaches ``max_seq_len``.

        Raises:
            ValueError: ``prompt`` is empty or ``num_samples`` is below 1.
        """
        params = sampling_params or SamplingParams()
        prompt_ids = (
            self.tokenizer(prompt, add_special_tokens=False)["input_ids"] if isinstance(prompt, str) else list(prompt)
        )
        if not prompt_ids or num_samples < 1:
            raise ValueError("sample() needs a non-empty prompt and num_samples >= 1")
        if self.max_seq_len is not None and len(prompt_ids) >= self.max_seq_len:
            return SampleResponse([])  # like Fireworks' DeploymentSampler: no model call for an over-long prompt
        stop_ids, stop_texts = self._stops(params.stop)
        generator = torch.Generator(self._device)
        generator.manual_seed(params.seed) if params.seed is not None else generator.seed()
        ids = torch.tensor([prompt_ids] * num_samples, device=self._device)
        out = self.model(input_ids=ids, use_cache=True)
        tokens: list[list[int]] = [[] for _ in range(num_samples)]
        logprobs: list[list[float]] = [[] for _ in range(num_samples)]
        finish: list[str | None] = [None] * num_samples
        for _ in range(params.max_tokens):
            logits = out.logits[:, -1].float()
            next_ids = _choose(logits, params, generator)
            chosen = torch.log_softmax(logits, dim=-1).gather(-1, next_ids[:, None])[:, 0]
            for i in range(num_samples):
                if finish[i] is None:
                    tokens[i].append(int(next_ids[i]))
                    logprobs[i].append(float(chosen[i]))
                    if tokens[i][-1] in stop_ids or any(s in self.tokenizer.decode(tokens[i]) for s in stop_texts):
                        finish[i] = "stop"
            if all(finish):
                break
            out = self.model(input_ids=next_ids[:, None], past_key_values=out.past_key_values, use_cache=True)
        sequences = []
        for toks, lps, reason in zip(tokens, logprobs, finish, strict=True):
            if self.max_seq_len is not None and len(prompt_ids) + len(toks) > self.max_seq_len:
                continue
            text = cast(str, self.tokenizer.decode(toks, skip_special_tokens=True))  # one sequence: one str
            for s in stop_texts:
                text = text.split(s, 1)[0]
            sequences.append(SampledSequence(toks, lps, text, "stop" if reason else "length", len(prompt_ids)))
        return SampleResponse(sequences)

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _stops(self, stop: str | int | list[str | int] | None) -> tuple[set[int], list[str]]:
        if stop is None:
            return {self.tokenizer.eos_token_id} - {None}, []
        items = stop if isinstance(stop, list) else [stop]
        return {s for s in items if isinstance(s, int)}, [s for s in items if isinstance(s, str)]


def _choose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """Next token per row: argmax at temperature 0, else a draw after temperature, top-k and top-p."""
    if params.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= params.top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


def checkpoint_identity(uri: str, manifest: Manifest) -> AdapterIdentity:
    """Identity of a committed checkpoint: where it is and the digest of its immutable content.

    Args:
        uri: the checkpoint's URI.
        manifest: its manifest.

    Returns:
        The identity.
    """
    return AdapterIdentity(manifest.run_id, manifest.name, uri, manifest.content_sha256)


def snapshot_identity(adapter: dict[str, torch.Tensor]) -> AdapterIdentity:
    """Identity of an in-memory adapter (no checkpoint): the sha256 of its tensors in key order.

    Args:
        adapter: the adapter tensors, by PEFT key.

    Returns:
        The identity, without run, name or URI.
    """
    digest = hashlib.sha256()
    for key in sorted(adapter):
        digest.update(key.encode())
        digest.update(adapter[key].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return AdapterIdentity(None, None, None, digest.hexdigest())
