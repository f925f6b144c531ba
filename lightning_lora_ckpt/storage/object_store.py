"""The object-store commit protocol (S3, GCS, ``memory://``): upload every file, then the manifest last.

There is no rename: the checkpoint's files are written in place and the checkpoint becomes visible
when its ``checkpoint.json`` is uploaded. On S3 every object carries the TTL tag from its first upload
(bucket lifecycle rules expire checkpoints by it, see :mod:`..format.ttl`), and a save that must not
replace another creates its manifest with a conditional ``If-None-Match`` PUT.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlencode

from ..format.files import FileContent
from ..format.layout import join
from ..format.manifest import MANIFEST, FileEntry, Manifest, sha256_hex
from ..format.ttl import TTL_TAG, lifecycle_tag
from .fs import storage_errors
from .protocol import CommitProtocol, MakeManifest, saved_concurrently


class ManifestLastCommit(CommitProtocol):
    """Checkpoints on an object store: files first, manifest last; deletion removes the manifest first."""

    writes_in_place = True

    def commit(
        self, uri: str, path: str, files: Mapping[str, FileContent], make_manifest: MakeManifest, replace: bool
    ) -> Manifest:
        """See :meth:`CommitProtocol.commit`: an existing checkpoint being replaced is deleted (manifest
        first) before the upload, so it is never seen mixed with the new one's files.

        Args:
            uri: the checkpoint's URI, for error messages.
            path: the checkpoint folder in the store.
            files: the contents of every file but the manifest, by file name, uploaded in this order.
            make_manifest: builds the manifest from the size and sha256 of each file.
            replace: delete a committed checkpoint at ``path`` before uploading.

        Returns:
            The manifest uploaded.

        Raises:
            FileExistsError: without ``replace``, another writer committed ``path`` meanwhile (detected where
                the store supports conditional creates, as S3 does).
            CheckpointWriteError: the store kept failing.
        """
        contents = {name: c if isinstance(c, bytes) else c.render() for name, c in files.items()}
        manifest = make_manifest({name: FileEntry(len(data), sha256_hex(data)) for name, data in contents.items()})
        with storage_errors("write checkpoint", uri):
            if replace:
                self.delete(path)
            for name, data in contents.items():  # in place: leftovers of an interrupted save are overwritten
                self._upload(join(path, name), data, manifest)
            try:  # last; without overwrite, only if no other writer committed this name meanwhile
                self._upload(join(path, MANIFEST), manifest.to_json(), manifest, create=not replace)
            except FileExistsError:
                raise saved_concurrently(uri) from None
        return manifest

    def write_manifest(self, path: str, manifest: Manifest) -> None:
        self._upload(join(path, MANIFEST), manifest.to_json(), manifest)

    def delete(self, path: str) -> None:
        if self.fs.exists(join(path, MANIFEST)):
            self.fs.rm_file(join(path, MANIFEST))
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def write_if_absent(self, path: str, data: bytes) -> None:
        if not self.fs.exists(path):
            self.fs.makedirs(self.fs._parent(path), exist_ok=True)
            self.fs.pipe_file(path, data)

    def remove_leftover(self, unit: str, members: list[str]) -> None:
        """Exactly the old objects that were listed (a save restarting in that folder keeps its new ones).

        Args:
            unit: the checkpoint folder without a manifest.
            members: its listed objects, which are deleted.
        """
        self.fs.rm([m for m in members if m != unit])

    def _upload(self, path: str, data: bytes, manifest: Manifest, create: bool = False) -> None:
        self.fs.pipe_file(path, data)


class S3ManifestLastCommit(ManifestLastCommit):
    """S3: objects carry the ``lora-ckpt-ttl`` lifecycle tag, and manifests can be created only if absent."""

    def write_manifest(self, path: str, manifest: Manifest) -> None:
        """Re-tag every object first, so a lifecycle rule never sees a tag shorter than the new expiry.

        Args:
            path: the checkpoint folder.
            manifest: the new manifest (same files, new metadata).
        """
        for name in manifest.files:
            self.fs.put_tags(join(path, name), _ttl_tags(manifest), mode="o")
        super().write_manifest(path, manifest)

    def object_tags(self, path: str) -> dict[str, dict[str, str]]:
        return {p.rsplit("/", 1)[-1]: self.fs.get_tags(p) for p in self.fs.ls(path, detail=False)}

    def _upload(self, path: str, data: bytes, manifest: Manifest, create: bool = False) -> None:
        """One PUT that carries the TTL tag from the start; ``create``: ``FileExistsError`` if the object exists."""
        mode = "create" if create else "overwrite"
        self.fs.pipe_file(path, data, mode=mode, Tagging=urlencode(_ttl_tags(manifest)))


def _ttl_tags(manifest: Manifest) -> dict[str, str]:
    return {TTL_TAG: lifecycle_tag(manifest.created_at, manifest.expires_at, manifest.public)}
