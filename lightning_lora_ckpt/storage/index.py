"""A run's listing index: the manifests of all its checkpoints in one document, kept in step by every writer.

Listing a run from its manifests costs one request per checkpoint on an object store (10,001 for 10,000). The
index, ``<run>/.lora-ckpt-index.json``, holds a copy of every committed manifest of the run (soft-deleted ones
too), so a listing is two requests: the writers' *intents* (``<run>/.lora-ckpt-pending/``) and the index.

The manifests stay the source of truth; the index is a cache that can never hide or invent a checkpoint:

- Every change of a checkpoint (commit, metadata update, soft delete, restore, deletion) first records an intent
  naming it, then changes the manifest, then *settles*: re-reads the manifest and writes its copy into the index
  with a compare-and-swap (the manifest is read after the index, in every attempt, so the newest settle always
  carries the newest manifest), and only then drops the intent. A reader lists the intents before it reads the
  index and reads the manifests of the checkpoints they name itself; so a checkpoint changed before a listing
  began is seen as it is, also when its writer died before settling.
- An index that is missing, torn, too large or not exactly what writers write (an entry whose key, run, name or
  kind disagrees with its manifest, an unknown format) is ignored: the listing falls back to the manifests, and
  the next writer (or :meth:`RunIndex.rebuild`, ``CheckpointStore.reindex``) writes a correct one from them.
- ``gc`` lists every object of the run anyway (to find leftovers), so it takes only the copies of manifests that
  exist and reads the others, and deletes nothing that a manifest read at the moment does not allow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ..format.index_entry import IndexEntry
from ..format.layout import KIND_DIRS, join, validate_name
from ..format.manifest import MANIFEST, MAX_MANIFEST_BYTES, Manifest
from ..format.strict_json import CheckpointFormatError, load_json_object
from .fs import CheckpointConflictError
from .listing import is_manifest_path, modified_time, scan
from .protocol import CommitProtocol

log = logging.getLogger(__name__)

INDEX_FILE = ".lora-ckpt-index.json"
PENDING_DIR = ".lora-ckpt-pending"
INDEX_FORMAT = "lightning-lora-ckpt-index"
INDEX_FORMAT_VERSION = 1
#: An index larger than this is not read (about 200,000 checkpoints); the run is listed from its manifests.
MAX_INDEX_BYTES = 256 << 20
#: How many times a settle retries its compare-and-swap against other writers before leaving its intent.
SETTLE_ATTEMPTS = 12
#: How old an intent must be before ``gc`` or a rebuild takes its writer for dead and settles it in its place.
STALE_INTENT_AFTER = 3600.0

#: A checkpoint within its run: (kind folder, name), e.g. ``("weights", "000100")``.
Key = tuple[str, str]


@dataclass(frozen=True)
class IndexReport:
    """What :meth:`RunIndex.rebuild` found and wrote.

    Attributes:
        run_id: the run.
        previous: the state of the index it replaced: ``"current"``, ``"stale"``, ``"missing"`` or ``"invalid"``.
        checkpoints: how many committed checkpoints the new index holds (soft-deleted ones included).
        added: checkpoints the old index did not hold.
        removed: entries of the old index without a committed checkpoint.
        changed: entries whose copy differed from the manifest.
        intents_settled: intents of writers that died before settling, settled and removed.
    """

    run_id: str
    previous: str
    checkpoints: int
    added: list[str]
    removed: list[str]
    changed: list[str]
    intents_settled: int

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return dict(self.__dict__)


class RunIndex:
    """The listing index of one run folder, on its filesystem's commit protocol.

    Args:
        protocol: the commit protocol of the root's filesystem.
        run_path: the run's folder in that filesystem.
        run_uri: the run folder's URI, which the listed checkpoints' paths start with (default: ``run_path``).
    """

    def __init__(self, protocol: CommitProtocol, run_path: str, run_uri: str | None = None) -> None:
        self.protocol = protocol
        self.fs = protocol.fs
        self.run_path = run_path.rstrip("/")
        self.run_uri = (run_uri or run_path).rstrip("/")
        self.run_id = self.run_path.rsplit("/", 1)[-1]
        self.path = join(self.run_path, INDEX_FILE)

    # -- reading ----------------------------------------------------------------------------------
    def entries(self, found: dict[str, dict[str, Any]] | None = None) -> dict[Key, IndexEntry]:
        """Every committed checkpoint of the run (soft-deleted ones too) and its listing entry.

        Args:
            found: a fresh flat listing of the run (:func:`.listing.scan`), if the caller has one: only the
                checkpoints whose manifest it lists are returned, each from the index where it holds a copy.

        Returns:
            Key -> entry. Damaged manifests are left out (``verify`` reports them).
        """
        if found is not None:
            existing = {self._key_of(p) for p in found if is_manifest_path(p, self.run_path)}
            pending = {key for key, _ in self._intents(found)}
            copies = self.load() or {}
            kept = {key: copies[key] for key in existing - pending if key in copies}
            return dict(sorted((kept | self._entries_of(self._read(existing - kept.keys()))).items()))
        pending = {key for key, _ in self._intents()}  # before the index: see the module's docstring
        indexed = self.load()
        if indexed is None:
            return self._entries_of(self.scan())
        fresh = self._entries_of(self._read(pending))
        return dict(sorted(({key: e for key, e in indexed.items() if key not in pending} | fresh).items()))

    def _entries_of(self, manifests: dict[Key, Manifest]) -> dict[Key, IndexEntry]:
        return {key: IndexEntry.from_manifest(m, join(self.run_uri, *key)) for key, m in manifests.items()}

    def scan(self, found: dict[str, dict[str, Any]] | None = None) -> dict[Key, Manifest]:
        """Every committed checkpoint of the run from its manifests alone (one listing, one read per manifest).

        Args:
            found: the run's fresh flat listing, if the caller has one.

        Returns:
            Key -> manifest.
        """
        found = scan(self.fs, self.run_path) if found is None else found
        return self._read(self._key_of(p) for p in found if is_manifest_path(p, self.run_path))

    def load(self) -> dict[Key, IndexEntry] | None:
        """The index's entries, or None if there is no usable index (missing, torn, hostile).

        Returns:
            Key -> entry, or None (logged with the reason when an index is there but unusable).
        """
        try:
            current = self.protocol.read_document(self.path, MAX_INDEX_BYTES)
        except (CheckpointFormatError, OSError) as err:
            log.warning("Ignoring the listing index of run %s: %s", self.run_path, err)
            return None
        parsed = self._parse(current[0]) if current is not None else None
        return parsed[0] if parsed is not None else None

    def _parse(self, raw: bytes) -> tuple[dict[Key, IndexEntry], dict[str, Any]] | None:
        """The entries of an index and its raw ``checkpoints`` object, or None (logged) if it is unusable."""
        try:
            return self._checked(raw)
        except CheckpointFormatError as err:
            log.warning(
                "Ignoring the listing index %s (%s); listing the run from its manifests. "
                "`lightning-lora-ckpt reindex %s` (CheckpointStore.reindex) rewrites it",
                self.path,
                err,
                self.run_id,
            )
            return None

    def _checked(self, raw: bytes) -> tuple[dict[Key, IndexEntry], dict[str, Any]]:
        """Parse and check an index: every entry must be what a writer writes, else the whole index is refused."""
        data = load_json_object(raw, MAX_INDEX_BYTES, f"Invalid listing index {self.path}")
        if data.get("format") != INDEX_FORMAT or data.get("format_version") != INDEX_FORMAT_VERSION:
            raise CheckpointFormatError("not a listing index of this version")
        if data.get("run_id") != self.run_id or not isinstance(data.get("checkpoints"), dict):
            raise CheckpointFormatError("it is for another run, or holds no 'checkpoints' object")
        entries = {}
        for text, value in data["checkpoints"].items():
            kind_dir, _, name = text.partition("/")
            if not _valid_key(kind_dir, name):
                raise CheckpointFormatError(f"entry {text[:200]!r} is not <kind>/<name>")
            entries[(kind_dir, name)] = IndexEntry.from_data(
                value, self.run_id, kind_dir, name, join(self.run_uri, kind_dir, name)
            )
        return entries, data["checkpoints"]

    def _read(self, keys: Iterable[Key]) -> dict[Key, Manifest]:
        """The manifests of ``keys`` read from storage (concurrently on object stores); missing or damaged ones
        left out. At most one byte past the cap is read: a huge file posing as a manifest is refused unread."""
        keys = sorted(set(keys))
        paths = [join(self.run_path, kind_dir, name, MANIFEST) for kind_dir, name in keys]
        safe = [(key, path) for key, path in zip(keys, paths, strict=True) if self._safe(path)]
        if not safe:
            return {}
        contents = self.fs.cat_ranges(
            [p for _, p in safe], [0] * len(safe), [MAX_MANIFEST_BYTES + 1] * len(safe), on_error="return"
        )
        manifests = {}
        for (key, path), raw in zip(safe, contents, strict=True):
            if isinstance(raw, BaseException):  # deleted between the listing and the read
                continue
            with contextlib.suppress(CheckpointFormatError):  # damaged: verify() reports it
                manifests[key] = Manifest.from_json(raw, path)
        return manifests

    def _safe(self, path: str) -> bool:
        """Whether a manifest may be read (locally: a regular file, not a FIFO or a link out)."""
        try:
            self.protocol.check_member(path, path.rsplit("/", 1)[0], MANIFEST)
        except CheckpointFormatError:
            return False
        return True

    def _key_of(self, manifest_path: str) -> Key:
        kind_dir, name = manifest_path.rsplit("/", 3)[-3:-1]
        return kind_dir, name

    # -- intents ----------------------------------------------------------------------------------
    def _intents(self, found: dict[str, dict[str, Any]] | None = None) -> list[tuple[Key, str]]:
        """The intents recorded under the run: (checkpoint key, path), from ``found`` or one fresh listing."""
        folder = join(self.run_path, PENDING_DIR)
        if found is not None:
            paths = [p for p in found if p.startswith(folder + "/") and found[p].get("type") != "directory"]
        else:
            try:
                paths = self.fs.ls(folder, detail=False, refresh=True)
            except FileNotFoundError:
                paths = []
        intents = []
        for path in paths:
            key = _intent_key(path.rstrip("/").rsplit("/", 1)[-1])
            if key is not None:
                intents.append((key, path))
        return intents

    @contextlib.contextmanager
    def change(self, key: Key) -> Iterator[None]:
        """Record an intent for ``key``, run the block (the manifest's change), then settle and drop the intent.

        The settle runs also when the block fails (it may have changed the manifest before failing). A settle
        that fails leaves the intent, which keeps the checkpoint visible to readers as it is.

        Args:
            key: the checkpoint to change.

        Raises:
            OSError: the intent could not be recorded (nothing was changed).
        """
        kind_dir, name = key
        intent = join(self.run_path, PENDING_DIR, f"{kind_dir}.{name}.{uuid.uuid4().hex}")
        data = json.dumps({"checkpoint": f"{kind_dir}/{name}"}).encode()
        for attempt in range(3):
            try:
                self.protocol.write_document(intent, data, None, 0)
                break
            except FileNotFoundError:  # a gc sweeping every temporary (older_than=0) took the one being written
                if attempt == 2:
                    raise
        try:
            yield
        finally:
            self._settle_and_drop(key, intent)

    def _settle_and_drop(self, key: Key, intent: str) -> None:
        try:
            settled = self.settle(key)
        except (OSError, CheckpointFormatError) as err:
            log.warning("Could not update the listing index %s (%s); its intent for %s stays", self.path, err, key)
            return
        if settled:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(intent)

    def settle(self, key: Key) -> bool:
        """Write the current manifest of ``key`` (or its absence) into the index, compare-and-swap.

        A missing or unusable index is first rebuilt from the manifests.

        Args:
            key: the checkpoint.

        Returns:
            Whether it was written (False: other writers kept winning the swap, the intent then stays).
        """
        for attempt in range(SETTLE_ATTEMPTS):
            current = self.protocol.read_document(self.path, MAX_INDEX_BYTES)
            parsed = self._parse(current[0]) if current is not None else None
            data = parsed[1] if parsed is not None else _data(self.scan())
            manifest = self._read([key]).get(key)  # after the index, in every attempt
            if manifest is None:
                data.pop(f"{key[0]}/{key[1]}", None)
            else:
                data[f"{key[0]}/{key[1]}"] = IndexEntry.data_of(manifest)
            if self._write(data, current[1] if current is not None else None):
                return True
            time.sleep(random.uniform(0, 0.01 * 2**attempt))
        return False

    def _write(self, checkpoints: dict[str, Any], version: str | None) -> bool:
        document = {
            "format": INDEX_FORMAT,
            "format_version": INDEX_FORMAT_VERSION,
            "run_id": self.run_id,
            "checkpoints": dict(sorted(checkpoints.items())),
        }
        raw = json.dumps(document, separators=(",", ":"), allow_nan=False).encode()
        return self.protocol.write_document(self.path, raw, version, MAX_INDEX_BYTES)

    def settle_stale_intents(self, found: dict[str, dict[str, Any]], now: float, older_than: float) -> int:
        """Settle the intents of writers that died (older than ``older_than`` at ``now``, the storage's clock)
        and remove them.

        Args:
            found: the run's fresh flat listing with details.
            now: the storage's current time.
            older_than: seconds.

        Returns:
            How many were settled and removed.
        """
        done = 0
        for key, path in self._intents(found):
            stamp = modified_time(found[path])
            if stamp is None or now - stamp < older_than or not self.settle(key):
                continue
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(path)
                done += 1
        return done

    def diverges(self, found: dict[str, dict[str, Any]]) -> bool:
        """Whether the index is missing, unusable, or holds other checkpoints than the manifests ``found`` lists.

        Args:
            found: the run's fresh flat listing.

        Returns:
            True if :meth:`rebuild` would change what listings return.
        """
        existing = {self._key_of(p) for p in found if is_manifest_path(p, self.run_path)}
        copies = self.load()
        return copies is None if not existing else copies is None or set(copies) != existing

    # -- repair -----------------------------------------------------------------------------------
    def rebuild(self, now: float) -> IndexReport:
        """Write the index afresh from the manifests (compare-and-swap against writers settling meanwhile), then
        settle intents older than :data:`STALE_INTENT_AFTER`.

        Args:
            now: the storage's current time (ages of intents are judged by it).

        Returns:
            What was found and written.

        Raises:
            CheckpointConflictError: writers kept changing the index while it was rebuilt.
        """
        for _ in range(SETTLE_ATTEMPTS):
            try:
                current = self.protocol.read_document(self.path, MAX_INDEX_BYTES)
            except CheckpointFormatError:
                raise CheckpointFormatError(
                    f"The listing index {self.path} is not a regular file; remove it, then run reindex again"
                ) from None
            parsed = self._parse(current[0]) if current is not None else None
            found = scan(self.fs, self.run_path)
            fresh = _data(self.scan(found))
            if self._write(fresh, current[1] if current is not None else None):
                settled = self.settle_stale_intents(found, now, STALE_INTENT_AFTER)
                old = parsed[1] if parsed is not None else None
                return _report(self.run_id, old, fresh, current is not None, settled)
        raise CheckpointConflictError(f"The listing index {self.path} kept changing while it was rebuilt; try again")


def _data(manifests: dict[Key, Manifest]) -> dict[str, Any]:
    """An index's ``checkpoints`` object for these manifests."""
    return {f"{kind_dir}/{name}": IndexEntry.data_of(m) for (kind_dir, name), m in manifests.items()}


def _report(run_id: str, old: dict[str, Any] | None, fresh: dict[str, Any], existed: bool, settled: int) -> IndexReport:
    before = old or {}
    added = sorted(fresh.keys() - before.keys())
    removed = sorted(before.keys() - fresh.keys())
    changed = sorted(k for k in fresh.keys() & before.keys() if fresh[k] != before[k])
    if old is None:
        previous = "invalid" if existed else "missing"
    else:
        previous = "stale" if added or removed or changed else "current"
    return IndexReport(run_id, previous, len(fresh), added, removed, changed, settled)


def _intent_key(file_name: str) -> Key | None:
    """The checkpoint an intent file ``<kind>.<name>.<32 hex>`` names, or None for anything else."""
    kind_dir, _, rest = file_name.partition(".")
    name, _, token = rest.rpartition(".")
    if len(token) != 32 or not all(c in "0123456789abcdef" for c in token) or not _valid_key(kind_dir, name):
        return None
    return kind_dir, name


def _valid_key(kind_dir: str, name: str) -> bool:
    """Whether ``kind_dir/name`` can be a checkpoint of a run (a kind folder and a valid name)."""
    try:
        validate_name(name, "checkpoint name")
    except ValueError:
        return False
    return kind_dir in KIND_DIRS


def index_for(protocol: CommitProtocol, checkpoint_path: str) -> tuple[RunIndex, Key] | None:
    """The index of the run a checkpoint folder belongs to, and the checkpoint's key in it.

    Args:
        protocol: the filesystem's commit protocol.
        checkpoint_path: ``<run>/<kind>/<name>`` in that filesystem.

    Returns:
        The index and key, or None for a checkpoint folder outside the ``<run>/<kind>/<name>`` layout.
    """
    parts = checkpoint_path.rstrip("/").rsplit("/", 3)
    if len(parts) != 4 or parts[2] not in KIND_DIRS:
        return None
    try:
        validate_name(parts[1], "run id")
        validate_name(parts[3], "checkpoint name")
    except ValueError:
        return None
    return RunIndex(protocol, f"{parts[0]}/{parts[1]}"), (parts[2], parts[3])
