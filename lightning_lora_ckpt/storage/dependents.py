"""The deltas that need a snapshot (``format.snapshots``): what deletions and overwrites check before they remove it.

Found from the manifests of the snapshot's folder, through the commit protocol (not the listing index, which may
have lost an entry): only full-parameter snapshots have dependents, and they are few.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

from ..format.layout import join, validate_name
from ..format.manifest import MANIFEST, Manifest
from ..format.strict_json import CheckpointFormatError
from .protocol import CommitProtocol


@dataclasses.dataclass(frozen=True)
class Link:
    """One checkpoint of a snapshot chain.

    Attributes:
        uri: its directory's URI.
        manifest: its manifest, as read when the chain was walked.
    """

    uri: str
    manifest: Manifest


def sibling(uri: str, name: str) -> str:
    """The URI (or path) of the checkpoint ``name`` in the same folder (run and type) as the one at ``uri``.

    Args:
        uri: a checkpoint directory's URI or path.
        name: another checkpoint's name.

    Returns:
        Its URI (or path).
    """
    return join(uri.rstrip("/").rsplit("/", 1)[0], name)


def dependents(protocol: CommitProtocol, uri: str, path: str, manifest: Manifest) -> list[Link]:
    """The deltas that name the checkpoint at ``uri`` as their parent, soft-deleted ones included.

    Args:
        protocol: the commit protocol of its filesystem.
        uri: the checkpoint directory's URI.
        path: the same directory in ``protocol.fs``.
        manifest: its manifest.

    Returns:
        The dependent deltas; none unless the checkpoint is a full-parameter snapshot.
    """
    if manifest.snapshot is None:
        return []
    folder = path.rstrip("/").rsplit("/", 1)[0]
    names = sorted({p.rstrip("/").rsplit("/", 1)[-1] for p in protocol.fs.ls(folder, detail=False)} - {manifest.name})

    def child(name: str) -> Link | None:
        try:
            validate_name(name)
            found = protocol.read_manifest(sibling(uri, name), sibling(path, name))
            other = Manifest.from_json(found[0], join(sibling(uri, name), MANIFEST)) if found else None
        except (ValueError, CheckpointFormatError):  # a hidden temporary, or a damaged neighbour
            return None
        if other is None or other.snapshot != "delta" or other.parent != manifest.name:
            return None
        return Link(sibling(uri, name), other)

    with ThreadPoolExecutor(max_workers=max(1, min(len(names), 8)), thread_name_prefix="lora-ckpt-chain") as pool:
        return [link for link in pool.map(child, names) if link is not None]
