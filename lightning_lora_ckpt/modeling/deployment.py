"""``DeploymentSampler``: sampling through a vLLM deployment with the API of ``SamplingClient`` (Fireworks'
``DeploymentSampler``: evaluate through the serving path).

Prompts are token ids or text; each sample comes back with its token ids, the model's log-probability of each
(vLLM's raw logprobs, before temperature and top-k/top-p, as ``SamplingClient`` reports them), its text and
finish reason. Before the first sample the sampler checks that the server lists the model, and, for a model
that names its content digest (a :class:`~.hotload.ServedAdapter`, or ``expect_sha256``), that it is that content.
"""

from __future__ import annotations

from typing import Any, Literal, cast

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from .hotload import ServedAdapter, digest_of_served_name
from .sampling import SampledSequence, SampleResponse, SamplingParams
from .vllm_client import DEFAULT_TIMEOUT_S, VLLMClient


class ServedIdentityError(RuntimeError):
    """The deployment does not serve the model, or the content, the caller expects."""


class DeploymentSampler:
    """Samples from a model a vLLM server serves (a base or a hotloaded adapter).

    Args:
        base_url: the server, e.g. ``http://127.0.0.1:8000``.
        model: the served model name, or the :class:`~.hotload.ServedAdapter` ``hotload`` returned.
        tokenizer: tokenizes text prompts here (so ``max_seq_len`` filters them before any request); None sends
            text to the server as is.
        max_seq_len: prompts this long get no samples and no request; longer samples are dropped.
        expect_sha256: the content digest the model must carry (taken from ``model`` if it is a
            ``ServedAdapter``).
        api_key: the server's ``--api-key``, if any.
        timeout_s: the most seconds each request may take.

    Raises:
        ValueError: ``max_seq_len`` is below 1.
    """

    def __init__(
        self,
        base_url: str,
        model: str | ServedAdapter,
        tokenizer: PreTrainedTokenizerBase | None = None,
        max_seq_len: int | None = None,
        *,
        expect_sha256: str | None = None,
        api_key: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        if max_seq_len is not None and max_seq_len < 1:
            raise ValueError(f"max_seq_len must be at least 1, got {max_seq_len}")
        served = model if isinstance(model, ServedAdapter) else None
        self.model = served.vllm_name if served else cast(str, model)
        self.served = served
        self.expect_sha256 = served.content_sha256 if served else expect_sha256
        self.tokenizer, self.max_seq_len = tokenizer, max_seq_len
        self.client = VLLMClient(base_url, api_key=api_key, timeout_s=timeout_s)
        self._checked = False

    def check_identity(self) -> dict[str, Any]:
        """Check that the server serves :attr:`model`, with the expected content if one is expected.

        Returns:
            The model's card from ``/v1/models``.

        Raises:
            ServedIdentityError: the model is not listed, its name carries another digest than the expected one,
                or it is loaded from another directory than the ``ServedAdapter`` says.
            VLLMServerError: the server is unreachable or refused.
        """
        cards = {card["id"]: card for card in self.client.models()}
        card = cards.get(self.model)
        if card is None:
            raise ServedIdentityError(
                f"vLLM at {self.client.base_url} does not serve {self.model!r} (it lists {sorted(cards)}); hotload it "
                "first"
            )
        if self.expect_sha256 is not None:
            digest = digest_of_served_name(self.model)
            if digest is None or not self.expect_sha256.startswith(digest):
                raise ServedIdentityError(
                    f"{self.model!r} does not carry the expected content digest {self.expect_sha256[:12]}; sample the "
                    "name hotload returned"
                )
        if self.served is not None and card.get("root") != self.served.lora_path:
            raise ServedIdentityError(
                f"vLLM at {self.client.base_url} serves {self.model!r} from {card.get('root')!r}, not from "
                f"{self.served.lora_path!r}"
            )
        self._checked = True
        return card

    def sample(
        self, prompt: str | list[int], sampling_params: SamplingParams | None = None, num_samples: int = 1
    ) -> SampleResponse:
        """``num_samples`` continuations of ``prompt``, from one ``/v1/completions`` request.

        Args:
            prompt: text (tokenized without special tokens) or token ids.
            sampling_params: the sampling settings, or None for the defaults.
            num_samples: how many continuations.

        Returns:
            The samples; empty, with no request made, if the prompt alone reaches ``max_seq_len``.

        Raises:
            ValueError: ``prompt`` is empty, ``num_samples`` is below 1, or a text prompt is to be filtered by
                ``max_seq_len`` without a tokenizer.
            ServedIdentityError: see :meth:`check_identity` (checked before the first sample).
            VLLMServerError: the server is unreachable or refused.
        """
        params = sampling_params or SamplingParams()
        if isinstance(prompt, str) and self.tokenizer is not None:
            prompt = list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if not prompt or num_samples < 1:
            raise ValueError("sample() needs a non-empty prompt and num_samples >= 1")
        if self.max_seq_len is not None:
            if isinstance(prompt, str):
                raise ValueError("max_seq_len filters text prompts by their tokens: pass tokenizer= or token ids")
            if len(prompt) >= self.max_seq_len:
                return SampleResponse([])
        if not self._checked:
            self.check_identity()
        greedy = params.temperature <= 0  # vLLM refuses n > 1 at temperature 0: one request, the same sample n times
        response = self.client.completions(self._request(prompt, params, 1 if greedy else num_samples))
        choices = sorted(response["choices"], key=lambda c: c["index"])
        sequences = []
        for choice in choices * num_samples if greedy else choices:
            tokens = list(choice["token_ids"])
            prompt_len = len(choice.get("prompt_token_ids") or prompt)
            if self.max_seq_len is not None and prompt_len + len(tokens) > self.max_seq_len:
                continue
            logprobs = [float(lp) for lp in (choice["logprobs"] or {}).get("token_logprobs") or []]
            reason: Literal["stop", "length"] = "length" if choice["finish_reason"] == "length" else "stop"
            sequences.append(SampledSequence(tokens, logprobs, choice["text"], reason, prompt_len))
        return SampleResponse(sequences)

    def close(self) -> None:
        """Close the connections to the server."""
        self.client.close()

    def _request(self, prompt: str | list[int], params: SamplingParams, num_samples: int) -> dict[str, Any]:
        request: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt,
            "n": num_samples,
            "max_tokens": params.max_tokens,
            "temperature": max(params.temperature, 0.0),
            "top_p": params.top_p,
            "top_k": params.top_k,
            "seed": params.seed,
            "logprobs": 0,  # the sampled token's own logprob only
            "return_token_ids": True,
        }
        if params.stop is not None:  # as SamplingClient: explicit stops replace the end-of-sequence token
            items = params.stop if isinstance(params.stop, list) else [params.stop]
            request["stop"] = [s for s in items if isinstance(s, str)]
            request["stop_token_ids"] = [s for s in items if isinstance(s, int)]
            request["ignore_eos"] = True
        return request
