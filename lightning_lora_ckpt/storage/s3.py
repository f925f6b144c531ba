"""S3: the manifest-last protocol with the server's conditional writes, and TTL tags on every object.

Every object carries the ``lora-ckpt-ttl`` tag from its first upload (bucket lifecycle rules expire
checkpoints by it, see :mod:`..format.ttl`). A manifest is created with ``If-None-Match: *``, replaced
with ``If-Match: <etag>`` and deleted with ``If-Match: <etag>``; a save compares the ETags of its objects
right before its commit.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any
from urllib.parse import urlencode

from fsspec.asyn import sync

from ..format.layout import join
from ..format.manifest import MANIFEST, Manifest
from ..format.ttl import TTL_TAG, lifecycle_tag
from .object_store import ManifestLastCommit

#: The S3 error codes of a conditional request whose condition did not hold (the object changed or is gone).
_CONDITION_FAILED = {"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"}


class S3ManifestLastCommit(ManifestLastCommit):
    """S3: conditional manifest writes and deletes on the server, ETag checks of a save's objects, TTL tags."""

    def read_document(self, path: str, limit: int) -> tuple[bytes, str] | None:
        """The document's bytes and ETag from one GET (so they belong together).

        Args:
            path: the object.
            limit: the most bytes a valid one has.

        Returns:
            Its first ``limit + 1`` bytes and its ETag, or None if there is no such object.
        """
        try:
            return sync(self.fs.loop, self._get, path, limit)
        except FileNotFoundError:
            return None

    async def _get(self, path: str, limit: int) -> tuple[bytes, str]:
        bucket, key, _ = self.fs.split_path(path)
        try:
            response = await self.fs._call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes=0-{limit}")
        except OSError as err:
            if _code(err) != "InvalidRange":
                raise
            response = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)  # an empty object
        async with response["Body"] as body:
            return await body.read(), response["ETag"]

    def write_document(self, path: str, data: bytes, version: str | None, limit: int) -> bool:
        """One PUT with ``If-Match: version`` (``If-None-Match: *`` to create).

        Args:
            path: the object.
            data: its new bytes.
            version: the ETag read, or None to create it.
            limit: unused (ETags are the versions).

        Returns:
            Whether it was written.
        """
        condition: dict[str, Any] = {"mode": "create"} if version is None else {"IfMatch": version}
        try:
            self.fs.pipe_file(path, data, **condition)
        except (FileNotFoundError, FileExistsError, OSError) as err:
            if isinstance(err, (FileNotFoundError, FileExistsError)) or _code(err) in _CONDITION_FAILED:
                return False
            raise
        finally:
            self.fs.invalidate_cache(path)
        return True

    def replace_manifest(self, path: str, manifest: Manifest, version: str, previous: Manifest | None = None) -> bool:
        """Re-tag every object first, so a lifecycle rule never sees a tag shorter than the new expiry, then
        PUT the manifest with ``If-Match``.

        Args:
            path: the checkpoint folder.
            manifest: the new manifest (same files, new metadata).
            version: the ETag of the manifest it was made from.
            previous: that manifest: the objects keep their tags if the new manifest's tag is the same.

        Returns:
            Whether it was replaced (False: it changed or was deleted since it was read).
        """
        retag = previous is None or _ttl_tags(previous) != _ttl_tags(manifest)
        try:
            for name in manifest.files if retag else ():
                self.fs.put_tags(join(path, name), _ttl_tags(manifest), mode="o")
            self.fs.pipe_file(
                join(path, MANIFEST), manifest.to_json(), Tagging=urlencode(_ttl_tags(manifest)), IfMatch=version
            )
        except (FileNotFoundError, OSError) as err:
            if isinstance(err, FileNotFoundError) or _code(err) in _CONDITION_FAILED:
                return False
            raise
        return True

    def _delete_manifest(self, manifest: str, version: str) -> bool | None:
        """One DELETE with ``If-Match: version``: True if deleted, False if it changed, None if it is gone."""
        bucket, key, _ = self.fs.split_path(manifest)
        try:
            self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version)
        except (FileNotFoundError, OSError) as err:
            if isinstance(err, FileNotFoundError) or _code(err) == "NoSuchKey":
                return None
            if _code(err) in _CONDITION_FAILED:
                return False
            raise
        finally:
            self.fs.invalidate_cache(manifest)
        return True

    def object_tags(self, path: str) -> dict[str, dict[str, str]]:
        return {p.rsplit("/", 1)[-1]: self.fs.get_tags(p) for p in self.fs.ls(path, detail=False)}

    def _upload(self, path: str, data: bytes, manifest: Manifest, create: bool = False) -> Hashable:
        """One PUT that carries the TTL tag from the start; ``create``: ``FileExistsError`` if the object exists.

        Returns:
            The object's ETag.
        """
        mode = "create" if create else "overwrite"
        response = self.fs.pipe_file(path, data, mode=mode, Tagging=urlencode(_ttl_tags(manifest)))
        if isinstance(response, dict) and "ETag" in response:
            return response["ETag"]
        return self.fs.info(path)["ETag"]  # a multipart upload: s3fs returns nothing

    def _uploaded(self, path: str, names: list[str]) -> dict[str, Hashable]:
        self.fs.invalidate_cache(path)
        listed = {info["name"].rsplit("/", 1)[-1]: info.get("ETag") for info in self.fs.ls(path, detail=True)}
        return {name: listed[name] for name in names if name in listed}


def _code(err: BaseException) -> str | None:
    """The S3 error code behind an exception s3fs translated (None if it is not an S3 error)."""
    response: Any = getattr(err.__cause__, "response", None) or getattr(err, "response", None)
    return response.get("Error", {}).get("Code") if isinstance(response, dict) else None


def _ttl_tags(manifest: Manifest) -> dict[str, str]:
    # A pinned checkpoint is kept like a published one: tagged "none", so no bucket rule expires it.
    return {TTL_TAG: lifecycle_tag(manifest.created_at, manifest.expires_at, manifest.public or manifest.pinned)}
