"""A whole Hugging Face model trained in full (``LoRAModule(rank=0)``), and how it travels in checkpoint dicts.

:class:`FullModelBinding` is the :class:`~.checkpoint_dict.AdapterBinding` of full-parameter training: the same
checkpoint dict, with ``state_dict`` holding every weight under the names ``save_pretrained`` writes and the
``lora_ckpt`` entry holding the model directory's other files (config, generation config, tokenizer), so the
plugin writes a Hugging Face model directory (``format.model_files``).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from ..format.layout import CheckpointType
from ..format.manifest import BaseModelRef
from ..format.model_files import DEFAULT_MAX_SHARD_SIZE
from ..modeling.full_model import model_metadata_files, saved_weight_names
from ..modeling.peft_adapter import check_adapter_tensors
from .checkpoint_dict import AdapterBinding


class FullModelBinding(AdapterBinding):
    """Every weight of a Hugging Face model inside a LightningModule, for full-parameter checkpoints.

    Args:
        module: the LightningModule holding ``model``.
        model: the model, every parameter trainable; bound before any strategy wraps or shards it.
        base_model: the base the model was trained from (recorded in every checkpoint; loads check it).
        tokenizer: the tokenizer written into every checkpoint, or None.
        user_metadata: recorded in every checkpoint's manifest.
        sampler_dtype: the dtype of the floating weights in sampler checkpoints (training ones keep the model's).
        max_shard_size: the largest weight file (bytes or e.g. ``"2GB"``); larger models are sharded.

    Raises:
        ValueError: transformers saves the model's weights under other names (``full_model.saved_weight_names``).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        model: PreTrainedModel,
        base_model: BaseModelRef,
        tokenizer: PreTrainedTokenizerBase | None,
        user_metadata: dict[str, Any] | None = None,
        sampler_dtype: torch.dtype | None = None,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    ) -> None:
        super().__init__(module, model, base_model, user_metadata, sampler_dtype)
        self.max_shard_size = max_shard_size
        self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        # Rendered now, before a strategy shards the model (FSDP2 changes its class, whose name config.json records).
        dtypes = {self.dtype, sampler_dtype or self.dtype}
        self.metadata_files = {dtype: model_metadata_files(model, tokenizer, dtype) for dtype in dtypes}

    def saved_names(self, prefix: str) -> dict[str, str]:
        """The name of each weight ``save_pretrained`` writes -> its name in the bound module.

        Args:
            prefix: the model's name in the module, with a trailing dot (or ``""``).

        Returns:
            The mapping (tied copies, such as a tied ``lm_head.weight``, left out).
        """
        return {name: f"{prefix}{name}" for name in saved_weight_names(cast(PreTrainedModel, self.model))}

    def adapter_config(self) -> dict[str, Any]:
        """A full model has no PEFT config: ``{}``."""
        return {}

    def checkpoint_entry(self, checkpoint_type: CheckpointType) -> dict[str, Any]:
        """The model directory's files besides the weights (``config.json`` records the saved dtype), and the shard size.

        Args:
            checkpoint_type: the type of the checkpoint being saved.

        Returns:
            ``adapter_config`` (``{}``), ``model_files`` and ``max_shard_size``.
        """
        dtype = (self.sampler_dtype or self.dtype) if checkpoint_type == "sampler" else self.dtype
        return {"adapter_config": {}, "model_files": self.metadata_files[dtype], "max_shard_size": self.max_shard_size}

    def check(self, adapter: dict[str, torch.Tensor], lora: dict[str, Any]) -> None:
        """Refuse a checkpoint of another base, a LoRA checkpoint, or weights of other names or shapes.

        Raises:
            ValueError: naming what differs.
        """
        source = lora.get("source", "the checkpoint")
        BaseModelRef(**lora["base_model"]).check_compatible(self.base_model, source)
        if lora.get("lora_rank", 0) != 0:
            raise ValueError(
                f"Checkpoint {source} holds a LoRA adapter (rank {lora['lora_rank']}) and this module trains every "
                "parameter (rank=0); build the module with the checkpoint's LoRA settings "
                "(LoRAModule.from_checkpoint reads them from it)"
            )
        check_adapter_tensors(self.shapes, adapter, source)
