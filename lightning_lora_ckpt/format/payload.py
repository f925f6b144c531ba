"""Everything one checkpoint holds, as data: :class:`CheckpointPayload` <-> the files of its directory.

Encoding and decoding are symmetric: ``payload.to_files()`` gives the file contents of the checkpoint
type, ``CheckpointPayload.from_files(manifest, files, source)`` rebuilds the payload from verified
contents. The training state travels in its encoded form (a JSON tree plus tensors by name, see
:mod:`.state_codec`); :meth:`CheckpointPayload.state` decodes it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import torch

from .adapter_files import decode_adapter, encode_adapter
from .files import FileContent, ReadBytes
from .layout import CheckpointType
from .manifest import MAX_FILE_BYTES, STATE_JSON, STATE_TENSORS, BaseModelRef, Manifest
from .model_files import DEFAULT_MAX_SHARD_SIZE, decode_model, encode_model
from .state_codec import decode_state, encode_state
from .strict_json import load_json_object
from .tensor_files import load_tensors, safetensors_file


@dataclasses.dataclass
class CheckpointPayload:
    """The adapter, its PEFT config, the base it needs and (training checkpoints) the encoded training state.

    A full-parameter payload (``model_files`` set, ``lora_rank`` 0) holds a whole model instead of an adapter: its
    files are a Hugging Face model directory (``model_files.encode_model``).

    Attributes:
        checkpoint_type: ``"training"`` or ``"sampler"``.
        adapter: the adapter tensors under PEFT's key names; of a full-parameter payload, every weight of the model
            under the names ``save_pretrained`` writes.
        adapter_config: the PEFT config, as ``adapter_config.json`` holds it (``{}`` for a full-parameter payload).
        base_model: the base the adapter needs (the base a full-parameter model was trained from).
        user_metadata: free-form JSON metadata for the manifest.
        step: the global step.
        epoch: the epoch.
        state_tree: the encoded training state's JSON tree (``training_state.json``), or None.
        state_tensors: its tensors by name (``training_state.safetensors``).
        metrics: the scalar metrics logged when it was saved, by name (the manifest's ``metrics``).
        model_files: a full-parameter payload's ``config.json``, ``generation_config.json`` and tokenizer files, by
            name; None for a LoRA adapter.
        max_shard_size: the largest weight file of a full-parameter payload (bytes or e.g. ``"2GB"``).
        deferred_state: a training state still to encode (:meth:`defer_state`), or None.
    """

    checkpoint_type: CheckpointType
    adapter: dict[str, torch.Tensor]
    adapter_config: dict[str, Any]
    base_model: BaseModelRef
    user_metadata: dict[str, Any]
    step: int
    epoch: int
    state_tree: Any = None
    state_tensors: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    model_files: dict[str, bytes] | None = None
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
    deferred_state: Any = None

    @property
    def lora_rank(self) -> int:
        """The adapter's LoRA rank ``r``; 0 for a full-parameter payload."""
        return 0 if self.model_files is not None else int(self.adapter_config.get("r", 0))

    def set_state(self, state: Any) -> None:
        """Encode ``state`` (the training state, tensors kept by reference) into this payload.

        Args:
            state: the training state (optimizer, loops, schedulers, callbacks, RNG, ...).

        Raises:
            StateEncodingError: naming the key of a value that cannot be stored without pickle.
        """
        self.state_tree, self.state_tensors = encode_state(state)

    def defer_state(self, state: Any) -> None:
        """Keep ``state`` (its structure and tensors by reference) for :meth:`stage` to encode off the training loop.

        Args:
            state: the training state (optimizer, loops, schedulers, callbacks, RNG, ...).
        """
        self.deferred_state = state

    def stage(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Encode a deferred state, then replace every tensor by ``fn(tensor)`` (an asynchronous save's staging:
        run in a background thread while no optimizer update can change what it reads).

        Args:
            fn: maps each tensor to its replacement (a CPU copy).

        Raises:
            StateEncodingError: naming the key of a value that cannot be stored without pickle.
        """
        if self.deferred_state is not None:
            state, self.deferred_state = self.deferred_state, None
            self.set_state(state)
        self.map_tensors(fn)

    def state(self, source: str) -> dict[str, Any]:
        """The decoded training state (``{}`` if the payload holds none).

        Args:
            source: the checkpoint's URI, for error messages.

        Returns:
            The training state, with its original Python types.

        Raises:
            CheckpointFormatError: naming ``source`` and the key path of malformed state.
        """
        if self.state_tree is None:
            return {}
        return decode_state(self.state_tree, self.state_tensors, f"{source}/{STATE_JSON}")

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace every tensor (adapter and state) by ``fn(tensor)``, e.g. a CPU copy.

        Args:
            fn: maps each tensor to its replacement.
        """
        self.adapter = {k: fn(v) for k, v in self.adapter.items()}
        self.state_tensors = {k: fn(v) for k, v in self.state_tensors.items()}

    def to_files(self) -> dict[str, FileContent]:
        """The file contents in the order of ``manifest.FILES`` (a full-parameter payload: its model directory, then
        the state files); tensor files are serialised only when written.

        Returns:
            The contents of the checkpoint type's files (the manifest not included), by file name.

        Raises:
            ValueError: a full-parameter payload's ``max_shard_size`` is not a size.
            CheckpointFormatError: the PEFT config names modules no loader accepts.
        """
        if self.model_files is not None:
            files = encode_model(self.adapter, self.model_files, self.max_shard_size)
        else:
            files = encode_adapter(self.adapter, self.adapter_config)
        if self.checkpoint_type == "training":
            files[STATE_TENSORS] = safetensors_file(self.state_tensors)
            files[STATE_JSON] = json.dumps(self.state_tree, allow_nan=False).encode()
        return files

    @classmethod
    def from_files(cls, manifest: Manifest, files: dict[str, ReadBytes], source: str) -> CheckpointPayload:
        """Rebuild a payload from verified file contents (the state only if its files are among them).

        Args:
            manifest: the checkpoint's manifest.
            files: verified file contents by name: the adapter's two files (a full-parameter checkpoint: its model
                directory's files), optionally the two state files.
            source: the checkpoint's URI, for error messages.

        Returns:
            The payload; its state stays encoded until :meth:`state` is called.

        Raises:
            CheckpointFormatError: naming ``source``, if a file is malformed or the files do not belong together.
        """
        model_files: dict[str, bytes] | None = None
        config: dict[str, Any] = {}
        if manifest.lora_rank == 0:
            weights = {n: data for n, data in files.items() if n not in (STATE_TENSORS, STATE_JSON)}
            adapter, model_files = decode_model(weights, source)
        else:
            adapter, config = decode_adapter(files, manifest.lora_rank, source)
        payload = cls(
            checkpoint_type=manifest.checkpoint_type,
            adapter=adapter,
            adapter_config=config,
            base_model=manifest.base_model,
            user_metadata=manifest.user_metadata,
            step=manifest.step,
            epoch=manifest.epoch,
            metrics=dict(manifest.metrics),
            model_files=model_files,
        )
        if STATE_TENSORS in files:
            payload.state_tensors = load_tensors(files[STATE_TENSORS], f"{source}/{STATE_TENSORS}")
            payload.state_tree = load_json_object(
                files[STATE_JSON], MAX_FILE_BYTES[STATE_JSON], f"{source}/{STATE_JSON}"
            )
        return payload
