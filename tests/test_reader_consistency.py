"""Readers during an overwrite see the old checkpoint or the new one, whole (docs/crash-safety.md).

A writer process keeps overwriting one checkpoint with two versions, A and B, while this process loads it
again and again with ``open_checkpoint`` (the one way every loader opens a checkpoint) and verifies it: every
load must be exactly A or exactly B and none reported damaged. On an object store an overwrite deletes the
manifest before uploading the new files, so a load that *starts* in that window finds no checkpoint ("No
checkpoint at ..."); those are counted apart and allowed. For comparison, the same loop also reads the manifest
and the files in two plain steps (``read_manifest`` then ``read_files``), which is what every loader did before
and what reported a good checkpoint damaged.

Then the cases the retry must not hide or stretch: a checkpoint really damaged (a file edited, the manifest
unchanged, or only its metadata changed since) is reported at once, not after a poll; one deleted while it is
read gives the clear error within the deadline; one whose new manifest appears during the wait is read in its
new version; one replaced on every attempt gives up after the bounded number of attempts.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from helpers.overwrites import VERSIONS, overwriting, save_version, version_of
from lightning_lora_ckpt import CheckpointStore
from lightning_lora_ckpt.format.manifest import ADAPTER_WEIGHTS, Manifest
from lightning_lora_ckpt.format.strict_json import CheckpointFormatError
from lightning_lora_ckpt.storage.commit import delete_checkpoint
from lightning_lora_ckpt.storage.fs import url_to_fs
from lightning_lora_ckpt.storage.loading import open_checkpoint
from lightning_lora_ckpt.storage.read import read_checkpoint, read_files, read_manifest
from lightning_lora_ckpt.storage.verify import verify_checkpoint

RUN, NAME = "readers", "latest"
LOAD_SECONDS = {"local": 6.0, "s3": 8.0}  # how long the loads race the writer
#: The writer's pause after each commit, at most: on S3 an overwrite leaves no manifest from its start to its end,
#: so back-to-back overwrites would leave almost no moment for a load to start in.
PAUSE_S = {"local": 0.05, "s3": 0.3}
NO_MANIFEST = "No checkpoint at"
GAVE_UP = "times while it was read; retry"  # replaced on every attempt: a clear error, not a damaged checkpoint
READERS = 3  # reader threads: more loads in flight when an overwrite starts


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str, dict[str, Any]]:
    """(name, root, storage_options) of a fresh root on a local folder or on the loopback moto S3 server."""
    if request.param == "local":
        return "local", str(tmp_path / "root"), {}
    server = request.getfixturevalue("s3_server")
    return "s3", f"s3://{server['bucket']}/{uuid.uuid4().hex}", server["storage_options"]


def _race(uri: str, options: dict[str, Any], end: float) -> tuple[Counter[str], list[str]]:
    """One reader until ``end``: loads, every fourth a verify, each followed by a two-step read for comparison.

    Returns:
        The outcome counts (``load A``, ``load B``, ``load no manifest``, ``load damaged``, and the same for
        ``verify`` and ``two-step``) and the message of each wrong outcome.
    """
    counts: Counter[str] = Counter()
    wrong: list[str] = []
    k = 0
    while time.monotonic() < end:
        k += 1
        kind = "verify" if k % 4 == 0 else "load"
        try:
            if kind == "verify":  # it reports on the version it ended up reading
                report = verify_checkpoint(uri, options)
                counts["verify ok" if report.ok else "verify damaged"] += 1
                if not report.ok:
                    wrong.append(f"verify: {report.problems}")
            else:
                opened = open_checkpoint(uri, storage_options=options, with_state=None)
                counts["load " + "AB"[version_of(opened) - 1]] += 1  # an AssertionError if mixed
        except CheckpointFormatError as err:
            outcome = "no manifest" if NO_MANIFEST in str(err) else "gave up" if GAVE_UP in str(err) else "damaged"
            counts[f"{kind} {outcome}"] += 1
            if outcome == "damaged":
                wrong.append(f"{kind}: {err}")
            elif outcome == "no manifest":
                time.sleep(0.01)  # an S3 overwrite is uploading: let the server (a thread of this process) serve it
        try:  # the old way: manifest and files in two separate reads, no retry (not asserted)
            manifest = read_manifest(uri, options)
            read_files(uri, manifest, list(manifest.files), options)
            counts["two-step ok"] += 1
        except CheckpointFormatError as err:
            counts["two-step no manifest" if NO_MANIFEST in str(err) else "two-step damaged"] += 1
    return counts, wrong


@pytest.mark.stress
def test_loads_during_overwrites_are_one_version_whole(
    backend: tuple[str, str, dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    name, root, options = backend
    uri = save_version(root, options, RUN, NAME, VERSIONS[0])
    caplog.set_level(logging.DEBUG, logger="lightning_lora_ckpt.storage.read")
    max_seconds = LOAD_SECONDS[name] + 30
    with overwriting(root, options, RUN, NAME, max_seconds, PAUSE_S[name]) as writer:
        first_commit, end = writer.count, time.monotonic() + LOAD_SECONDS[name]
        with ThreadPoolExecutor(READERS) as pool:
            results = list(pool.map(lambda _: _race(uri, options, end), range(READERS)))
        overwrites = writer.count - first_commit
    counts = sum((c for c, _ in results), Counter[str]())
    wrong = [w for _, ws in results for w in ws]
    retries = sum("was replaced while it was read" in r.getMessage() for r in caplog.records)
    loads = sum(n for key, n in counts.items() if key.startswith("load "))
    verifies = sum(n for key, n in counts.items() if key.startswith("verify "))
    print(
        f"\n[{name}] {overwrites} overwrites in {LOAD_SECONDS[name]:.0f} s, {READERS} reader threads; "
        f"open_checkpoint: {loads} loads = {counts['load A']} A + {counts['load B']} B + "
        f"{counts['load no manifest']} no manifest + {counts['load gave up']} gave up + {counts['load damaged']} damaged; "
        f"verify: {verifies} = {counts['verify ok']} ok + {counts['verify no manifest']} no manifest + "
        f"{counts['verify gave up']} gave up + {counts['verify damaged']} damaged; "
        f"{retries} re-reads after a replacement; the two-step read for comparison: {counts['two-step ok']} ok, "
        f"{counts['two-step damaged']} damaged, {counts['two-step no manifest']} no manifest"
    )
    assert not wrong, wrong[:5]
    assert counts["load A"] and counts["load B"] and overwrites >= 4, counts


@pytest.fixture(params=["local", "memory"])
def store_root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh root on the local disk or on ``memory://`` (the object-store protocol, manifest last)."""
    return str(tmp_path / "root") if request.param == "local" else f"memory://{uuid.uuid4().hex}"


def _edit_weights(uri: str) -> None:
    """Flip one byte of the adapter weights, keeping their size (the manifest is left as it is)."""
    fs, path = url_to_fs(uri)
    target = f"{path}/{ADAPTER_WEIGHTS}"
    data = bytearray(fs.cat_file(target))
    data[-1] ^= 0xFF
    fs.pipe_file(target, bytes(data))


def test_real_damage_is_reported_at_once(store_root: str) -> None:
    uri = save_version(store_root, {}, RUN, NAME, VERSIONS[0])
    _edit_weights(uri)
    started = time.monotonic()
    with pytest.raises(CheckpointFormatError, match=rf"is damaged: {ADAPTER_WEIGHTS} has"):
        open_checkpoint(uri, deadline_s=30)
    report = verify_checkpoint(uri, deadline_s=30)
    assert not report.ok and ADAPTER_WEIGHTS in report.problems[0]
    assert time.monotonic() - started < 5  # no poll, no retry


def test_damage_with_only_metadata_changed_meanwhile_is_real(store_root: str) -> None:
    """A TTL set between the two manifest reads changes the manifest but not the commit: still damaged."""
    uri = save_version(store_root, {}, RUN, NAME, VERSIONS[0])
    _edit_weights(uri)
    calls: list[Manifest] = []

    def names(manifest: Manifest) -> list[str]:
        if not calls:
            CheckpointStore(store_root).set_ttl(uri, 3600)
        calls.append(manifest)
        return list(manifest.files)

    with pytest.raises(CheckpointFormatError, match="is damaged"):
        read_checkpoint(uri, names, deadline_s=30)
    assert len(calls) == 1


def test_deleted_while_read_is_a_clear_error_within_the_deadline(store_root: str) -> None:
    uri = save_version(store_root, {}, RUN, NAME, VERSIONS[0])

    def delete_first(manifest: Manifest) -> list[str]:
        delete_checkpoint(uri)  # between the manifest read and the file reads
        return list(manifest.files)

    started = time.monotonic()
    with pytest.raises(CheckpointFormatError, match=r"was deleted or is being replaced while it was read.*retry"):
        read_checkpoint(uri, delete_first, deadline_s=0.5)
    assert 0.5 <= time.monotonic() - started < 5


def test_new_manifest_appearing_during_the_wait_is_read_whole(store_root: str) -> None:
    """An object-store overwrite as the reader meets it: the old version gone, the new one's manifest later."""
    uri = save_version(store_root, {}, RUN, NAME, VERSIONS[0])
    calls: list[int] = []

    def replace_slowly(manifest: Manifest) -> list[str]:
        calls.append(manifest.step)
        if len(calls) == 1:
            delete_checkpoint(uri)
            timer = threading.Timer(0.3, save_version, (store_root, {}, RUN, NAME, VERSIONS[1]))
            timer.start()
        return list(manifest.files)

    manifest, files = read_checkpoint(uri, replace_slowly, deadline_s=20)
    assert calls == [VERSIONS[0], VERSIONS[1]] and manifest.step == VERSIONS[1]
    assert version_of(open_checkpoint(uri, with_state=None)) == VERSIONS[1]
    assert set(files) == set(manifest.files)


def test_replaced_on_every_attempt_gives_up_after_the_bounded_attempts(store_root: str) -> None:
    uri = save_version(store_root, {}, RUN, NAME, VERSIONS[0])
    calls: list[int] = []

    def replace_each_time(manifest: Manifest) -> list[str]:
        calls.append(manifest.step)
        save_version(store_root, {}, RUN, NAME, VERSIONS[len(calls) % 2])  # B, A, B: each a new commit
        return list(manifest.files)

    with pytest.raises(CheckpointFormatError, match=r"was replaced 3 times while it was read"):
        read_checkpoint(uri, replace_each_time, deadline_s=5, max_attempts=3)
    assert calls == [1, 2, 1]
