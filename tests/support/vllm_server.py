"""A real vLLM OpenAI-compatible server (the CPU build in ``.venv-vllm``) on loopback, for the serving tests.

``make setup-vllm`` builds that venv (``make test-serving`` does it first); ``LORA_CKPT_VLLM_PYTHON`` names
another interpreter with vLLM. Only tests marked ``serving`` start one. Nothing here imports vLLM: the server
is a separate process (it spawns EngineCore and worker children of its own, so it runs in its own process
group and is stopped as a whole).

Known vLLM CPU facts the tests respect: requests to the base and to an adapter must not share a batch (a CPU
kernel bug serves the base requests with the adapter), so send them one at a time; ``prompt_logprobs`` with a
LoRA adapter crashes the engine; attention needs ``head_dim >= 32`` (the ``tiny-qwen3-hd32`` base).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
#: Names the Python interpreter of a venv with vLLM (default: the repository's ``.venv-vllm``).
VLLM_PYTHON_ENV = "LORA_CKPT_VLLM_PYTHON"
DEFAULT_VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
#: How long a server may take to answer ``GET /v1/models`` (about 40 s on two cores).
STARTUP_TIMEOUT_S = 180.0
#: Set in every server's environment (``env`` may override them).
BASE_ENV = {
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",  # /v1/load_lora_adapter and the resolver plugins
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}
#: Inherited from the test process only if ``env`` names them: they switch plugins on.
_NOT_INHERITED = ("VLLM_PLUGINS", "LORA_CKPT_ROOT", "LORA_CKPT_CACHE_DIR")
#: A port left alone (another server of the project may be listening there).
_RESERVED_PORTS = frozenset({8011})


@dataclasses.dataclass
class VLLMServer:
    """A running server.

    Attributes:
        base_url: ``http://127.0.0.1:<port>`` (no trailing ``/``, no ``/v1``).
        model: the base model's id as ``/v1/models`` lists it (the ``--model`` value).
        log: the file the server's stdout and stderr go to.
        process: the server process (the leader of its process group).
    """

    base_url: str
    model: str
    log: Path
    process: subprocess.Popen[bytes]

    def log_text(self) -> str:
        """Everything the server has logged so far."""
        return self.log.read_text(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server's log."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    def request(self, method: str, path: str, payload: Any = None, timeout: float = 120) -> tuple[int, Any]:
        """Send one request; its HTTP status and its decoded JSON body (the text if it is not JSON).

        Args:
            method: ``"GET"`` or ``"POST"``.
            path: e.g. ``"/v1/completions"``.
            payload: the JSON body of a POST.
            timeout: seconds to wait for the answer.
        """
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, body = resp.status, resp.read()
        except urllib.error.HTTPError as err:
            status, body = err.code, err.read()
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body.decode(errors="replace")

    def complete(self, model: str, prompt: str | list[int], max_tokens: int = 8, **fields: Any) -> tuple[int, Any]:
        """``POST /v1/completions``, greedy (``temperature`` 0), ``ignore_eos`` and ``return_token_ids`` on.

        Args:
            model: the base's id or an adapter's name.
            prompt: text or token ids.
            max_tokens: tokens to generate.
            **fields: further request fields (override the defaults).

        Returns:
            The status and the JSON answer (``choices[0]["token_ids"]`` holds the generated ids).
        """
        payload = {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
            **fields,
        }
        return self.request("POST", "/v1/completions", payload)


def vllm_python() -> str:
    """The interpreter of the venv with vLLM; fails the test (never skips it) when there is none.

    Returns:
        The path of ``$LORA_CKPT_VLLM_PYTHON``, else of ``.venv-vllm/bin/python`` in the repository.
    """
    python = os.environ.get(VLLM_PYTHON_ENV) or str(DEFAULT_VLLM_PYTHON)
    if not os.access(python, os.X_OK):
        pytest.fail(
            f"No vLLM interpreter at {python}: build the vLLM venv with `make setup-vllm` (make test-serving does "
            f"it first), or point {VLLM_PYTHON_ENV} at a Python with vLLM and this package installed",
            pytrace=False,
        )
    return python


def free_port() -> int:
    """A loopback TCP port nobody listens on now (never one of the reserved ports)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _RESERVED_PORTS:
            return int(port)


@contextlib.contextmanager
def vllm_server(
    base_dir: str | os.PathLike[str],
    *,
    env: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
    port: int | None = None,
    max_lora_rank: int = 16,
    max_loras: int = 2,
    log_dir: str | os.PathLike[str] | None = None,
    startup_timeout: float = STARTUP_TIMEOUT_S,
) -> Iterator[VLLMServer]:
    """Start ``vllm.entrypoints.openai.api_server`` on ``base_dir`` with LoRA enabled; stop it on exit.

    Args:
        base_dir: a Hugging Face model directory (``modeling.base.export_builtin`` writes one).
        env: environment variables for the server, over :data:`BASE_ENV` and the test process's own (which
            lends it neither ``VLLM_PLUGINS`` nor ``LORA_CKPT_ROOT``/``LORA_CKPT_CACHE_DIR``).
        extra_args: further command-line arguments of the server.
        port: the port to listen on (default: a free one).
        max_lora_rank: ``--max-lora-rank``.
        max_loras: ``--max-loras`` (adapters in one batch).
        log_dir: where the log file goes (default: a new temporary directory).
        startup_timeout: seconds to wait for ``GET /v1/models`` to answer.

    Yields:
        The running server.
    """
    python = vllm_python()
    port = port or free_port()
    log = Path(log_dir or tempfile.mkdtemp(prefix="vllm-")) / f"vllm-{port}.log"
    child_env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
    child_env.update(BASE_ENV)
    child_env.update(env or {})
    command = [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        os.fspath(base_dir),
        "--dtype",
        "float32",
        "--enable-lora",
        "--max-lora-rank",
        str(max_lora_rank),
        "--max-loras",
        str(max_loras),
        "--max-model-len",
        "512",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *extra_args,
    ]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=child_env, cwd=REPO, start_new_session=True
        )
    server = VLLMServer(f"http://127.0.0.1:{port}", "", log, process)
    try:
        server.model = _wait_until_up(server, startup_timeout)
        yield server
    finally:
        _stop(process)


def _wait_until_up(server: VLLMServer, timeout: float) -> str:
    """Poll ``GET /v1/models`` until it answers; the base model's id. Fails the test with the log's tail if the
    server exits or does not answer in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(
                f"vLLM exited with status {server.process.returncode} before it served; last lines of "
                f"{server.log}:\n{server.log_tail()}",
                pytrace=False,
            )
        try:
            with urllib.request.urlopen(server.base_url + "/v1/models", timeout=5) as resp:
                models = json.loads(resp.read())
            return str(models["data"][0]["id"])
        except (OSError, ValueError, KeyError, IndexError):
            time.sleep(1)
    pytest.fail(
        f"vLLM did not answer GET /v1/models within {timeout:.0f} s; last lines of {server.log}:\n{server.log_tail()}",
        pytrace=False,
    )


def _stop(process: subprocess.Popen[bytes], grace: float = 20) -> None:
    """SIGTERM the server's process group, then SIGKILL whatever is left of it after ``grace`` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace)
    # The EngineCore and worker children may outlive the API server: kill the whole group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)
