"""GCS: the manifest-last protocol with the server's generation preconditions.

Every GCS object has a ``generation``, a number that changes whenever the object is replaced. A manifest
is created with ``ifGenerationMatch=0`` (only if absent), replaced with ``ifGenerationMatch=<generation>``
and deleted with ``ifGenerationMatch=<generation>``; a failed precondition is HTTP 412. A save compares the
generations of its objects, listed in one request, right before its commit. The requests are those of the
GCS JSON API, sent through gcsfs's authenticated client (``GCSFileSystem._call``); gcsfs itself only offers
``ifGenerationMatch=0`` (``pipe_file(mode="create")``).

GCS lifecycle rules cannot select objects by tag or custom metadata, so unlike S3 there is no TTL tag:
expiry on ``gs://`` is ``gc()``'s job (docs/storage.md).
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Hashable, Mapping
from typing import Any
from urllib.parse import quote

from fsspec.asyn import sync

from ..format.manifest import Manifest
from .object_store import ManifestLastCommit

#: HTTP status of a ranged read of an empty object (a damaged, empty manifest).
_RANGE_NOT_SATISFIABLE = 416
#: HTTP status of a request whose precondition failed (gcsfs raises ``FileExistsError``, older ones ``HttpError``).
_PRECONDITION_FAILED = 412
#: How many times a read retries when its object is replaced between reading its generation and its bytes
#: (only where the server sends no ``X-Goog-Generation`` header with the bytes).
_READ_ATTEMPTS = 5


class GCSManifestLastCommit(ManifestLastCommit):
    """GCS: conditional manifest writes and deletes on generations, generation checks of a save's objects."""

    #: Objects from this size on are uploaded in resumable chunks of this size (a multiple of 256 KiB, as
    #: GCS requires), smaller ones in one multipart request; gcsfs's own threshold.
    resumable_chunk: int = 50 * 2**20

    def read_document(self, path: str, limit: int) -> tuple[bytes, str] | None:
        """The document's bytes and generation, which belong together: one GET returns the bytes and, in its
        ``X-Goog-Generation`` header (which google-cloud-storage's ``Blob`` downloads read too), their generation.

        Args:
            path: the object.
            limit: the most bytes a valid one has.

        Returns:
            Its first ``limit + 1`` bytes and its generation, or None if there is no such object.
        """
        try:
            return sync(self.fs.loop, self._get, path, limit)
        except FileNotFoundError:
            return None

    async def _get(self, path: str, limit: int) -> tuple[bytes, str]:
        """The first ``limit + 1`` bytes of the object at ``path`` and their generation."""
        for _ in range(_READ_ATTEMPTS):
            headers, body = await self._download(path, None, limit)
            generation = headers.get("X-Goog-Generation")
            if generation is not None:
                return body, str(generation)
            # No generation header (not GCS's own server): read the generation, then the bytes of exactly it.
            generation = (await self._metadata(path))["generation"]
            try:
                return (await self._download(path, generation, limit))[1], str(generation)
            except FileNotFoundError:
                continue  # replaced in between: that generation is gone
        raise OSError(f"{path} kept being replaced while it was read")

    async def _download(self, path: str, generation: str | None, limit: int) -> tuple[Mapping[str, str], bytes]:
        """Headers and the first ``limit + 1`` bytes of a download of ``path`` (of ``generation``)."""
        bucket, key, _ = self.fs.split_path(path)
        url = f"{self.fs._location}/download/storage/v1/b/{{}}/o/{{}}"
        try:
            return await self.fs._call(
                "GET",
                url,
                bucket,
                key,
                alt="media",
                generation=generation,
                headers={"Range": f"bytes=0-{limit}"},
            )
        except Exception as err:  # gcsfs's HttpError
            if getattr(err, "code", None) != _RANGE_NOT_SATISFIABLE:
                raise
            return await self.fs._call("GET", url, bucket, key, alt="media", generation=generation)  # an empty object

    async def _metadata(self, path: str) -> dict[str, Any]:
        """The object resource of ``path`` (its JSON metadata, ``generation`` included)."""
        bucket, key, _ = self.fs.split_path(path)
        return await self.fs._call("GET", "b/{}/o/{}", bucket, key, json_out=True)

    def write_document(self, path: str, data: bytes, version: str | None, limit: int) -> bool:
        """One upload with ``ifGenerationMatch=version`` (``0``: only if absent).

        Args:
            path: the object.
            data: its new bytes.
            version: the generation read, or None to create it.
            limit: unused (generations are the versions).

        Returns:
            Whether it was written (False: it changed, appeared or was deleted since it was read).
        """
        try:
            self._put(path, data, if_generation=version or "0")
        except (FileExistsError, FileNotFoundError):  # 412: another generation, or none, is there now
            return False
        return True

    def _delete_manifest(self, manifest: str, version: str) -> bool | None:
        """One DELETE with ``ifGenerationMatch=version``: True if deleted, False if it changed, None if it is gone."""
        bucket, key, _ = self.fs.split_path(manifest)
        try:
            self.fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=version)
        except FileNotFoundError:
            return None
        except Exception as err:
            if _precondition_failed(err):  # replaced since it was read
                return False
            raise
        finally:
            self.fs.invalidate_cache(manifest)
        return True

    def _upload(self, path: str, data: bytes, manifest: Manifest, create: bool = False) -> Hashable:
        """One upload; ``create``: ``ifGenerationMatch=0``, ``FileExistsError`` if the object exists.

        Returns:
            The new object's generation.
        """
        return self._put(path, data, if_generation="0" if create else None)

    def _uploaded(self, path: str, names: list[str]) -> dict[str, Hashable]:
        """The generation of each of ``names`` now stored in ``path``, from one fresh listing of the folder."""
        self.fs.invalidate_cache(path)
        try:
            listed = {info["name"].rsplit("/", 1)[-1]: info.get("generation") for info in self.fs.ls(path, detail=True)}
        except FileNotFoundError:
            return {}
        return {name: listed[name] for name in names if name in listed}

    def _put(self, path: str, data: bytes, if_generation: str | None) -> str:
        """Upload ``data`` to ``path`` (only if its generation is ``if_generation``; ``"0"``: only if absent).

        Args:
            path: the object's path.
            data: its bytes.
            if_generation: the ``ifGenerationMatch`` precondition, or None for an unconditional upload.

        Returns:
            The new object's generation.

        Raises:
            FileExistsError: the precondition failed (HTTP 412).
        """
        try:
            return sync(self.fs.loop, self._upload_object, path, data, if_generation)
        except FileExistsError:
            raise
        except Exception as err:
            if _precondition_failed(err):
                raise FileExistsError(path) from err
            raise
        finally:
            self.fs.invalidate_cache(path)

    async def _upload_object(self, path: str, data: bytes, if_generation: str | None) -> str:
        """One multipart upload (metadata and bytes in one request), or a resumable one from
        :attr:`resumable_chunk` bytes on; returns the new generation."""
        bucket, key, _ = self.fs.split_path(path)
        condition = {} if if_generation is None else {"ifGenerationMatch": if_generation}
        url = f"{self.fs._location}/upload/storage/v1/b/{quote(bucket, safe='')}/o"
        metadata = {"name": key, "contentType": "application/octet-stream"}
        if len(data) < self.resumable_chunk:
            boundary = uuid.uuid4().hex  # never in the data by chance, unlike a fixed one
            body = b"".join(
                [
                    f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n".encode(),
                    json.dumps(metadata).encode(),
                    f"\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n".encode(),
                    data,
                    f"\r\n--{boundary}--".encode(),
                ]
            )
            headers = {"Content-Type": f'multipart/related; boundary="{boundary}"'}
            out = await self.fs._call(
                "POST", url, uploadType="multipart", headers=headers, data=body, json_out=True, **condition
            )
            return str(out["generation"])
        return await self._upload_resumable(url, metadata, data, condition)

    async def _upload_resumable(
        self, url: str, metadata: dict[str, str], data: bytes, condition: dict[str, str]
    ) -> str:
        """A resumable upload in :attr:`resumable_chunk` pieces; the precondition is checked at its end."""
        from gcsfs.core import upload_chunk

        headers, _ = await self.fs._call(
            "POST",
            url,
            uploadType="resumable",
            json=metadata,
            headers={"X-Upload-Content-Type": metadata["contentType"]},
            **condition,
        )
        location = headers["Location"]
        out = None
        try:
            view = memoryview(data)
            for offset in range(0, len(data), self.resumable_chunk):
                piece = view[offset : offset + self.resumable_chunk]
                out = await upload_chunk(self.fs, location, piece, offset, len(data), metadata["contentType"])
        except Exception:
            with contextlib.suppress(Exception):
                await self.fs._call("DELETE", location)  # cancel the upload session
            raise
        if not out or "generation" not in out:
            raise OSError(f"GCS answered the last chunk of the upload to {metadata['name']} without its generation")
        return str(out["generation"])


def _precondition_failed(err: BaseException) -> bool:
    """Whether ``err`` is GCS's answer to a failed precondition (HTTP 412), as gcsfs raises it."""
    return isinstance(err, FileExistsError) or getattr(err, "code", None) == _PRECONDITION_FAILED
