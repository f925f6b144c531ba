"""A fault-injecting HTTP proxy on loopback, for putting in front of the moto S3 server in tests.

Point an S3 client's ``endpoint_url`` at :attr:`FaultProxy.url`; requests are forwarded to the upstream
server unless a fault armed with :meth:`FaultProxy.inject` applies. Faults apply to the next ``times``
matching requests (or to all of them with ``times=None``); the earliest armed fault that matches a
request applies. They are real network behaviour, not mocks:

- ``"close"``: read the request, then close the connection without answering;
- ``"reset"``: read half of the request body, then reset the connection (TCP RST);
- ``"500"`` / ``"503"``: answer ``InternalError`` / ``SlowDown`` with the XML error body S3 sends;
- ``"throttle"``: forward, but read the request body and send the response at ``rate`` bytes/second;
- ``"stall"``: read the request and answer nothing for ``hold`` seconds, then close.

Every request is recorded in :attr:`FaultProxy.log` as ``(method, path, fault or None)``.
"""

from __future__ import annotations

import dataclasses
import http.client
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal
from urllib.parse import urlsplit

FaultKind = Literal["close", "reset", "500", "503", "throttle", "stall"]
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "expect", "te", "upgrade"}
_S3_ERRORS = {
    "500": ("InternalError", "We encountered an internal error. Please try again."),
    "503": ("SlowDown", "Please reduce your request rate."),
}


@dataclasses.dataclass
class Fault:
    """One armed fault: which requests it hits and how many more times (None: every time)."""

    kind: FaultKind
    times: int | None
    method: str | None
    path_contains: str | None
    rate: float
    hold: float

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or method == self.method) and (
            self.path_contains is None or self.path_contains in path
        )


class FaultProxy:
    """An HTTP/1.1 forwarding proxy to ``upstream`` (``http://host:port``) with switchable faults."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream = (parts.hostname, parts.port)
        self.log: list[tuple[str, str, FaultKind | None]] = []
        self._faults: list[Fault] = []
        self._generation = 0  # bumped by clear(): releases requests being stalled
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.proxy = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def inject(
        self,
        kind: FaultKind,
        times: int | None = 1,
        method: str | None = None,
        path_contains: str | None = None,
        rate: float = 20_000.0,
        hold: float = 30.0,
    ) -> None:
        """Arm a fault for the next ``times`` requests matching ``method`` and ``path_contains`` (None: all)."""
        if kind not in ("close", "reset", "500", "503", "throttle", "stall"):
            raise ValueError(f"unknown fault kind {kind!r}")
        if times is not None and times < 1:
            raise ValueError(f"times must be >= 1 or None, got {times}")
        with self._lock:
            self._faults.append(Fault(kind, times, method, path_contains, rate, hold))

    def clear(self) -> None:
        """Disarm every fault (requests already being stalled are released)."""
        with self._lock:
            self._faults.clear()
            self._generation += 1

    def injected(self, kind: FaultKind | None = None) -> int:
        """How many requests got a fault (of ``kind``, or any)."""
        with self._lock:
            return sum(1 for _, _, f in self.log if f is not None and (kind is None or f == kind))

    def requests(self, method: str | None = None, path_contains: str = "") -> int:
        """How many requests reached the proxy (with that method and path fragment)."""
        with self._lock:
            return sum(1 for m, p, _ in self.log if (method is None or m == method) and path_contains in p)

    def close(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _take(self, method: str, path: str) -> Fault | None:
        with self._lock:
            fault = next((f for f in self._faults if f.matches(method, path)), None)
            if fault is not None and fault.times is not None:
                fault.times -= 1
                if fault.times == 0:
                    self._faults.remove(fault)
            self.log.append((method, path, fault.kind if fault else None))
            return fault


@contextmanager
def fault_proxy(upstream: str) -> Iterator[FaultProxy]:
    """A running :class:`FaultProxy`, closed on exit."""
    proxy = FaultProxy(upstream)
    try:
        yield proxy
    finally:
        proxy.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        return

    @property
    def proxy(self) -> FaultProxy:
        return self.server.proxy  # type: ignore[attr-defined]

    def _handle(self) -> None:
        fault = self.proxy._take(self.command, self.path)
        kind = fault.kind if fault else None
        if kind == "reset":
            self._read_body(limit=int(self.headers.get("Content-Length") or 0) // 2)
            self._reset()
            return
        body = self._read_body(rate=fault.rate if kind == "throttle" else None)
        if kind == "close":
            self.close_connection = True
            return
        if kind == "stall":
            generation, deadline = self.proxy._generation, time.monotonic() + fault.hold  # type: ignore[union-attr]
            while time.monotonic() < deadline and generation == self.proxy._generation:
                if self.proxy._stopping.wait(0.05):
                    break
            self.close_connection = True
            return
        if kind in _S3_ERRORS:
            self._send_s3_error(int(kind))
            return
        self._forward(body, rate=fault.rate if kind == "throttle" else None)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    def _read_body(self, limit: int | None = None, rate: float | None = None) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        if limit is not None:
            length = min(length, limit)
        if rate is None:
            return self.rfile.read(length)
        out = bytearray()
        while len(out) < length:
            out += self.rfile.read(min(1024, length - len(out)))
            time.sleep(1024 / rate)
        return bytes(out)

    def _reset(self) -> None:
        self.close_connection = True
        self.rfile.close()  # drops the makefile reference, so closing the socket really closes it
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()

    def _send_s3_error(self, status: int) -> None:
        code, message = _S3_ERRORS[str(status)]
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            "<RequestId>FAULTPROXY</RequestId><HostId>fault-proxy</HostId></Error>"
        ).encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("x-amz-request-id", "FAULTPROXY")
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _forward(self, body: bytes, rate: float | None) -> None:
        upstream = http.client.HTTPConnection(*self.proxy.upstream, timeout=60)
        try:
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                    upstream.putheader(name, value)
            if body or self.command in ("PUT", "POST"):
                upstream.putheader("Content-Length", str(len(body)))
            upstream.endheaders(body)
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        self.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in _HOP_BY_HOP and (name.lower() != "content-length" or self.command == "HEAD"):
                self.send_header(name, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command == "HEAD":
            return
        step = 1024 if rate else len(data) or 1
        for i in range(0, len(data), step):
            self.wfile.write(data[i : i + step])
            if rate:
                time.sleep(step / rate)
