"""``hotload``: load a committed checkpoint's adapter into a running vLLM server, under a name carrying its content.

vLLM keeps prefix-cache blocks by adapter name, so a name reused for other weights would serve stale blocks: each
adapter is loaded as ``<run>/<kind>/<name>@<first 12 hex digits of its content digest>``, a name no other
content gets. The served identity (run, name, digest, vLLM name) is checked against ``/v1/models`` after the load.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Iterable
from typing import Any

from ..format.layout import TYPE_DIRS, default_cache_dir, resolve
from ..format.manifest import Manifest
from ..storage.archive import local_copy
from ..storage.loading import open_checkpoint
from .base import base_fingerprint_of_dir
from .sampling import AdapterIdentity
from .servable import servable_report
from .vllm_client import DEFAULT_TIMEOUT_S, VLLMClient, VLLMServerError

log = logging.getLogger(__name__)

#: Hex digits of the content digest in a served name.
DIGEST_CHARS = 12
_SERVED_NAME = re.compile(r"^(?P<run>[^/]+)/(?P<kind>[^/]+)/(?P<name>[^/@]+)@(?P<digest>[0-9a-f]+)$")


@dataclasses.dataclass(frozen=True)
class ServedAdapter:
    """A checkpoint's adapter as a vLLM server serves it.

    Attributes:
        run_id: the checkpoint's run.
        name: the checkpoint's name.
        checkpoint_id: ``<kind>/<name>``, e.g. ``sampler_weights/000100``.
        uri: the checkpoint's URI.
        content_sha256: its content digest (``Manifest.content_sha256``).
        vllm_name: the model name requests use.
        base_url: the server.
        lora_path: the directory the server loaded it from.
    """

    run_id: str
    name: str
    checkpoint_id: str
    uri: str
    content_sha256: str
    vllm_name: str
    base_url: str
    lora_path: str

    @property
    def identity(self) -> AdapterIdentity:
        """The checkpoint identity, as ``SamplingClient.identity`` reports it."""
        return AdapterIdentity(self.run_id, self.name, self.uri, self.content_sha256)


def served_name(manifest: Manifest) -> str:
    """The vLLM model name of a checkpoint's adapter: ``<run>/<kind>/<name>@<digest prefix>``.

    Args:
        manifest: the checkpoint's manifest.

    Returns:
        The name.
    """
    kind = TYPE_DIRS[manifest.checkpoint_type]
    return f"{manifest.run_id}/{kind}/{manifest.name}@{manifest.content_sha256[:DIGEST_CHARS]}"


def digest_of_served_name(vllm_name: str) -> str | None:
    """The digest prefix a served name carries, or None for a name not made by :func:`served_name`.

    Args:
        vllm_name: a vLLM model name.

    Returns:
        The hex digest prefix, or None.
    """
    match = _SERVED_NAME.match(vllm_name)
    return match["digest"] if match else None


def hotload(
    uri: str | os.PathLike[str],
    base_url: str,
    *,
    unload: Iterable[str] = (),
    max_lora_rank: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    root: str | None = None,
    storage_options: dict[str, Any] | None = None,
    api_key: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> ServedAdapter:
    """Load the checkpoint's adapter into the vLLM server at ``base_url`` and check that it is served.

    The checkpoint is verified and checked servable first (:func:`~.servable.check_servable`). A checkpoint on
    a local filesystem is handed to the server by its path; a remote one (``s3://``, ``gs://``, ...) is downloaded
    and verified into ``cache_dir`` first, for a server on this machine. If the server's base model is a local
    directory, the checkpoint must have been trained on it (same config fingerprint). An adapter already served
    under its name is not loaded again. Then the names in ``unload`` are unloaded (ones already gone are skipped).

    Args:
        uri: a sampler or training checkpoint (any fsspec URI, local path or ``lora://``).
        base_url: the server, e.g. ``http://127.0.0.1:8000`` (started with ``--enable-lora`` and
            ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``).
        unload: served names to unload after the new adapter is served (e.g. older checkpoints).
        max_lora_rank: the server's ``--max-lora-rank``, checked before the request; None leaves it to vLLM.
        cache_dir: where remote checkpoints are downloaded (:func:`default_cache_dir` if None).
        root: where ``lora://`` URIs resolve.
        storage_options: fsspec options of the checkpoint's filesystem.
        api_key: the server's ``--api-key``, if any.
        timeout_s: the most seconds each request may take.

    Returns:
        What the server now serves.

    Raises:
        CheckpointFormatError: the checkpoint is missing, damaged or malformed.
        NotServableError: (a ``ValueError``) vLLM cannot serve the adapter; nothing was sent.
        ValueError: the server's base model is not the checkpoint's base.
        VLLMServerError: the server is unreachable, refused the load, or does not list the adapter after it.
    """
    resolved = resolve(uri, root)
    path, _ = local_copy(resolved, cache_dir or default_cache_dir(), storage_options)
    opened = open_checkpoint(path)  # verified, and the version the server will read
    servable_report(opened, max_lora_rank, raise_if_not=True)
    client = VLLMClient(base_url, api_key=api_key, timeout_s=timeout_s)
    try:
        _check_base(client, opened.manifest, resolved)
        name = served_name(opened.manifest)
        if name not in {card["id"] for card in client.models()}:
            client.load_adapter(name, path)
        cards = {card["id"]: card for card in client.models()}
        if name not in cards:
            raise VLLMServerError(f"vLLM at {client.base_url} accepted {name} but does not list it in /v1/models")
        for old in unload:
            if old != name and old in cards:
                client.unload_adapter(old)
    finally:
        client.close()
    m = opened.manifest
    kind = TYPE_DIRS[m.checkpoint_type]
    return ServedAdapter(m.run_id, m.name, f"{kind}/{m.name}", resolved, m.content_sha256, name, client.base_url, path)


def _check_base(client: VLLMClient, manifest: Manifest, uri: str) -> None:
    """Refuse a checkpoint of another base when the server's base is a directory this process can read."""
    root = client.base_model().get("root") or ""
    fingerprint = base_fingerprint_of_dir(root)
    if fingerprint is None:
        log.debug("vLLM's base %r is not a local directory with a readable config here; it is not checked", root)
        return
    if fingerprint != manifest.base_model.fingerprint:
        raise ValueError(
            f"Checkpoint {uri} was trained on base model {manifest.base_model.name_or_path!r} (fingerprint "
            f"{manifest.base_model.fingerprint[:12]}), but vLLM at {client.base_url} serves {root!r} (fingerprint "
            f"{fingerprint[:12]}); start vLLM with the checkpoint's base"
        )
