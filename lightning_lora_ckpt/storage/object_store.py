"""The object-store commit protocol (S3, GCS, ``memory://``): upload every file, then the manifest last.

There is no rename: the checkpoint's files are written in place and the checkpoint becomes visible
when its ``checkpoint.json`` is uploaded, created only if absent. Right before that, the save checks
that every object it uploaded is still the one it uploaded (not replaced by another writer of the same
name, not taken by a ``gc`` whose clock runs ahead): otherwise it commits nothing. Manifest updates and
deletions are compare-and-swap on the manifest's version. This module holds the generic protocol, whose
conditional steps are atomic within one process only (enough for ``memory://``); S3 and GCS do them on
the server (:mod:`.s3`, :mod:`.gcs`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections.abc import Hashable, Mapping

from ..format.digests import DEFAULT_ALGORITHM, digest_hex
from ..format.files import FileContent
from ..format.layout import join
from ..format.manifest import MANIFEST, FileEntry, Manifest
from ..format.strict_json import CheckpointFormatError
from .fs import CheckpointWriteError, storage_errors
from .listing import modified_time
from .protocol import CommitProtocol, MakeManifest, refuse_to_replace, saved_concurrently

log = logging.getLogger(__name__)

#: How long an object of a checkpoint folder without a manifest must go unchanged before another save takes it
#: for a leftover of an interrupted save and replaces it (a live save uploads its objects within seconds).
TAKEOVER_AFTER = 60.0
#: The objects that failed saves of this process left, by folder: a retry may replace them at once.
_ABANDONED: dict[str, dict[str, Hashable]] = {}

#: How many times a replacing save re-reads a manifest that keeps changing under it before giving up.
REPLACE_ATTEMPTS = 5


class ManifestLastCommit(CommitProtocol):
    """Checkpoints on an object store: files first, manifest last; deletion removes the manifest first."""

    writes_in_place = True
    #: Serialises the conditional steps of every store this process reaches without server-side conditions.
    _lock = threading.RLock()

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
            replace: delete a committed checkpoint at ``path`` (unless published) before uploading.

        Returns:
            The manifest uploaded.

        Raises:
            FileExistsError: another writer committed ``path``, or replaced this save's objects, meanwhile.
            CheckpointConflictError: the checkpoint to replace is published.
            CheckpointWriteError: the store kept failing, or this save's objects vanished before its commit.
        """
        contents = {name: bytes(c) if isinstance(c, (bytes, memoryview)) else c.render() for name, c in files.items()}
        manifest = make_manifest(
            {name: FileEntry(len(data), digest_hex(data), DEFAULT_ALGORITHM) for name, data in contents.items()}
        )
        with storage_errors("write checkpoint", uri), self._exclusive():
            self._clear(uri, path, replace)
            uploaded: dict[str, Hashable] = {}
            try:
                for name, data in contents.items():
                    uploaded[name] = self._upload_new(uri, path, name, data, manifest, replace)
                self._check_uploaded(uri, path, uploaded)
                try:  # last, and only if no other writer committed this name meanwhile
                    self._upload(join(path, MANIFEST), manifest.to_json(), manifest, create=True)
                except FileExistsError:
                    raise saved_concurrently(uri) from None
                self._confirm(uri, path, uploaded, manifest)
            except BaseException:
                _ABANDONED[path] = uploaded  # what it left, a retry from this process may replace at once
                raise
        _ABANDONED.pop(path, None)
        return manifest

    def _exclusive(self) -> contextlib.AbstractContextManager[object]:
        """Held for a whole save: the in-process lock where the store lives in this process (``memory://``),
        so that two writers of one name are one after the other; nothing on stores with server-side conditions."""
        return self._lock if isinstance(getattr(self.fs, "store", None), dict) else contextlib.nullcontext()

    def _upload_new(self, uri: str, path: str, name: str, data: bytes, manifest: Manifest, replace: bool) -> Hashable:
        """Upload a data object only if absent, so that a save never writes into a checkpoint another writer
        committed. An object in a folder without a manifest is a leftover of an interrupted save, or belongs to
        a save in flight: a replacing save replaces it (the other save then finds its object replaced and
        commits nothing); a save without ``replace`` replaces it only if it is older than
        :data:`TAKEOVER_AFTER` or a failed save of this process left it, else refuses."""
        try:
            return self._upload(join(path, name), data, manifest, create=True)
        except FileExistsError:
            if self.read_manifest(uri, path) is not None:
                raise saved_concurrently(uri) from None
            try:
                abandoned = replace or self._abandoned(path, name)
            except FileNotFoundError:  # deleted meanwhile (what a replacing save or gc removed): once more
                try:
                    return self._upload(join(path, name), data, manifest, create=True)
                except FileExistsError:
                    raise saved_concurrently(uri) from None
            if not abandoned:
                raise FileExistsError(
                    f"Checkpoint {uri} is being saved by another writer right now (its objects are younger than "
                    f"{TAKEOVER_AFTER:.0f} s); save under another name, or retry later"
                ) from None
            version = self._upload(join(path, name), data, manifest)
            self._undo_damage(uri, path, name, data)
            return version

    def _undo_damage(self, uri: str, path: str, name: str, data: bytes) -> None:
        """After overwriting an object of a folder that had no manifest: if another writer committed the folder
        between that check and the overwrite, its checkpoint now lists an object that is not its own. Take that
        commit back (the checkpoint is then absent, never damaged) and refuse; its writer asked to save the name
        while this one was replacing it."""
        current = self.read_manifest(uri, path)
        if current is None:
            return
        try:
            entry = Manifest.from_json(current[0], join(uri, MANIFEST)).files.get(name)
        except CheckpointFormatError:
            entry = None
        if entry is None or entry.digest != digest_hex(data, entry.algorithm):
            self._delete_manifest(join(path, MANIFEST), current[1])
        raise saved_concurrently(uri)

    def _abandoned(self, path: str, name: str) -> bool:
        """Whether an object of a folder without a manifest is a leftover rather than part of a save in flight."""
        if isinstance(getattr(self.fs, "store", None), dict):  # memory://: saves are serial
            return True
        left = _ABANDONED.get(path, {})
        if name in left and self._uploaded(path, [name]).get(name) == left[name]:
            return True
        stamp = modified_time(self.fs.info(join(path, name)))
        return stamp is not None and self.now(self.fs._parent(path)) - stamp >= TAKEOVER_AFTER

    def _confirm(self, uri: str, path: str, uploaded: dict[str, Hashable], manifest: Manifest) -> None:
        """Right after the commit: if another writer replaced one of the objects between the check and the
        commit, take the commit back (the checkpoint is then absent, never damaged) and refuse."""
        if self._exclusive() is self._lock or self._uploaded(path, list(uploaded)) == uploaded:
            return
        current = self.read_manifest(uri, path)
        if current is not None and current[0] == manifest.to_json():
            self._delete_manifest(join(path, MANIFEST), current[1])
        raise saved_concurrently(uri)

    def _check_uploaded(self, uri: str, path: str, uploaded: dict[str, Hashable]) -> None:
        """Right before the commit: every object this save uploaded must still be the one it uploaded."""
        current = self._uploaded(path, list(uploaded))
        if any(name not in current for name in uploaded):
            raise CheckpointWriteError(
                f"Could not write checkpoint {uri}: its objects {sorted(set(uploaded) - set(current))} vanished "
                "before the commit (deleted by another writer replacing or deleting this name, or by a gc that took "
                "them for leftovers, e.g. on a host whose clock runs ahead); nothing was committed, save again"
            )
        if current != uploaded:
            raise saved_concurrently(uri)

    def _clear(self, uri: str, path: str, replace: bool) -> None:
        """Delete the committed checkpoint at ``path`` before a replacing save (published ones are refused)."""
        for _ in range(REPLACE_ATTEMPTS):
            current = self.read_manifest(uri, path)
            if current is None:
                return
            if not replace:
                raise saved_concurrently(uri)
            refuse_to_replace(uri, current[0])
            if self.delete(path, current[1]):
                return
        raise saved_concurrently(uri)

    def read_document(self, path: str, limit: int) -> tuple[bytes, str] | None:
        """See :meth:`CommitProtocol.read_document`; the version is the sha256 of the bytes (the generic store has
        no object versions; S3 and GCS use theirs).

        Args:
            path: the object.
            limit: the most bytes a valid one has.

        Returns:
            Its first ``limit + 1`` bytes and their sha256, or None if there is no such object.
        """
        try:
            raw = self.fs.cat_file(path, start=0, end=limit + 1)
        except FileNotFoundError:
            return None
        return raw, digest_hex(raw, "sha256")

    def write_document(self, path: str, data: bytes, version: str | None, limit: int) -> bool:
        with self._lock:
            current = self.read_document(path, limit)
            if (current[1] if current else None) != version:
                return False
            self.fs.pipe_file(path, data)
        return True

    def delete(self, path: str, version: str | None) -> bool:
        manifest = join(path, MANIFEST)
        if version is None:
            self.fs.invalidate_cache(manifest)
            if self.fs.exists(manifest):
                return False
        else:
            outcome = self._delete_manifest(manifest, version)
            if outcome is not True:
                return outcome is None  # None: deleted meanwhile (or being replaced: its new objects are not ours)
        self._remove_objects(path)
        return True

    def _delete_manifest(self, manifest: str, version: str) -> bool | None:
        """Delete the manifest object if it is still at ``version``: True if deleted, False if it changed,
        None if it is gone."""
        with self._lock:
            current = self.read_manifest(manifest, self.fs._parent(manifest))
            if current is None:
                return None
            if current[1] != version:
                return False
            self.fs.rm_file(manifest)
        return True

    def _remove_objects(self, path: str) -> None:
        """Remove what is left of a checkpoint folder once its manifest is gone."""
        self.fs.invalidate_cache(path)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def remove_leftover(self, unit: str, members: list[str]) -> None:
        """Exactly the old objects that were listed (a save restarting in that folder keeps its new ones).

        Args:
            unit: the checkpoint folder without a manifest.
            members: its listed objects, which are deleted.
        """
        self.fs.rm([m for m in members if m != unit])

    def now(self, root: str) -> float:
        """The store's clock: the modification time of a probe object written under ``root`` (then removed),
        so that a host whose clock runs ahead never takes a save in flight for an old leftover.

        Args:
            root: the checkpoint root's path in the store.

        Returns:
            Seconds since the epoch, as the store dates objects.
        """
        probe, stamp = join(root, f".lora-ckpt-clock-{uuid.uuid4().hex}"), None
        try:
            self.fs.pipe_file(probe, b"")
            try:
                stamp = modified_time(self.fs.info(probe))
            finally:
                self.fs.rm_file(probe)
        except OSError as err:  # read-only credentials (a dry run): this host's clock it is
            log.warning("Could not read the clock of %s (%s); judging the age of leftovers by this host's", root, err)
        return stamp if stamp is not None else super().now(root)

    def _upload(self, path: str, data: bytes, manifest: Manifest, create: bool = False) -> Hashable:
        """Write one object (``create``: ``FileExistsError`` if it exists); returns what identifies this upload."""
        with self._lock:
            if create and self.fs.exists(path):
                raise FileExistsError(path)
            self.fs.pipe_file(path, data)
            return self._identity(path)

    def _uploaded(self, path: str, names: list[str]) -> dict[str, Hashable]:
        """What identifies the object now stored under each of ``names`` in ``path`` (absent ones left out)."""
        found = {}
        for name in names:
            try:
                found[name] = self._identity(join(path, name))
            except FileNotFoundError:
                continue
        return found

    def _identity(self, path: str) -> Hashable:
        """The stored object's identity where the store keeps one (``memory://``: the file object), else its
        size and modification time."""
        store = getattr(self.fs, "store", None)
        if isinstance(store, dict):
            if path not in store:
                raise FileNotFoundError(path)
            return store[path]
        info = self.fs.info(path)
        return info.get("size"), modified_time(info)
