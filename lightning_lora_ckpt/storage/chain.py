"""Snapshot chains in storage (``format.snapshots``): rebuilding a delta's full weights through its chain.

A delta's chain is walked on manifests alone, from the delta to its base, before a byte of weights is read: each
parent must be a full-parameter sampler checkpoint of the same run and base whose full weight files are exactly the
ones the child was taken against (so a parent replaced, rewritten or forged is refused), the chain must end within
``MAX_CHAIN`` links and never come back to a checkpoint it passed (a cycle). Then each weight file is read once
from the link that stores it whole, every delta is XORed into that one buffer in place (``apply_delta``, which
refuses a delta stating another size than the buffer's before decompressing anything), and the result is checked
against the digest the delta's manifest records for the full file.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..format.digests import digest_hex
from ..format.files import ReadBytes
from ..format.layout import join
from ..format.manifest import Manifest
from ..format.snapshot_delta import apply_delta
from ..format.snapshots import MAX_CHAIN, delta_name
from ..format.strict_json import CheckpointFormatError
from .dependents import Link, sibling
from .read import check_file, manifest_if_any, read_files


def chain_of(uri: str, manifest: Manifest, storage_options: Mapping[str, Any] | None = None) -> list[Link]:
    """The links from the checkpoint at ``uri`` to the base of its chain (itself first), checked on their manifests.

    Args:
        uri: the checkpoint directory's URI.
        manifest: its manifest.
        storage_options: fsspec options of the filesystem.

    Returns:
        The chain, the checkpoint first and its base last (one link if it is not a delta).

    Raises:
        CheckpointFormatError: naming the links: a parent is missing or its manifest is invalid, is not a
            full-parameter sampler checkpoint of the same run and base, does not hold the files the child was taken
            against, the chain comes back to a checkpoint it passed, or it is longer than ``MAX_CHAIN``.
    """
    links, seen = [Link(uri, manifest)], {manifest.name}
    while links[-1].manifest.snapshot == "delta":
        child = links[-1]
        name = child.manifest.parent or ""
        if name in seen:
            raise CheckpointFormatError(
                f"Snapshot chain of {uri} is a cycle: {child.uri} is a delta of {name}, which is already in the chain"
            )
        if len(links) > MAX_CHAIN:
            raise CheckpointFormatError(
                f"Snapshot chain of {uri} is longer than {MAX_CHAIN} links; refusing to follow it"
            )
        parent_uri = sibling(child.uri, name)
        parent = manifest_if_any(parent_uri, storage_options)
        if parent is None:
            raise CheckpointFormatError(
                f"Snapshot {child.uri} is a delta of {parent_uri}, which is missing: its weights cannot be rebuilt"
            )
        problem = link_problem(child.manifest, parent)
        if problem:
            raise CheckpointFormatError(
                f"Snapshot {child.uri} cannot be rebuilt from its parent {parent_uri}: {problem}"
            )
        seen.add(name)
        links.append(Link(parent_uri, parent))
    return links


def link_problem(child: Manifest, parent: Manifest) -> str | None:
    """Why ``parent`` is not the checkpoint the delta ``child`` was taken against, or None.

    Args:
        child: a delta's manifest.
        parent: the manifest found under its ``parent`` name.

    Returns:
        A one-line reason, or None.
    """
    if parent.checkpoint_type != "sampler" or not parent.full_parameter:
        return "the parent is not a full-parameter sampler checkpoint"
    if parent.run_id != child.run_id:
        return f"the parent belongs to run {parent.run_id!r}, the delta to {child.run_id!r}"
    if parent.base_model.fingerprint != child.base_model.fingerprint:
        return f"the parent was trained on base {parent.base_model.name_or_path!r}, another base than the delta's"
    full = parent.full_files
    for weights, entry in sorted(child.parent_files.items()):
        if full.get(weights) != entry:
            return f"its {weights} is not the file the delta was taken against (the parent was replaced or rewritten)"
    return None


def rebuild_weights(
    uri: str,
    manifest: Manifest,
    files: dict[str, ReadBytes],
    storage_options: Mapping[str, Any] | None = None,
    *,
    check_links: bool = False,
) -> dict[str, ReadBytes]:
    """The files of the model directory a checkpoint stands for: a delta's weight files rebuilt through its chain.

    Args:
        uri: the checkpoint directory's URI.
        manifest: its manifest.
        files: the verified bytes of its files (a delta's ``<file>.xor.zst`` among them).
        storage_options: fsspec options of the filesystem.
        check_links: also check each intermediate link's rebuilt files against its manifest (``verify``); the
            last one is always checked.

    Returns:
        ``files`` itself unless the checkpoint is a delta; else its whole files and the rebuilt weight files, by name.

    Raises:
        CheckpointFormatError: the chain is refused (:func:`chain_of`), a link's file is missing or damaged, a
            delta does not fit its parent's file, or a rebuilt file differs from its manifest's digest.
    """
    if manifest.snapshot != "delta":
        return files
    links = chain_of(uri, manifest, storage_options)
    stored = {delta_name(w) for w in manifest.rebuilds}
    full = {name: data for name, data in files.items() if name not in stored}
    weights = sorted(manifest.rebuilds)
    with ThreadPoolExecutor(max_workers=max(1, min(len(weights), 2)), thread_name_prefix="lora-ckpt-chain") as pool:
        rebuilt = pool.map(lambda w: _rebuild(w, links, files, storage_options, check_links), weights)
        full.update(zip(weights, rebuilt, strict=True))
    return full


def _rebuild(
    weights: str,
    links: list[Link],
    files: dict[str, ReadBytes],
    storage_options: Mapping[str, Any] | None,
    check_links: bool,
) -> ReadBytes:
    """One weight file: read whole from the nearest link that stores it so, then every delta applied in place."""
    deltas = []
    for link in links:
        if weights not in link.manifest.rebuilds:
            break
        deltas.append(link)
    start = links[len(deltas)] if len(deltas) < len(links) else None
    if start is None or weights not in start.manifest.files:
        raise CheckpointFormatError(f"Snapshot chain of {links[0].uri} stores {weights} whole nowhere")
    buffer = _writable(read_files(start.uri, start.manifest, [weights], storage_options)[weights])
    name = delta_name(weights)
    for link in reversed(deltas):
        delta = files[name] if link is links[0] else read_files(link.uri, link.manifest, [name], storage_options)[name]
        apply_delta(buffer, delta, join(link.uri, name))
        if check_links or link is links[0]:
            expected = link.manifest.rebuilds[weights]
            check_file(link.uri, f"{weights} (rebuilt)", expected, len(buffer), digest_hex(buffer, expected.algorithm))
    return buffer


def _writable(data: ReadBytes) -> memoryview:
    """``data`` as a writable buffer: itself if it is one, else a copy."""
    if isinstance(data, memoryview) and not data.readonly:
        return data
    return memoryview(bytearray(data))
