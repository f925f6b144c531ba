"""``convert``: a checkpoint's LoRA adapter (or full model) as tensors stacked over layers (MaxText's scan layout)
or as a plain PEFT adapter (Hugging Face model) directory, both directions, bit-exact (docs/layouts.md).

The transforms are pure (``format.layouts``); this module reads the source (a committed checkpoint, verified, or a
stacked directory, checked against its ``layout.json``) and writes the output into a temporary sibling that is
renamed into place, so a failure never leaves a partial directory.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any, Literal

from ..format.adapter_files import check_adapter, encode_adapter
from ..format.digests import digest_hex, file_digest
from ..format.files import LazyFile
from ..format.layout import resolve
from ..format.layouts import (
    LAYOUT_FILE,
    STACKED_MODEL_WEIGHTS,
    STACKED_WEIGHTS,
    decode_layout,
    encode_layout,
    stack_layers,
    stacked_from_layout,
    unstack_layers,
)
from ..format.model_files import DEFAULT_MAX_SHARD_SIZE, encode_model
from ..format.model_layout import MAX_MODEL_FILE_BYTES
from ..format.strict_json import CheckpointFormatError
from ..format.tensor_files import load_tensors, safetensors_file
from ..storage.fs import url_to_fs
from ..storage.loading import open_checkpoint
from ..storage.local import apply_umask, install_dir
from .export import prepare_output

Layout = Literal["stacked", "unstacked"]
LAYOUTS: tuple[Layout, ...] = ("stacked", "unstacked")
_MAX_STACKED_BYTES = 64 << 30


@dataclasses.dataclass(frozen=True)
class Converted:
    """What :func:`convert_layout` wrote.

    Attributes:
        path: the output directory (absolute).
        layout: ``"stacked"`` or ``"unstacked"``.
        source: the identity of the checkpoint the adapter came from (``run_id``, ``name``, ``checkpoint_type``,
            ``step``, ``content_sha256``, ``base_model``, ``uri``).
        tensors: how many tensors the output holds.
        num_layers: L of each stack by its name prefix (empty for ``"unstacked"``).
    """

    path: str
    layout: Layout
    source: dict[str, Any]
    tensors: int
    num_layers: dict[str, int]


def convert_layout(
    uri: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    layout: Layout,
    *,
    overwrite: bool = False,
    root: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Converted:
    """Write the LoRA adapter (or the full model) of ``uri`` into ``output_dir`` in ``layout``.

    ``"stacked"``: ``adapter_model.stacked.safetensors`` (each ``...layers.<i>.<rest>`` of the L layers as one
    ``[L, *shape]`` tensor ``...layers.{layers}.<rest>``; other tensors as they are) and ``layout.json``; for a
    full-parameter checkpoint ``model.stacked.safetensors``, its config, generation config and tokenizer files, and
    ``layout.json``. ``"unstacked"``: ``adapter_model.safetensors`` and ``adapter_config.json``, the directory
    ``PeftModel.from_pretrained(base, output_dir)`` loads; for a full model the Hugging Face model directory
    ``AutoModelForCausalLM.from_pretrained(output_dir)`` loads (sharded above ``max_shard_size``). A training
    checkpoint gives its weights only (its state is dropped: an inference checkpoint). Stacking then unstacking
    gives back the tensors bit-exactly.

    Args:
        uri: a sampler or training checkpoint (fsspec URI, local path or ``lora://run/kind/name``), or a directory
            written by ``convert_layout(..., "stacked")``.
        output_dir: a local directory, absent or empty unless ``overwrite``.
        layout: ``"stacked"`` or ``"unstacked"``.
        overwrite: replace a non-empty ``output_dir``.
        root: where ``lora://`` URIs resolve (``$LORA_CKPT_ROOT`` if None).
        storage_options: fsspec options of the source's filesystem.
        max_shard_size: the largest weight file of an unstacked full model (bytes or e.g. ``"2GB"``).

    Returns:
        What was written.

    Raises:
        ValueError: ``layout`` is not one of :data:`LAYOUTS`, or the layers cannot be stacked (they differ in
            shape or dtype, or some layer lacks a tensor the others have): the message names the key.
        FileExistsError: ``output_dir`` is not empty and ``overwrite`` is False.
        NotADirectoryError: ``output_dir`` exists and is not a directory.
        CheckpointFormatError: the source is missing, damaged or malformed.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown layout {str(layout)[:50]!r}: choose one of {', '.join(LAYOUTS)}")
    target = os.path.abspath(os.fspath(output_dir))
    prepare_output(target, overwrite)
    adapter, config, source, model_files = read_adapter(uri, root, storage_options)
    stacked = stack_layers(adapter) if layout == "stacked" else None  # refuses before anything is written
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.convert-", dir=parent)
    try:
        if stacked is not None:
            weights = os.path.join(tmp, STACKED_WEIGHTS if model_files is None else STACKED_MODEL_WEIGHTS)
            safetensors_file(stacked.tensors, {"format": "pt"}).write(weights)
            for file_name, data in (model_files or {}).items():
                _write(os.path.join(tmp, file_name), data)
            digests = {f: digest_hex(data, "sha256") for f, data in model_files.items()} if model_files else None
            layout_json = encode_layout(stacked, config, source, file_digest(weights, "sha256")[1], digests)
            _write(os.path.join(tmp, LAYOUT_FILE), layout_json)
        else:
            files = (
                encode_adapter(adapter, config)
                if model_files is None
                else encode_model(adapter, model_files, max_shard_size)
            )
            for file_name, content in files.items():
                _write(os.path.join(tmp, file_name), content)
        apply_umask(tmp)
        install_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tensors = stacked.tensors if stacked is not None else adapter
    return Converted(target, layout, source, len(tensors), stacked.num_layers if stacked is not None else {})


def read_adapter(
    uri: str | os.PathLike[str], root: str | None = None, storage_options: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, bytes] | None]:
    """The (per-layer tensors, PEFT config, source identity, model files) of a checkpoint or of a stacked directory.

    Args:
        uri: as for :func:`convert_layout`.
        root: where ``lora://`` URIs resolve.
        storage_options: fsspec options of the source's filesystem.

    Returns:
        The tensors (an adapter's under PEFT's key names, a full model's under ``save_pretrained``'s, in their
        original order), the PEFT config (``{}`` for a full model), the identity of the checkpoint they came from,
        and a full model's config, generation config and tokenizer files (None for an adapter).

    Raises:
        CheckpointFormatError: the source is missing, damaged or malformed.
    """
    resolved = resolve(uri, root)
    fs, path = url_to_fs(resolved, storage_options)
    if not fs.exists(f"{path.rstrip('/')}/{LAYOUT_FILE}"):
        opened = open_checkpoint(resolved, storage_options=storage_options)
        manifest = opened.manifest
        source = {
            "uri": opened.uri,
            "run_id": manifest.run_id,
            "name": manifest.name,
            "checkpoint_type": manifest.checkpoint_type,
            "step": manifest.step,
            "content_sha256": manifest.content_sha256,
            "base_model": dataclasses.asdict(manifest.base_model),
        }
        model_files = dict(opened.payload.model_files) if opened.payload.model_files is not None else None
        return dict(opened.adapter), dict(opened.adapter_config), source, model_files
    where, folder = resolved.rstrip("/"), path.rstrip("/")
    layout = decode_layout(fs.cat_file(f"{folder}/{LAYOUT_FILE}"), f"{where}/{LAYOUT_FILE}")
    weights_name = layout["weights"]["file"]
    raw = _checked(fs, folder, where, weights_name, layout["weights"]["sha256"], _MAX_STACKED_BYTES)
    model_files = None
    if "model_files" in layout:
        model_files = {
            f: _checked(fs, folder, where, f, digest, MAX_MODEL_FILE_BYTES.get(f, 64 << 20))
            for f, digest in layout["model_files"].items()
        }
    stacked = stacked_from_layout(load_tensors(raw, f"{where}/{weights_name}"), layout)
    try:
        adapter = unstack_layers(stacked)
    except ValueError as err:
        raise CheckpointFormatError(f"{where}: {err}") from err
    config = layout["adapter_config"]
    if model_files is None:
        if type(config.get("r")) is not int:
            raise CheckpointFormatError(f"{where}/{LAYOUT_FILE}: adapter_config has no integer 'r'; convert again")
        check_adapter(adapter, config, where)
    return adapter, config, layout["source"], model_files


def _checked(fs: Any, folder: str, where: str, name: str, sha256: str, limit: int) -> bytes:
    """A file of a stacked directory, refused if missing, larger than ``limit`` or not the one ``layout.json``
    records."""
    file_path = f"{folder}/{name}"
    if not fs.exists(file_path) or fs.size(file_path) > limit:
        raise CheckpointFormatError(f"{where}: {name} is missing or too large; convert the checkpoint again")
    raw = fs.cat_file(file_path)
    if digest_hex(raw, "sha256") != sha256:
        raise CheckpointFormatError(
            f"{where}/{name} differs from the sha256 layout.json records: it is damaged; convert again"
        )
    return bytes(raw)


def _write(path: str, content: bytes | memoryview | LazyFile) -> None:
    if isinstance(content, LazyFile):
        content.write(path)
        return
    with open(path, "wb") as f:
        f.write(content)
