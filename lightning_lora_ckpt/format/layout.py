"""Names, checkpoint kinds and the ``lora://`` URI grammar; docs/format.md describes the on-disk layout and grammar."""

from __future__ import annotations

import os
import re
from typing import Literal

CheckpointType = Literal["training", "sampler"]

#: Folder under a run that holds each checkpoint type.
KIND_DIRS: dict[str, CheckpointType] = {"weights": "training", "sampler_weights": "sampler"}
TYPE_DIRS: dict[CheckpointType, str] = {v: k for k, v in KIND_DIRS.items()}

SCHEME = "lora://"
ROOT_ENV = "LORA_CKPT_ROOT"
#: Where local copies of remote checkpoints for a server on this machine go (:func:`default_cache_dir`).
CACHE_ENV = "LORA_CKPT_CACHE_DIR"
_NAME = re.compile(r"[A-Za-z0-9_=-][A-Za-z0-9._=-]{0,127}")


def validate_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it is a valid run id or checkpoint name, else raise ``ValueError``.

    Args:
        name: the run id or checkpoint name to check.
        what: what ``name`` is, for the error message (e.g. ``"run id"``).

    Returns:
        ``name`` unchanged.

    Raises:
        ValueError: ``name`` is not a string of 1-128 characters from ``[A-Za-z0-9._=-]`` not starting with ``.``.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"Invalid {what} {name!r}: use 1-128 characters from [A-Za-z0-9._=-], not starting with '.'")
    return name


def default_root(root: str | None = None) -> str:
    """The root to resolve ``lora://`` URIs against: ``root``, else ``$LORA_CKPT_ROOT``, else ``./checkpoints``.

    Local paths are made absolute, so the URIs built from them stay valid after a ``chdir``.

    Args:
        root: an explicit root (any fsspec URI or local path), or None.

    Returns:
        The root without a trailing ``/``; a local path as an absolute path.
    """
    root = (root or os.environ.get(ROOT_ENV) or "./checkpoints").rstrip("/") or "/"
    return root if "://" in root else os.path.abspath(root)


def default_cache_dir() -> str:
    """Where downloads of remote checkpoints for a local vLLM server go (``hotload``, the resolver plugin):
    ``$LORA_CKPT_CACHE_DIR``, else ``~/.cache/lightning-lora-ckpt/vllm``.

    Returns:
        The directory (it may not exist yet).
    """
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "lightning-lora-ckpt", "vllm")


def parse_lora_uri(uri: str) -> tuple[str, CheckpointType, str]:
    """Split ``lora://<run_id>/{weights|sampler_weights}/<name>`` into (run_id, checkpoint_type, name).

    Args:
        uri: a ``lora://`` URI.

    Returns:
        The run id, the checkpoint type (``"training"`` for ``weights``, ``"sampler"`` for ``sampler_weights``)
        and the checkpoint name.

    Raises:
        ValueError: ``uri`` is not in that form, or its run id or name is invalid.
    """
    parts = uri[len(SCHEME) :].split("/")
    if not uri.startswith(SCHEME) or len(parts) != 3 or parts[1] not in KIND_DIRS:
        raise ValueError(
            f"Invalid checkpoint URI {uri!r}: expected lora://<run_id>/weights/<name> "
            "or lora://<run_id>/sampler_weights/<name>"
        )
    return validate_name(parts[0], "run id"), KIND_DIRS[parts[1]], validate_name(parts[2], "checkpoint name")


def join(root: str, *parts: str) -> str:
    """Join URI path segments with exactly one '/' between them.

    Args:
        root: the first segment (a URI or path); its trailing ``/`` are dropped.
        *parts: further segments; their leading and trailing ``/`` are dropped.

    Returns:
        The joined URI.
    """
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])


def checkpoint_uri(root: str, run_id: str, checkpoint_type: CheckpointType, name: str) -> str:
    """The directory URI of a checkpoint in the standard layout.

    Args:
        root: the checkpoint root.
        run_id: the run id.
        checkpoint_type: ``"training"`` (under ``weights/``) or ``"sampler"`` (under ``sampler_weights/``).
        name: the checkpoint name.

    Returns:
        ``<root>/<run_id>/{weights|sampler_weights}/<name>``.

    Raises:
        ValueError: ``run_id`` or ``name`` is invalid.
    """
    return join(root, validate_name(run_id, "run id"), TYPE_DIRS[checkpoint_type], validate_name(name))


def resolve(path: str | os.PathLike[str], root: str | None = None) -> str:
    """Turn a ``lora://`` URI into a URI under ``root``; any other path or URI is returned as a string.

    A trailing ``/checkpoint.json`` is accepted and dropped, so a manifest path names its checkpoint.

    Args:
        path: a ``lora://`` URI, any fsspec URI or a local path.
        root: where ``lora://`` URIs resolve (see :func:`default_root`).

    Returns:
        The checkpoint's URI under the root for a ``lora://`` URI, else ``path`` as a string without a
        trailing ``/`` or ``/checkpoint.json``.

    Raises:
        ValueError: ``path`` is a malformed ``lora://`` URI.
    """
    uri = os.fspath(path)
    if uri.startswith(SCHEME):
        run_id, checkpoint_type, name = parse_lora_uri(uri)
        return checkpoint_uri(default_root(root), run_id, checkpoint_type, name)
    uri = uri.rstrip("/")
    return uri[: -len("/checkpoint.json")] if uri.endswith("/checkpoint.json") else uri


def split_checkpoint_uri(uri: str) -> tuple[str, str, CheckpointType, str] | None:
    """Split ``<root>/<run_id>/<kind>/<name>`` into its parts, or None if ``uri`` is not in that layout.

    Args:
        uri: a checkpoint directory URI.

    Returns:
        (root, run_id, checkpoint_type, name), or None.
    """
    parts = uri.rstrip("/").rsplit("/", 3)
    if len(parts) != 4 or parts[2] not in KIND_DIRS or not _NAME.fullmatch(parts[1]) or not _NAME.fullmatch(parts[3]):
        return None
    return parts[0], parts[1], KIND_DIRS[parts[2]], parts[3]
