"""Storage for the tests: an in-memory object store that fails on demand, a moto S3 server on loopback, and a
small real filesystem (tmpfs) for disk-full cases.

Importing this module registers the ``failingmem://`` protocol with fsspec.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem


class FailingMemoryFS(MemoryFileSystem):
    """An object store whose uploads fail after a number of successful ones (a real fault, not a mock)."""

    protocol = "failingmem"
    root_marker = ""
    writes_left = 1

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        if FailingMemoryFS.writes_left <= 0:
            raise OSError(f"injected upload failure for {path}")
        FailingMemoryFS.writes_left -= 1
        return super().pipe_file(path, value, **kwargs)


fsspec.register_implementation("failingmem", FailingMemoryFS, clobber=True)


@contextlib.contextmanager
def moto_s3_server(bucket: str = "ckpts") -> Iterator[dict[str, Any]]:
    """A real S3-protocol HTTP server (moto) on loopback with one bucket, stopped on exit.

    Yields ``storage_options`` (the s3fs options that reach it), a boto3 ``client`` and the ``bucket`` name.
    """
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        options = {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        }
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        client.create_bucket(Bucket=bucket)
        yield {"storage_options": options, "client": client, "bucket": bucket}
    finally:
        server.stop()


@contextlib.contextmanager
def small_tmpfs(mount_point: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` (e.g. ``"300k"``) mounted at ``mount_point`` (needs root; the test is skipped
    where mounting is not permitted), unmounted afterwards."""
    mount_point.mkdir(parents=True, exist_ok=True)
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)], capture_output=True, text=True
        )
    except FileNotFoundError:
        pytest.skip("no mount command")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()[:200]}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
