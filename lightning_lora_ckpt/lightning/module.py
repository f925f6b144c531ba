"""``LoRAModule``: a LightningModule around a Hugging Face causal LM with a PEFT LoRA adapter (or trained in full)."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
import transformers
from lightning.pytorch import LightningModule
from peft import LoraConfig, PeftModel
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from typing_extensions import override

from ..format.layout import CheckpointType, validate_name
from ..format.model_files import DEFAULT_MAX_SHARD_SIZE
from ..modeling.base import float_dtype, load_base_model, load_tokenizer, require_bitsandbytes
from ..modeling.peft_adapter import (
    adapter_config_of,
    adapter_state_dict,
    base_reference,
    check_servable_config,
    frozen_memo,
    new_peft_model,
)
from ..modeling.sampling import SamplingClient, snapshot_identity
from ..storage.loading import open_checkpoint
from .checkpoint_dict import LORA_KEY, AdapterBinding, checkpoint_from_opened
from .checkpoint_io import LoRACheckpointIO
from .full_binding import FullModelBinding
from .resume import install_ckpt_path_record, selected_ckpt_path
from .resume_checks import check_optimizer_states

if TYPE_CHECKING:
    from lightning.fabric.utilities.data import AttributeDict

# optimizer name -> its class in bitsandbytes.optim (empty for torch's AdamW).
_OPTIMIZERS = {"adamw": "", "adamw8bit": "AdamW8bit", "paged_adamw8bit": "PagedAdamW8bit"}
log = logging.getLogger(__name__)
install_ckpt_path_record()  # setup() learns whether the Trainer restores a checkpoint


def weighted_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Token cross-entropy weighted per token (Tinker's ``Datum.weights``), averaged over the total weight."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    w = weights.flatten().to(ce.dtype)
    return (ce * w).sum() / w.sum().clamp_min(torch.finfo(ce.dtype).tiny)


class LoRAModule(LightningModule):
    """Fine-tunes a LoRA adapter on a frozen causal LM; its checkpoints hold only the adapter and its state (with
    ``rank=0``, every weight is trained and checkpoints hold the whole model).

    Args:
        base_model: HF model id, local HF directory, or a built-in name (``tiny-qwen3``, ``tiny-llama``,
            ``qwen3-0.6b-shape``) that is built offline from a config.
        rank, alpha, dropout, target_modules: the PEFT ``LoraConfig`` (``"all-linear"`` by default). ``rank=0``
            (Fireworks' ``lora_rank=0``) trains every parameter of the model instead, with no PEFT: its checkpoints
            are full Hugging Face model directories (docs/full-parameter.md); alpha, dropout and targets are unused.
        quantization: ``"nf4"`` or ``"int8"`` trains on a bitsandbytes-quantized base (QLoRA); checkpoints
            still name the full-precision base, so the adapter also loads onto it.
        learning_rate, weight_decay, betas, eps: AdamW settings.
        optimizer: ``"adamw"`` (torch), ``"adamw8bit"`` or ``"paged_adamw8bit"`` (bitsandbytes, 8-bit moments
            for tensors of at least 4096 elements; paging only on CUDA).
        warmup_steps, lr_schedule: a ``transformers.get_scheduler`` schedule name, stepped every batch.
        seed: seeds the adapter's initialisation (the base of a built-in name is always the same).
        user_metadata: JSON-serialisable dict recorded in every checkpoint's manifest.
        dtype: dtype of the frozen base (the adapter is kept in float32).
        sampler_dtype: dtype of the adapter in sampler checkpoints (``None``: ``dtype``, the precision it
            is served at; a bfloat16 base gets sampler weights of half the bytes). Training checkpoints
            always keep the float32 adapter, so resume is exact.
        revision: HF revision of ``base_model``.
        allow_pickle: also load a local or Hub base with only pickled (``.bin``) weights, which can run code when
            unpickled: only for a ``base_model`` you trust. By default only safetensors weights load. Never
            recorded in checkpoints: ``from_checkpoint`` loads the base a checkpoint names from safetensors only.
        max_shard_size: ``rank=0`` only: the largest weight file of a checkpoint (bytes or e.g. ``"2GB"``);
            larger models are sharded as ``save_pretrained`` shards them.
        init_from: a sampler or training checkpoint (any fsspec URI, local path or ``lora://``, resolved against
            the Trainer's ``LoRACheckpointIO`` root) whose adapter the module starts from, weights only
            (optimizer fresh, step 0; MaxText's ``load_parameters_path``), loaded at its first ``setup`` unless
            the Trainer restores a checkpoint (see :meth:`setup` for the order).

    Batches are dicts with ``input_ids``, ``target_tokens`` and ``weights`` (and optionally ``attention_mask``).
    """

    # Lightning types hparams as AttributeDict | MutableMapping; save_hyperparameters always makes an AttributeDict.
    if TYPE_CHECKING:

        @property
        def hparams(self) -> AttributeDict: ...

    def __init__(
        self,
        base_model: str,
        rank: int = 16,
        alpha: float = 32,
        dropout: float = 0.0,
        target_modules: str | list[str] = "all-linear",
        quantization: str | None = None,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        optimizer: str = "adamw",
        warmup_steps: int = 0,
        lr_schedule: str = "constant_with_warmup",
        seed: int = 0,
        user_metadata: dict[str, Any] | None = None,
        dtype: str = "float32",
        sampler_dtype: str | None = None,
        revision: str | None = None,
        allow_pickle: bool = False,
        init_from: str | None = None,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["allow_pickle"])
        try:
            json.dumps(user_metadata or {}, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise ValueError(f"user_metadata must be JSON-serialisable: {err}") from err
        if optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer={optimizer!r} is not supported; use one of {sorted(_OPTIMIZERS)}")
        if _OPTIMIZERS[optimizer]:
            require_bitsandbytes(f"optimizer={optimizer!r}")
        if type(rank) is not int or rank < 0 or (rank == 0 and quantization is not None):
            raise ValueError(
                f"rank={rank!r}, quantization={quantization!r}: rank is a LoRA rank >= 1, or 0 for full-parameter "
                "training, which needs an unquantized base (quantization=None)"
            )
        self.sampler_dtype = float_dtype(sampler_dtype or dtype, "sampler_dtype" if sampler_dtype else "dtype")
        base = load_base_model(
            base_model, dtype=dtype, revision=revision, quantization=quantization, allow_pickle=allow_pickle
        )
        self.base_model_ref = base_reference(base, base_model, quantization)
        #: The trained model: a ``PeftModel`` around the frozen base, or (``rank=0``) the whole base, trained in full.
        self.model: PeftModel | PreTrainedModel
        self.adapter_binding: AdapterBinding
        if rank == 0:
            self.model = base.requires_grad_(True)
            tokenizer = load_tokenizer(base_model, revision)
            self.adapter_binding = FullModelBinding(
                self, base, self.base_model_ref, tokenizer, user_metadata, self.sampler_dtype, max_shard_size
            )
        else:
            self.model = self._lora_model(base, rank, alpha, dropout, target_modules, revision, seed)
            self.adapter_binding = AdapterBinding(
                self, self.model, self.base_model_ref, user_metadata, self.sampler_dtype
            )
        self._restore_optimizer_from: dict[str, Any] | None = None
        #: Whether the adapter's weights are chosen already (loaded, restored or set up once): init_from is not applied.
        self._weights_chosen = False

    def _lora_model(
        self,
        base: PreTrainedModel,
        rank: int,
        alpha: float,
        dropout: float,
        target_modules: str | list[str],
        revision: str | None,
        seed: int,
    ) -> PeftModel:
        lora_config = LoraConfig(
            r=rank,
            lora_alpha=alpha,  # type: ignore[arg-type]  # peft annotates int; a float alpha works (scale = alpha / r)
            lora_dropout=dropout,
            target_modules=target_modules,
            task_type="CAUSAL_LM",
            revision=revision,
        )
        return new_peft_model(base, lora_config, self.base_model_ref.name_or_path, seed)

    @property
    def user_metadata(self) -> dict[str, Any]:
        """Recorded in the manifest of every checkpoint saved from now on."""
        return self.adapter_binding.user_metadata

    @user_metadata.setter
    def user_metadata(self, value: dict[str, Any]) -> None:
        self.adapter_binding.user_metadata = dict(value)

    # -- model ------------------------------------------------------------------------------------
    @override
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self(batch["input_ids"], batch.get("attention_mask"))
        return weighted_cross_entropy(logits, batch["target_tokens"], batch["weights"])

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("val_loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])
        return loss

    @override
    def setup(self, stage: str) -> None:
        """Choose where the adapter's weights start, and log the choice (``lightning_lora_ckpt`` logger, INFO).

        The order: a checkpoint the Trainer restores (an explicit ``ckpt_path``, or ``ckpt_path="last"`` when the
        run has a committed training checkpoint) > ``init_from``, loaded here at the module's first setup
        (weights only) > fresh. Once a module has been set up, loaded or restored, ``init_from`` is not
        applied again. Subclasses overriding ``setup`` call ``super().setup(stage)``.

        Raises:
            CheckpointFormatError: ``init_from`` is missing, damaged or malformed.
            ValueError: its adapter does not fit this module (another base, LoRA config or tensors).
        """
        trainer = self.trainer
        restoring = selected_ckpt_path(trainer)
        init_from = self.hparams.get("init_from")
        if restoring is not None:
            choice = f"resuming from {restoring}"
        elif init_from and not self._weights_chosen:
            io = trainer.strategy.checkpoint_io
            root, options = (io.root, io.storage_options) if isinstance(io, LoRACheckpointIO) else (None, None)
            opened = open_checkpoint(init_from, root, options, with_state=False)
            checkpoint = checkpoint_from_opened(opened)
            self.load_adapter(checkpoint["state_dict"], checkpoint[LORA_KEY])
            choice = f"starting from the weights of {opened.uri} (init_from)"
        elif self._weights_chosen:
            choice = "starting from the module's current weights"
        else:
            choice = "starting fresh"
        self._weights_chosen = True
        if stage == "fit" and trainer.is_global_zero:
            log.info("LoRAModule: %s", choice)

    @override
    def configure_model(self) -> None:
        """Under ``LoRAModelParallelStrategy``: FSDP2-shard every decoder layer, then the whole model."""
        mesh = self._device_mesh
        if mesh is None or getattr(self, "_sharded", False):
            return
        from torch.distributed.fsdp import fully_shard

        data_parallel = mesh["data_parallel"]
        for module in self.model.modules():
            if type(module).__name__.endswith("DecoderLayer"):
                fully_shard(module, mesh=data_parallel)
        fully_shard(self.model, mesh=data_parallel)
        self._sharded = True

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        return load_tokenizer(self.hparams.base_model, self.hparams.revision)

    @override
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        bnb_class = _OPTIMIZERS[hp.optimizer]
        optimizer_class: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW
        if bnb_class:
            optimizer_class = getattr(require_bitsandbytes(f"optimizer={hp.optimizer!r}").optim, bnb_class)
        optimizer = optimizer_class(
            params, lr=hp.learning_rate, betas=tuple(hp.betas), eps=hp.eps, weight_decay=hp.weight_decay
        )
        total = self.trainer.estimated_stepping_batches
        scheduler = transformers.get_scheduler(
            hp.lr_schedule,
            optimizer,
            num_warmup_steps=hp.warmup_steps,
            num_training_steps=int(total) if math.isfinite(total) else None,
        )
        if self._restore_optimizer_from is not None:
            saved = self._restore_optimizer_from
            check_optimizer_states(saved, [optimizer], 1, self, saved[LORA_KEY]["source"])  # before any change
            optimizer.load_state_dict(saved["optimizer_states"][0])
            scheduler.load_state_dict(saved["lr_schedulers"][0])
            self._restore_optimizer_from = None
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoint contents ----------------------------------------------------------------------
    def adapter_config(self) -> dict[str, Any]:
        """The adapter's PEFT config as ``adapter_config.json`` holds it (what ``save_pretrained`` writes); ``{}``
        for full-parameter training (``rank=0``)."""
        return adapter_config_of(self.model) if isinstance(self.model, PeftModel) else {}

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter tensors under PEFT's key names (what ``adapter_model.safetensors`` holds); for full-parameter
        training (``rank=0``) every weight under the names ``save_pretrained`` writes (views of the parameters)."""
        if isinstance(self.model, PeftModel):
            return adapter_state_dict(self.model)
        state = self.state_dict(keep_vars=True)
        return {key: state[name].detach() for key, name in self.adapter_binding.keys.items()}

    def load_adapter(self, state_dict: dict[str, torch.Tensor], lora: dict[str, Any]) -> None:
        """Load adapter tensors (PEFT key names), refusing another base, LoRA config or tensor set, or a config
        whose tensors assume a base PEFT changed (``init_lora_weights="pissa"``, ...: see
        ``modeling.peft_adapter.check_servable_config``; this module's base is never changed).

        Raises:
            ValueError: naming what differs.
        """
        check_servable_config(lora["adapter_config"], lora.get("source", "the checkpoint"))
        self.adapter_binding.load(state_dict, lora, self, self._strategy_model())
        self._weights_chosen = True

    def _strategy_model(self) -> Any:
        return self._trainer.strategy.model if self._trainer is not None else None

    # -- the hosted-service style API -------------------------------------------------------------
    def save_state(self, name: str, ttl_seconds: float | None = None) -> str:
        """Save adapter + optimizer + loop state as training checkpoint ``name``; returns its URI."""
        return self._save(name, "training", ttl_seconds)

    def save_weights_for_sampler(self, name: str, ttl_seconds: float | None = None) -> str:
        """Save only the adapter (PEFT format) as sampler checkpoint ``name``; returns its URI."""
        return self._save(name, "sampler", ttl_seconds)

    def _save(self, name: str, checkpoint_type: CheckpointType, ttl_seconds: float | None) -> str:
        trainer = self.trainer
        io = trainer.strategy.checkpoint_io
        if not isinstance(io, LoRACheckpointIO):
            raise RuntimeError(
                f"save_state/save_weights_for_sampler need the LoRACheckpointIO plugin, the trainer has "
                f"{type(io).__name__}; create the Trainer with plugins=[LoRACheckpointIO(root=...)]"
            )
        validate_name(name, "checkpoint name")
        if io.adapter_binding is None:  # a plugin no fit has bound yet (e.g. swapped in after fit)
            io.adapter_binding = self.adapter_binding
        options = {"ttl_seconds": ttl_seconds} if ttl_seconds is not None else None
        trainer.save_checkpoint(name, weights_only=checkpoint_type == "sampler", storage_options=options)
        return trainer.strategy.broadcast(io.resolve(name, checkpoint_type))

    def save_weights_and_get_sampling_client(self, max_seq_len: int | None = None) -> SamplingClient:
        """A client sampling from an immutable in-memory snapshot of the current adapter (nothing is written).

        The frozen base weights are shared with this module, the adapter is copied: later training does
        not change what the client samples.
        """
        snapshot = copy.deepcopy(self.model, memo=frozen_memo(self.model))
        snapshot.requires_grad_(False)
        identity = snapshot_identity(self.adapter_state_dict())
        return SamplingClient(snapshot, self.get_tokenizer(), self.base_model_ref, identity, max_seq_len)

    @classmethod
    @override
    def load_from_checkpoint(  # type: ignore[override]
        cls, checkpoint_path: str | os.PathLike[str], map_location: Any = None, **kwargs: Any
    ) -> LoRAModule:
        """Lightning's ``load_from_checkpoint`` for this package's checkpoints: :meth:`from_checkpoint`.

        Args:
            checkpoint_path: a sampler or training checkpoint (any fsspec URI, local path or ``lora://``).
            map_location: a device to move the module to (it is built on the CPU).
            **kwargs: :meth:`from_checkpoint`'s arguments (``root``, ``storage_options``, constructor overrides).

        Returns:
            The module with the checkpoint's adapter, optimizer fresh.
        """
        module = cls.from_checkpoint(checkpoint_path, **kwargs)
        return module.to(map_location) if map_location is not None else module

    @classmethod
    def from_checkpoint(
        cls,
        uri: str | os.PathLike[str],
        with_optimizer: bool = False,
        root: str | None = None,
        storage_options: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> LoRAModule:
        """Rebuild the module (base model, LoRA config) from a checkpoint and load its adapter (a full-parameter
        checkpoint: a ``rank=0`` module built on the base it records, with every weight of the checkpoint).

        The optimizer starts fresh and training starts at step 0, unless ``with_optimizer`` (training
        checkpoints only) restores the optimizer moments and LR schedule when the optimizer is created.
        ``overrides`` replace constructor arguments, e.g. ``learning_rate`` or ``base_model``; the base is
        quantized as it was in training unless ``quantization`` says otherwise (None: full precision).
        ``allow_pickle=True`` (with ``base_model=``: only for a base you name yourself) lets that base load
        from pickled weights; the base a checkpoint names always loads from safetensors only.

        Raises:
            ValueError: ``allow_pickle`` without ``base_model``, or what :meth:`load_adapter` refuses.
            CheckpointFormatError: the checkpoint is missing, damaged or malformed.
        """
        if overrides.get("allow_pickle") and "base_model" not in overrides:
            raise ValueError(
                "allow_pickle=True is for a base you name yourself: pass base_model= too (the base a checkpoint "
                "names loads from safetensors weights only)"
            )
        opened = open_checkpoint(uri, root, storage_options, with_state=with_optimizer)
        check_servable_config(opened.adapter_config, opened.uri)  # before any base is built
        manifest = opened.manifest
        checkpoint = checkpoint_from_opened(opened)
        config = opened.adapter_config
        lora: dict[str, Any] = {"rank": 0}  # a full-parameter checkpoint
        if not manifest.full_parameter:
            lora = {
                "rank": config["r"],
                "alpha": config["lora_alpha"],
                "dropout": config.get("lora_dropout", 0.0),
                "target_modules": config["target_modules"],
            }
        kwargs: dict[str, Any] = {
            **{
                k: v
                for k, v in checkpoint.get("hyper_parameters", {}).items()
                if not k.startswith("_") and k != "allow_pickle"  # never the checkpoint's choice
            },
            "base_model": manifest.base_model.name_or_path,
            "quantization": manifest.base_model.quantization,
            **lora,
            **overrides,
        }
        module = cls(**kwargs)
        module.load_adapter(checkpoint["state_dict"], checkpoint[LORA_KEY])
        if with_optimizer:
            module._restore_optimizer_from = checkpoint
        return module
