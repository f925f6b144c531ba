"""The storage contract (tests/storage_suite.py) on each backend: a local folder, memory:// and S3 (moto
over HTTP on loopback)."""

from __future__ import annotations

import uuid
from typing import Any

from storage_suite import CrossProcessContract, StorageContract


class TestLocal(CrossProcessContract):
    """A folder on the local disk: a hidden temporary sibling renamed into place."""

    name = "local"
    object_store = False
    crash_trials = 50

    def root(self) -> str:
        return str(self.tmp_path / "root")


class TestMemory(StorageContract):
    """fsspec's memory:// object store: one per process, so only the single-process contract."""

    name = "memory"
    object_store = True

    def root(self) -> str:
        return f"memory://{uuid.uuid4().hex}"


class TestS3(CrossProcessContract):
    """A prefix of a bucket on the loopback moto S3 server (s3fs, conditional manifest PUTs, tags)."""

    name = "s3"
    object_store = True
    crash_trials = 20

    def server(self) -> dict[str, Any]:
        """The session's moto server (the test skips without moto)."""
        return self.request.getfixturevalue("s3_server")

    def root(self) -> str:
        return f"s3://{self.server()['bucket']}/{uuid.uuid4().hex}"

    def storage_options(self) -> dict[str, Any]:
        return self.server()["storage_options"]
