"""A small client of a vLLM OpenAI-compatible server: its models, run-time LoRA loading, completions.

Every request has a timeout; connection failures and 5xx answers are retried a bounded number of times with a
growing pause. A server that is down, or refuses a request, is a :class:`VLLMServerError` naming the server,
the route and vLLM's own message.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

#: Seconds each request may take (a first completion on a cold CPU server compiles kernels: tens of seconds).
DEFAULT_TIMEOUT_S = 120.0
#: How many times a request is sent before a connection failure or 5xx answer is given up on.
DEFAULT_ATTEMPTS = 3


class VLLMServerError(RuntimeError):
    """A vLLM server is unreachable or refused a request.

    Attributes:
        status: the HTTP status of the refusal, or None if the server could not be reached.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class VLLMClient:
    """Requests to one vLLM server.

    Args:
        base_url: the server's address, e.g. ``http://127.0.0.1:8000`` (a trailing ``/v1`` is accepted).
        api_key: the server's ``--api-key``, sent as a bearer token; None for none.
        timeout_s: the most seconds one request may take.
        attempts: how many times a request is sent on connection failures and 5xx answers (at least 1).

    Raises:
        ValueError: ``base_url`` is not an http(s) URL, or ``timeout_s``/``attempts`` is not positive.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        attempts: int = DEFAULT_ATTEMPTS,
    ) -> None:
        url = base_url.rstrip("/").removesuffix("/v1")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"base_url {base_url!r} is not an http(s) URL; pass e.g. http://127.0.0.1:8000")
        if timeout_s <= 0 or attempts < 1:
            raise ValueError(f"timeout_s ({timeout_s}) must be positive and attempts ({attempts}) at least 1")
        self.base_url, self.attempts = url, attempts
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=url, headers=headers, timeout=timeout_s)

    def models(self) -> list[dict[str, Any]]:
        """The served models: the base (``parent`` None) and each loaded adapter (``root`` is its path).

        Returns:
            vLLM's model cards (``id``, ``root``, ``parent``, ...).

        Raises:
            VLLMServerError: the server is unreachable or refused.
        """
        return list(self._request("GET", "/v1/models")["data"])

    def base_model(self) -> dict[str, Any]:
        """The model card of the served base model.

        Returns:
            The first card without a ``parent``.

        Raises:
            VLLMServerError: the server is unreachable, refused, or lists no base model.
        """
        for card in self.models():
            if card.get("parent") is None:
                return card
        raise VLLMServerError(f"vLLM at {self.base_url} lists no base model in /v1/models")

    def load_adapter(self, name: str, path: str) -> None:
        """Load the PEFT adapter directory ``path`` under ``name`` (``/v1/load_lora_adapter``).

        Args:
            name: the model name requests will use.
            path: a directory the server can read.

        Raises:
            VLLMServerError: the server is unreachable or refused (e.g. runtime LoRA updating is off, the name is
                taken, the adapter does not fit ``--max-lora-rank``).
        """
        self._request("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})

    def unload_adapter(self, name: str) -> bool:
        """Unload the adapter ``name`` (``/v1/unload_lora_adapter``).

        Args:
            name: the adapter's model name.

        Returns:
            False if the server did not have it.

        Raises:
            VLLMServerError: the server is unreachable or refused for another reason.
        """
        try:
            self._request("POST", "/v1/unload_lora_adapter", {"lora_name": name})
        except VLLMServerError as err:
            if err.status == 404:
                return False
            raise
        return True

    def completions(self, request: dict[str, Any]) -> dict[str, Any]:
        """One ``/v1/completions`` request.

        Args:
            request: the request body (``model``, ``prompt``, sampling settings).

        Returns:
            vLLM's response.

        Raises:
            VLLMServerError: the server is unreachable or refused.
        """
        return self._request("POST", "/v1/completions", request)

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    def _request(self, method: str, route: str, body: dict[str, Any] | None = None) -> Any:
        for attempt in range(self.attempts):
            last = attempt == self.attempts - 1
            try:
                response = self._http.request(method, route, json=body)
            except httpx.HTTPError as err:
                if last:
                    raise VLLMServerError(
                        f"vLLM at {self.base_url} is unreachable ({route}: {type(err).__name__}: {err}); is the "
                        "server running at that address?"
                    ) from err
            else:
                if response.status_code < 500 or last:
                    return _answer(self.base_url, route, response)
            time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable: the last attempt returns or raises")


def _answer(base_url: str, route: str, response: httpx.Response) -> Any:
    if response.is_success:
        try:
            return response.json()
        except ValueError:
            return response.text  # load/unload answer with plain text
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:500]
    raise VLLMServerError(
        f"vLLM at {base_url} refused {route} (HTTP {response.status_code}): {message}", response.status_code
    )
