"""A run's flat listing: which entries are committed manifests, what interrupted writes left behind, and which
of that is old enough for ``gc``.

Locally a leftover is a hidden ``.<name>.tmp-<uuid>`` / ``.<name>.deleting-<uuid>`` entry; on object stores,
where saves write in place, also the objects of a checkpoint folder without a manifest. Nothing here
deletes: :meth:`CheckpointStore.gc` removes what :func:`stale_leftovers` returns.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from datetime import datetime
from typing import Any

import fsspec

from ..format.layout import KIND_DIRS
from ..format.manifest import MANIFEST
from ..format.ttl import parse_duration
from .local import TEMP_ENTRY


def scan(fs: fsspec.AbstractFileSystem, run_path: str) -> dict[str, dict[str, Any]]:
    """A fresh flat listing of everything under a run's folder (folders included), with each entry's details.

    Args:
        fs: the root's filesystem.
        run_path: the run's folder in it.

    Returns:
        Path -> fsspec details (empty if the run has no folder).
    """
    fs.invalidate_cache(run_path)
    # s3fs's find caches every folder it lists, which invalidate_cache(run_path) leaves: a stale listing
    # of a checkpoint folder (e.g. taken mid-save) would later make its manifest read as missing.
    for cached in [p for p in fs.dircache if p.startswith(run_path.rstrip("/") + "/")]:
        fs.dircache.pop(cached, None)
    try:
        return fs.find(run_path, withdirs=True, detail=True)
    except FileNotFoundError:
        return {}


def stale_leftovers(
    found: dict[str, dict[str, Any]], run_path: str, in_place: bool, older_than: float | str, now: float
) -> dict[str, list[str]]:
    """Leftovers in one run's listing whose every entry is dated and older than ``older_than``: path -> entries.

    Args:
        found: the run's flat listing with details (fsspec ``find(..., withdirs=True, detail=True)``).
        run_path: the run's folder in the filesystem.
        in_place: whether saves write in place (object stores), so a folder without a manifest is a leftover.
        older_than: seconds, or a duration like ``"1d"``.
        now: the storage's current time (:meth:`CommitProtocol.now`: on object stores the server's clock,
            which dates the entries).

    Returns:
        Leftover path -> the listed entries in it.

    Raises:
        ValueError: ``older_than`` is not a valid age.
    """
    age = float(older_than) if isinstance(older_than, (int, float)) else parse_duration(older_than)
    if age is None or age < 0:
        raise ValueError(f"The age of leftovers to remove must be >= 0 seconds or like '1d', got {older_than!r}")
    cutoff = now - age
    stale = {}
    for unit, members in _leftover_units(found, run_path, in_place).items():
        times = [modified_time(found[m]) for m in members]
        if times and None not in times and max(t for t in times if t is not None) <= cutoff:
            stale[unit] = members
    return stale


def _leftover_units(found: dict[str, dict[str, Any]], run_path: str, in_place: bool) -> dict[str, list[str]]:
    """Group a run's listing into leftovers of interrupted writes: leftover path -> the listed entries in it.

    A hidden temporary entry (:data:`.local.TEMP_ENTRY`) at any depth is one; on object stores, where
    saves write in place, so is a checkpoint folder without a manifest. Local folders without a manifest
    were not written by a save (saves rename whole folders into place) and are left alone.
    """
    prefix = run_path.rstrip("/") + "/"
    units: dict[str, list[str]] = defaultdict(list)
    for path, info in found.items():
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix) :].split("/")
        temp = next((i for i, part in enumerate(parts) if TEMP_ENTRY.fullmatch(part)), None)
        if temp is not None:
            units[prefix + "/".join(parts[: temp + 1])].append(path)
        elif (
            in_place
            and len(parts) > 2
            and parts[0] in KIND_DIRS
            and info.get("type") != "directory"
            and f"{prefix}{parts[0]}/{parts[1]}/{MANIFEST}" not in found
        ):
            units[prefix + "/".join(parts[:2])].append(path)
    return units


def modified_time(info: dict[str, Any]) -> float | None:
    """When a listed entry last changed (seconds since the epoch), from the fields fsspec filesystems report.

    Locally that includes the status change time, which a rename updates: a folder just renamed away for
    deletion counts as fresh.
    """
    times = []
    for key in ("mtime", "created", "LastModified", "last_modified", "updated"):
        value = info.get(key)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if isinstance(value, datetime):
            times.append(value.timestamp())
        elif isinstance(value, (int, float)):
            times.append(float(value))
    return max(times, default=None)


def is_manifest_path(path: str, run_path: str) -> bool:
    """Whether ``path`` is ``<run_path>/<kind>/<name>/checkpoint.json`` of a visible checkpoint."""
    parts = path[len(run_path.rstrip("/")) + 1 :].split("/")
    return len(parts) == 3 and parts[0] in KIND_DIRS and not parts[1].startswith(".") and parts[2] == MANIFEST
