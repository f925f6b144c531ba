"""A vLLM LoRA resolver plugin: a request naming a checkpoint is served from ``$LORA_CKPT_ROOT``.

Installed next to vLLM (``pip install --no-deps -e .`` in vLLM's environment, plus ``s3fs`` for ``s3://``
roots) and enabled with ``VLLM_PLUGINS=lightning_lora_ckpt`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``
(vLLM consults resolvers only then), a completion request whose ``model`` is ``<run_id>/sampler_weights/<name>``
(or ``<run_id>/weights/<name>``, or the full ``lora://<run_id>/<kind>/<name>``), optionally followed by
``@<hex prefix of the content digest>`` to pin the content, is resolved against ``$LORA_CKPT_ROOT`` (any fsspec
root; s3fs reads its endpoint and credentials from the usual environment variables), verified, checked to be
trained on the served base, and loaded by vLLM: a checkpoint on a local root from its own directory, a remote one
from a verified download into ``$LORA_CKPT_CACHE_DIR/<content_sha256>`` (reused while intact), as ``hotload`` does
(:func:`~lightning_lora_ckpt.storage.archive.local_copy`). Anything else (a malformed or unknown name, a
soft-deleted, damaged or other-base checkpoint, a digest that does not match) resolves to nothing, which vLLM
answers with a 404, and one warning line giving the reason.

The decisions live in :class:`CheckpointResolver`, which imports no vLLM; :func:`register` (the plugin entry
point) wraps it in vLLM's ``LoRAResolver`` interface.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import threading
from collections.abc import Mapping
from typing import Any

from ..format.layout import (
    KIND_DIRS,
    ROOT_ENV,
    SCHEME,
    CheckpointType,
    checkpoint_uri,
    default_cache_dir,
    default_root,
    validate_name,
)
from ..format.manifest import Manifest
from ..format.strict_json import CheckpointFormatError
from ..storage.archive import local_copy
from ..storage.commit import deleted_error
from ..storage.read import read_manifest

#: The entry point's name under ``vllm.general_plugins`` (what ``VLLM_PLUGINS`` names).
PLUGIN_NAME = "lightning_lora_ckpt"
#: The name the resolver is registered under in vLLM's ``LoRAResolverRegistry``.
RESOLVER_NAME = "lightning-lora-ckpt"
#: The shortest and longest content-digest prefix a name may pin (``...@<hex>``).
MIN_DIGEST_PREFIX, MAX_DIGEST_PREFIX = 8, 64
_DIGEST = re.compile(r"[0-9a-f]+")

log = logging.getLogger(__name__)


class ResolveRefused(Exception):
    """A name this resolver does not serve; the message is the reason, logged as one warning line."""


@dataclasses.dataclass(frozen=True)
class CheckpointName:
    """A checkpoint as a request's ``model`` names it.

    Attributes:
        run_id: the run id.
        checkpoint_type: ``"sampler"`` (``sampler_weights/``) or ``"training"`` (``weights/``).
        name: the checkpoint's name.
        digest_prefix: the lowercase hex prefix of ``Manifest.content_sha256`` the name pins, or None.
    """

    run_id: str
    checkpoint_type: CheckpointType
    name: str
    digest_prefix: str | None = None

    def uri(self, root: str) -> str:
        """The checkpoint's directory under ``root``.

        Args:
            root: the checkpoint root (any fsspec URI or local path).

        Returns:
            ``<root>/<run_id>/{weights|sampler_weights}/<name>``.
        """
        return checkpoint_uri(root, self.run_id, self.checkpoint_type, self.name)


def parse_model_name(model: str) -> CheckpointName:
    """Parse a request's ``model``: ``[lora://]<run_id>/{sampler_weights|weights}/<name>[@<hex digest prefix>]``.

    Args:
        model: the ``model`` field of the request (vLLM's ``lora_name``).

    Returns:
        The checkpoint it names.

    Raises:
        ValueError: ``model`` is not in that form (the message says why).
    """
    if not isinstance(model, str):
        raise ValueError(f"model name {model!r} is not a string")
    path, at, digest = model.partition("@")
    parts = path.removeprefix(SCHEME).split("/")
    if len(parts) != 3 or parts[1] not in KIND_DIRS:
        raise ValueError(
            f"{model[:200]!r} is not a checkpoint name: expected <run_id>/sampler_weights/<name> or "
            "<run_id>/weights/<name> (optionally lora://... and @<hex prefix of its content digest>)"
        )
    run_id, name = validate_name(parts[0], "run id"), validate_name(parts[2], "checkpoint name")
    prefix = None
    if at:
        prefix = digest.lower()
        if not (MIN_DIGEST_PREFIX <= len(prefix) <= MAX_DIGEST_PREFIX and _DIGEST.fullmatch(prefix)):
            raise ValueError(
                f"{model[:200]!r}: the part after '@' must be {MIN_DIGEST_PREFIX}-{MAX_DIGEST_PREFIX} hex digits of "
                "the checkpoint's content digest"
            )
    return CheckpointName(run_id, KIND_DIRS[parts[1]], name, prefix)


class CheckpointResolver:
    """Resolves checkpoint names to verified local directories: what the vLLM plugin does, without vLLM.

    Thread-safe; concurrent resolutions of the same content wait for one download.

    Args:
        root: the checkpoint root (any fsspec URI or local path); ``$LORA_CKPT_ROOT`` (else ``./checkpoints``)
            if None.
        cache_dir: where verified copies of remote checkpoints are kept; ``$LORA_CKPT_CACHE_DIR`` (else
            ``~/.cache/lightning-lora-ckpt/vllm``) if None.
        storage_options: fsspec options of the root's filesystem (None: the filesystem's defaults and its
            environment variables, e.g. s3fs's ``AWS_*`` and fsspec's ``FSSPEC_S3_*``).
    """

    def __init__(
        self, root: str | None = None, cache_dir: str | None = None, storage_options: Mapping[str, Any] | None = None
    ) -> None:
        self.root = default_root(root)
        self.cache_dir = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
        self.storage_options = dict(storage_options or {})
        self._lock = threading.Lock()
        self._digest_locks: dict[str, threading.Lock] = {}
        self._base_fingerprints: dict[str, str | None] = {}

    def resolve(self, base_model_name: str, model: str) -> str:
        """The verified local directory vLLM should load ``model`` from, downloading it if needed.

        Args:
            base_model_name: the served base (vLLM's ``--model``: a local directory or a Hub id); a checkpoint
                trained on another base is refused when the base's ``config.json`` can be read.
            model: the request's ``model``: see :func:`parse_model_name`.

        Returns:
            The absolute path of the checkpoint's directory on a local root, else of its verified copy
            ``<cache_dir>/<content_sha256>``.

        Raises:
            ResolveRefused: the name is malformed or unknown, or the checkpoint is soft-deleted, damaged, of
                another base or of other content than the name pins; the message says which.
        """
        try:
            ref = parse_model_name(model)
        except ValueError as err:
            raise ResolveRefused(f"malformed name: {err}") from None
        uri = ref.uri(self.root)
        try:
            manifest = read_manifest(uri, self.storage_options)
        except CheckpointFormatError as err:
            raise ResolveRefused(f"unknown or unreadable checkpoint: {err}") from None
        except Exception as err:  # the storage itself failed (network, credentials)
            raise ResolveRefused(f"could not read {uri}: {type(err).__name__}: {err}") from None
        self._refuse_unservable(ref, uri, base_model_name, manifest)  # before anything is downloaded
        with self._lock:
            lock = self._digest_locks.setdefault(manifest.content_sha256, threading.Lock())
        with lock:  # concurrent resolutions of the same content wait for one download
            try:
                path, served = local_copy(uri, self.cache_dir, self.storage_options, verify=True)
            except CheckpointFormatError as err:
                raise ResolveRefused(f"damaged: {err}") from None
            except Exception as err:
                raise ResolveRefused(f"download of {uri} failed: {type(err).__name__}: {err}") from None
        if served.content_sha256 != manifest.content_sha256:  # replaced meanwhile: check the version served
            self._refuse_unservable(ref, uri, base_model_name, served)
        return path

    def _refuse_unservable(self, ref: CheckpointName, uri: str, base_model_name: str, manifest: Manifest) -> None:
        """Raise ``ResolveRefused`` if the version ``manifest`` describes is deleted, not the pinned content, or of
        another base than the served one."""
        digest = manifest.content_sha256
        if manifest.deleted_at is not None:
            raise ResolveRefused(f"deleted: {deleted_error(uri, manifest)}")
        if ref.digest_prefix is not None and not digest.startswith(ref.digest_prefix):
            raise ResolveRefused(
                f"content mismatch: {uri} has content digest {digest[:16]}, the name pins {ref.digest_prefix}"
            )
        served = self.base_fingerprint(base_model_name)
        if served is not None and served != manifest.base_model.fingerprint:
            raise ResolveRefused(
                f"other base: {uri} was trained on {manifest.base_model.name_or_path!r} (fingerprint "
                f"{manifest.base_model.fingerprint[:12]}), this server serves {base_model_name!r} (fingerprint {served[:12]})"
            )

    def base_fingerprint(self, base_model_name: str) -> str | None:
        """The config fingerprint of the served base, or None (no check) if its config cannot be read.

        Computed once per base; a local directory is read as it is, a Hub id only from the local Hub cache (no
        download on a request).

        Args:
            base_model_name: vLLM's ``--model``.

        Returns:
            ``modeling.base.config_fingerprint`` of its config, or None.
        """
        with self._lock:
            if base_model_name in self._base_fingerprints:
                return self._base_fingerprints[base_model_name]
        fingerprint = _base_fingerprint(base_model_name)
        with self._lock:
            self._base_fingerprints[base_model_name] = fingerprint
        return fingerprint


def _base_fingerprint(base_model_name: str) -> str | None:
    from ..modeling.base import base_fingerprint_of_dir  # imports transformers: vLLM has it imported already

    directory = base_model_name if os.path.isdir(base_model_name) else _hub_snapshot(base_model_name)
    fingerprint = base_fingerprint_of_dir(directory) if directory else None
    if fingerprint is None:
        log.warning(
            "lightning-lora-ckpt: the served base %s has no readable config.json here (a model directory, or a Hub "
            "id in the local Hub cache); checkpoints are not checked against it",
            base_model_name,
        )
    return fingerprint


def _hub_snapshot(repo_id: str) -> str | None:
    """The local Hub cache's snapshot directory of ``repo_id`` holding its ``config.json``, or None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        config = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # not a valid repo id
        return None
    return os.path.dirname(config) if isinstance(config, str) else None


def lora_int_id(digest: str) -> int:
    """A positive id for vLLM's ``LoRARequest`` (vLLM replaces it with its own counter when it loads one).

    Args:
        digest: the checkpoint's content digest (hex).

    Returns:
        A positive int derived from ``digest``.
    """
    return int(digest[:15], 16) + 1 if _DIGEST.fullmatch(digest[:15]) else 1


def make_vllm_resolver(resolver: CheckpointResolver, logger: logging.Logger | None = None) -> Any:
    """Wrap ``resolver`` in vLLM's ``LoRAResolver`` interface (imports vLLM).

    Args:
        resolver: what resolves names to local copies.
        logger: where refusals are logged (one warning line each); this module's logger if None.

    Returns:
        A ``vllm.lora.resolver.LoRAResolver`` whose ``resolve_lora`` runs ``resolver.resolve`` in a thread
        (never blocking vLLM's event loop) and returns a ``LoRARequest`` for the local copy, or None.
    """
    import asyncio

    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver

    out = logger or log

    class LoraCkptResolver(LoRAResolver):
        """Serves ``<run_id>/<kind>/<name>[@digest]`` from the checkpoint root (lightning-lora-ckpt)."""

        def __init__(self) -> None:
            self.resolver = resolver

        async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
            try:
                path = await asyncio.to_thread(self.resolver.resolve, base_model_name, lora_name)
            except ResolveRefused as refused:
                out.warning("lightning-lora-ckpt: not serving %r: %s", lora_name[:200], refused)
                return None
            except Exception as err:  # never take the server down over one request
                out.warning("lightning-lora-ckpt: not serving %r: %s: %s", lora_name[:200], type(err).__name__, err)
                return None
            out.info("lightning-lora-ckpt: serving %r from %s", lora_name, path)
            # The directory's name is the content digest for a cached copy (vLLM assigns its own id anyway).
            return LoRARequest(lora_name=lora_name, lora_int_id=lora_int_id(os.path.basename(path)), lora_path=path)

    return LoraCkptResolver()


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the resolver with vLLM if ``$LORA_CKPT_ROOT`` is set.

    vLLM calls it in each of its processes (the API server is the one that asks resolvers), possibly more
    than once: a second call in a process does nothing.
    """
    from vllm.logger import init_logger
    from vllm.lora.resolver import LoRAResolverRegistry

    logger = init_logger(f"vllm.plugins.{PLUGIN_NAME}")  # vLLM's handler and format
    if not os.environ.get(ROOT_ENV):
        named = PLUGIN_NAME in (os.environ.get("VLLM_PLUGINS") or "").split(",")
        (logger.warning if named else logger.debug)(
            "lightning-lora-ckpt: %s is not set; the checkpoint resolver is not registered", ROOT_ENV
        )
        return
    if RESOLVER_NAME in LoRAResolverRegistry.get_supported_resolvers():
        return
    if os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "0").strip().lower() not in ("1", "true"):
        logger.warning(
            "lightning-lora-ckpt: VLLM_ALLOW_RUNTIME_LORA_UPDATING is not True: vLLM never asks the checkpoint "
            "resolver, so checkpoint names get 404"
        )
    resolver = CheckpointResolver()
    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, make_vllm_resolver(resolver, logger))
    logger.info(
        "lightning-lora-ckpt: resolving checkpoint names against %s (cache %s)", resolver.root, resolver.cache_dir
    )
