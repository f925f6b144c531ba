"""A vLLM LoRA resolver plugin: a request naming a checkpoint is served from ``$LORA_CKPT_ROOT``.

Installed next to vLLM (``pip install --no-deps -e .`` in vLLM's environment, plus ``s3fs`` for ``s3://``
roots) and enabled with ``VLLM_PLUGINS=lightning_lora_ckpt`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``
(vLLM consults resolvers only then), a completion request whose ``model`` is ``<run_id>/sampler_weights/<name>``
(or ``<run_id>/weights/<name>``, or the full ``lora://<run_id>/<kind>/<name>``), optionally followed by
``@<hex prefix of the content digest>`` to pin the content, is resolved against ``$LORA_CKPT_ROOT`` (any fsspec
root; s3fs reads its endpoint and credentials from the usual environment variables), downloaded and verified
into ``$LORA_CKPT_CACHE_DIR/<content_sha256>`` (reused when already there and still verifying), checked to be
trained on the served base, and loaded by vLLM from there. Anything else (a malformed or unknown name, a
soft-deleted, damaged or other-base checkpoint, a digest that does not match) resolves to nothing, which vLLM
answers with a 404, and one warning line giving the reason.

The decisions live in :class:`CheckpointResolver`, which imports no vLLM; :func:`register` (the plugin entry
point) wraps it in vLLM's ``LoRAResolver`` interface.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Mapping
from typing import Any

from ..format.layout import KIND_DIRS, ROOT_ENV, SCHEME, CheckpointType, checkpoint_uri, default_root, validate_name
from ..format.manifest import MANIFEST, MAX_MANIFEST_BYTES, Manifest
from ..format.strict_json import CheckpointFormatError
from ..storage.archive import download
from ..storage.commit import deleted_error
from ..storage.read import check_file, read_manifest

#: The entry point's name under ``vllm.general_plugins`` (what ``VLLM_PLUGINS`` names).
PLUGIN_NAME = "lightning_lora_ckpt"
#: The name the resolver is registered under in vLLM's ``LoRAResolverRegistry``.
RESOLVER_NAME = "lightning-lora-ckpt"
#: Where downloaded checkpoints are kept, one directory per content digest.
CACHE_ENV = "LORA_CKPT_CACHE_DIR"
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "lightning-lora-ckpt", "vllm")
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
    """Resolves checkpoint names to verified local copies: what the vLLM plugin does, without vLLM.

    Thread-safe; concurrent resolutions of the same content wait for one download.

    Args:
        root: the checkpoint root (any fsspec URI or local path); ``$LORA_CKPT_ROOT`` (else ``./checkpoints``)
            if None.
        cache_dir: where verified copies are kept; ``$LORA_CKPT_CACHE_DIR`` (else
            ``~/.cache/lightning-lora-ckpt/vllm``) if None.
        storage_options: fsspec options of the root's filesystem (None: the filesystem's defaults and its
            environment variables, e.g. s3fs's ``AWS_*`` and fsspec's ``FSSPEC_S3_*``).
    """

    def __init__(
        self, root: str | None = None, cache_dir: str | None = None, storage_options: Mapping[str, Any] | None = None
    ) -> None:
        self.root = default_root(root)
        self.cache_dir = os.path.abspath(
            os.path.expanduser(cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR)
        )
        self.storage_options = dict(storage_options or {})
        self._lock = threading.Lock()
        self._digest_locks: dict[str, threading.Lock] = {}
        self._base_fingerprints: dict[str, str | None] = {}

    def resolve(self, base_model_name: str, model: str) -> str:
        """The local directory vLLM should load ``model`` from, downloading and verifying it if needed.

        Args:
            base_model_name: the served base (vLLM's ``--model``: a local directory or a Hub id); a checkpoint
                trained on another base is refused when the base's ``config.json`` can be read.
            model: the request's ``model``: see :func:`parse_model_name`.

        Returns:
            The absolute path of the verified copy: ``<cache_dir>/<content_sha256>``.

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
        digest = manifest.content_sha256
        if manifest.deleted_at is not None:
            raise ResolveRefused(f"deleted: {deleted_error(uri, manifest)}")
        if ref.digest_prefix is not None and not digest.startswith(ref.digest_prefix):
            raise ResolveRefused(
                f"content mismatch: {uri} has content digest {digest[:16]}, the name pins {ref.digest_prefix}"
            )
        self._check_base(base_model_name, manifest, uri)
        return self._cached_copy(uri, manifest)

    def _check_base(self, base_model_name: str, manifest: Manifest, uri: str) -> None:
        served = self.base_fingerprint(base_model_name)
        if served is not None and served != manifest.base_model.fingerprint:
            raise ResolveRefused(
                f"other base: {uri} was trained on {manifest.base_model.name_or_path!r} (fingerprint "
                f"{manifest.base_model.fingerprint[:12]}), this server serves {base_model_name!r} (fingerprint {served[:12]})"
            )

    def base_fingerprint(self, base_model_name: str) -> str | None:
        """The config fingerprint of the served base, or None (no check) if its config cannot be read.

        Computed once per base; a local directory is read as it is, a Hub id only from the local Hub cache.

        Args:
            base_model_name: vLLM's ``--model``.

        Returns:
            ``modeling.base.config_fingerprint`` of its config, or None.
        """
        with self._lock:
            if base_model_name in self._base_fingerprints:
                return self._base_fingerprints[base_model_name]
        fingerprint = _config_fingerprint(base_model_name)
        with self._lock:
            self._base_fingerprints[base_model_name] = fingerprint
        return fingerprint

    def _cached_copy(self, uri: str, manifest: Manifest) -> str:
        digest = manifest.content_sha256
        target = os.path.join(self.cache_dir, digest)
        with self._lock:
            lock = self._digest_locks.setdefault(digest, threading.Lock())
        with lock:
            if self._verified(target, uri, manifest):
                return target
            try:
                os.makedirs(self.cache_dir, exist_ok=True)
                download(uri, target, self.storage_options)
            except Exception as err:
                # Another process may have put the same content in place meanwhile.
                if self._verified(target, uri, manifest):
                    return target
                if isinstance(err, CheckpointFormatError):
                    raise ResolveRefused(f"damaged: {err}") from None
                raise ResolveRefused(f"download of {uri} failed: {type(err).__name__}: {err}") from None
            # download() verified the files against the manifest it read; the checkpoint may have been replaced
            # by other content since this resolver read its own.
            if _copied_digest(target) != digest:
                _remove_aside(target)
                raise ResolveRefused(f"changed while downloaded: {uri} no longer has content digest {digest[:16]}")
            return target

    def _verified(self, target: str, uri: str, manifest: Manifest) -> bool:
        """Whether ``target`` holds the files of ``manifest``, whole; a damaged copy is removed."""
        if not os.path.isdir(target):
            return False
        try:
            for name, entry in manifest.files.items():
                size, sha256 = _size_and_sha256(os.path.join(target, name))
                check_file(target, name, entry, size, sha256)
        except (OSError, CheckpointFormatError) as err:
            log.warning(
                "lightning-lora-ckpt: cached copy of %s at %s is damaged, downloading again: %s", uri, target, err
            )
            _remove_aside(target)
            return False
        return True


def _copied_digest(target: str) -> str | None:
    """The content digest of the manifest copied into ``target``, or None if it cannot be read."""
    try:
        with open(os.path.join(target, MANIFEST), "rb") as f:
            return Manifest.from_json(f.read(MAX_MANIFEST_BYTES + 1), target).content_sha256
    except (OSError, CheckpointFormatError):
        return None


def _config_fingerprint(base_model_name: str) -> str | None:
    from transformers import AutoConfig  # only once a name is resolved: vLLM has transformers imported already

    from ..modeling.base import config_fingerprint

    local = os.path.isdir(base_model_name)
    if local and not os.path.isfile(os.path.join(base_model_name, "config.json")):
        log.warning(
            "lightning-lora-ckpt: %s has no config.json; checkpoints are not checked against it", base_model_name
        )
        return None
    try:
        config = AutoConfig.from_pretrained(base_model_name, trust_remote_code=False, local_files_only=not local)
    except Exception as err:
        log.warning(
            "lightning-lora-ckpt: cannot read the config of the served base %s (%s: %s); checkpoints are not "
            "checked against it",
            base_model_name,
            type(err).__name__,
            err,
        )
        return None
    return config_fingerprint(config)


def _size_and_sha256(path: str) -> tuple[int, str]:
    hasher, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            hasher.update(chunk)
            size += len(chunk)
    return size, hasher.hexdigest()


def _remove_aside(target: str) -> None:
    """Rename ``target`` to a hidden sibling, then delete it: no reader sees it half deleted."""
    aside = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.stale-", dir=os.path.dirname(target))
    with contextlib.suppress(OSError):
        os.rename(target, os.path.join(aside, "copy"))
    shutil.rmtree(aside, ignore_errors=True)


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
