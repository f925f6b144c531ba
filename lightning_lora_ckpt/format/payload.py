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
from .state_codec import decode_state, encode_state
from .strict_json import load_json_object
from .tensor_files import load_tensors, safetensors_file


@dataclasses.dataclass
class CheckpointPayload:
    """The adapter, its PEFT config, the base it needs and (training checkpoints) the encoded training state.

    Attributes:
        checkpoint_type: ``"training"`` or ``"sampler"``.
        adapter: the adapter tensors under PEFT's key names.
        adapter_config: the PEFT config, as ``adapter_config.json`` holds it.
        base_model: the frozen base the adapter needs.
        user_metadata: free-form JSON metadata for the manifest.
        step: the global step.
        epoch: the epoch.
        state_tree: the encoded training state's JSON tree (``training_state.json``), or None.
        state_tensors: its tensors by name (``training_state.safetensors``).
        metrics: the scalar metrics logged when it was saved, by name (the manifest's ``metrics``).
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

    @property
    def lora_rank(self) -> int:
        """The adapter's LoRA rank ``r``."""
        return int(self.adapter_config.get("r", 0))

    def set_state(self, state: Any) -> None:
        """Encode ``state`` (the training state, tensors kept by reference) into this payload.

        Args:
            state: the training state (optimizer, loops, schedulers, callbacks, RNG, ...).

        Raises:
            StateEncodingError: naming the key of a value that cannot be stored without pickle.
        """
        self.state_tree, self.state_tensors = encode_state(state)

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
        """The file contents in the order of ``manifest.FILES``; tensor files are serialised only when written.

        Returns:
            The contents of the checkpoint type's files (the manifest not included), by file name.
        """
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
            files: verified file contents by name: the adapter's two files, optionally the two state files.
            source: the checkpoint's URI, for error messages.

        Returns:
            The payload; its state stays encoded until :meth:`state` is called.

        Raises:
            CheckpointFormatError: naming ``source``, if a file is malformed or the files do not belong together.
        """
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
        )
        if STATE_TENSORS in files:
            payload.state_tensors = load_tensors(files[STATE_TENSORS], f"{source}/{STATE_TENSORS}")
            payload.state_tree = load_json_object(
                files[STATE_JSON], MAX_FILE_BYTES[STATE_JSON], f"{source}/{STATE_JSON}"
            )
        return payload
