"""``LoRAModule``: a LightningModule around a Hugging Face causal LM with a PEFT LoRA adapter."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
import transformers
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch import LightningModule
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.tensor import DTensor
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from . import storage, uris
from .io import LoRACheckpointIO
from .manifest import ADAPTER_CONFIG, ADAPTER_WEIGHTS, BaseModelRef
from .models import config_fingerprint, float_dtype, load_base_model, load_tokenizer, require_bitsandbytes
from .payload import LORA_KEY, decode_checkpoint
from .uris import CheckpointType

if TYPE_CHECKING:
    from .sampling import SamplingClient

# LoRA settings that must match between a checkpoint and the module it is loaded into.
_LORA_IDENTITY = ("r", "lora_alpha", "target_modules", "use_rslora", "use_dora")
# optimizer name -> its class in bitsandbytes.optim (empty for torch's AdamW).
_OPTIMIZERS = {"adamw": "", "adamw8bit": "AdamW8bit", "paged_adamw8bit": "PagedAdamW8bit"}


def weighted_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Token cross-entropy weighted per token (Tinker's ``Datum.weights``), averaged over the total weight."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    w = weights.flatten().to(ce.dtype)
    return (ce * w).sum() / w.sum().clamp_min(torch.finfo(ce.dtype).tiny)


class LoRAModule(LightningModule):
    """Fine-tunes a LoRA adapter on a frozen causal LM; its checkpoints hold only the adapter and its state.

    Args:
        base_model: HF model id, local HF directory, or a built-in name (``tiny-qwen3``, ``tiny-llama``,
            ``qwen3-0.6b-shape``) that is built offline from a config.
        rank, alpha, dropout, target_modules: the PEFT ``LoraConfig`` (``"all-linear"`` by default).
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

    Batches are dicts with ``input_ids``, ``target_tokens`` and ``weights`` (and optionally ``attention_mask``).
    """

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
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        try:
            json.dumps(user_metadata or {}, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise ValueError(f"user_metadata must be JSON-serialisable: {err}") from err
        self.user_metadata = dict(user_metadata or {})
        if optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer={optimizer!r} is not supported; use one of {sorted(_OPTIMIZERS)}")
        if _OPTIMIZERS[optimizer]:
            require_bitsandbytes(f"optimizer={optimizer!r}")
        self.sampler_dtype = float_dtype(sampler_dtype or dtype, "sampler_dtype" if sampler_dtype else "dtype")
        base = load_base_model(base_model, dtype=dtype, revision=revision, quantization=quantization)
        for p in base.parameters():
            p.requires_grad_(False)
        self.base_model_ref = BaseModelRef(base_model, config_fingerprint(base.config), quantization)
        lora_config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=target_modules,
            task_type="CAUSAL_LM",
            revision=revision,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model: PeftModel = get_peft_model(base, lora_config)
        self.model.peft_config["default"].base_model_name_or_path = base_model
        # PEFT's adapter key names -> this module's parameter names (and shapes), worked out once by PEFT
        # itself before any strategy wraps or shards the model.
        trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        mapping = get_peft_model_state_dict(
            self.model, state_dict={n: n for n in trainable}, save_embedding_layers=False
        )
        self.adapter_keys = {peft_key: f"model.{name}" for peft_key, name in mapping.items()}
        self.adapter_shapes = {peft_key: tuple(trainable[name].shape) for peft_key, name in mapping.items()}
        # The checkpoint's state_dict holds only the adapter; on_load_checkpoint loads and checks it.
        self.strict_loading = False
        self._restore_optimizer_from: dict[str, Any] | None = None

    # -- model ------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self(batch["input_ids"], batch.get("attention_mask"))
        return weighted_cross_entropy(logits, batch["target_tokens"], batch["weights"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("val_loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])
        return loss

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

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        bnb_class = _OPTIMIZERS[hp.optimizer]
        optimizer_class: type[torch.optim.Optimizer] = torch.optim.AdamW
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
            optimizer.load_state_dict(self._restore_optimizer_from["optimizer_states"][0])
            scheduler.load_state_dict(self._restore_optimizer_from["lr_schedulers"][0])
            self._restore_optimizer_from = None
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoint contents ----------------------------------------------------------------------
    def adapter_config(self) -> dict[str, Any]:
        """The adapter's PEFT config as ``adapter_config.json`` holds it (what ``save_pretrained`` writes)."""
        config = copy.deepcopy(self.model.peft_config["default"])
        config.inference_mode = True
        return json.loads(json.dumps(config.to_dict(), default=sorted))

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter tensors under PEFT's key names (what ``adapter_model.safetensors`` holds)."""
        # save_embedding_layers=False: "auto" looks the base up on the Hub at every save, and the
        # frozen embeddings are never part of a checkpoint.
        return get_peft_model_state_dict(self.model, save_embedding_layers=False)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Pick the adapter out of what the strategy gathered (the whole module, or only the trainable
        # tensors under FSDP2, on rank 0) under PEFT's key names: a dict lookup per adapter tensor, not
        # another walk over every module of the base.
        gathered = checkpoint["state_dict"]
        adapter = {p: gathered[m] for p, m in self.adapter_keys.items() if m in gathered}
        if "optimizer_states" not in checkpoint:  # sampler weights (weights_only): stored at serving precision
            adapter = {k: v.to(self.sampler_dtype) for k, v in adapter.items()}
        checkpoint["state_dict"] = adapter
        self._hold_updates_for_async_snapshots()
        checkpoint[LORA_KEY] = {
            "adapter_config": self.adapter_config(),
            "base_model": dataclasses.asdict(self.base_model_ref),
            "user_metadata": self.user_metadata,
        }
        checkpoint["rng_states"] = _collect_rng_states()

    def _hold_updates_for_async_snapshots(self) -> None:
        """Make every optimizer update wait until asynchronous saves have copied the tensors it changes.

        A torch step pre-hook (so a user's own ``on_before_optimizer_step`` cannot skip it) wraps the
        step's closure: that step's forward and backward still run while the copy is made.
        """
        io = self.trainer.strategy.checkpoint_io
        if not (isinstance(io, LoRACheckpointIO) and io.async_save):
            return
        hook = self._wait_for_snapshots_before_update
        for optimizer in self.trainer.optimizers:
            if hook not in optimizer._optimizer_step_pre_hooks.values():  # once per optimizer, whatever its lifetime
                optimizer.register_step_pre_hook(hook)

    def _wait_for_snapshots_before_update(self, optimizer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        io = self._trainer.strategy.checkpoint_io if self._trainer is not None else None
        if not (isinstance(io, LoRACheckpointIO) and io.snapshots_pending):
            return None
        closure = kwargs.get("closure", args[0] if args else None)
        if closure is None:
            io.wait_for_snapshots()
            return None

        def closure_then_wait() -> Any:
            loss = closure()
            io.wait_for_snapshots()
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_wait}
        return (closure_then_wait, *args[1:]), kwargs

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        lora = checkpoint.get(LORA_KEY)
        if lora is None:
            raise ValueError(
                "This checkpoint was not written by LoRACheckpointIO (no 'lora_ckpt' entry); add "
                "plugins=[LoRACheckpointIO(...)] to the Trainer that loads it"
            )
        self.load_adapter(checkpoint["state_dict"], lora)
        checkpoint["state_dict"] = {}
        if "rng_states" in checkpoint:
            _set_rng_states(checkpoint["rng_states"])

    def load_adapter(self, state_dict: dict[str, torch.Tensor], lora: dict[str, Any]) -> None:
        """Load adapter tensors (PEFT key names), refusing another base, LoRA config or tensor set."""
        source = lora.get("source", "the checkpoint")
        BaseModelRef(**lora["base_model"]).check_compatible(self.base_model_ref, source)
        ours, theirs = self.adapter_config(), lora["adapter_config"]
        for key in _LORA_IDENTITY:
            a, b = _normalise(theirs.get(key)), _normalise(ours.get(key))
            if a != b:
                raise ValueError(
                    f"Checkpoint {source} has LoRA {key}={a!r} but this module has {key}={b!r}; build the module "
                    "with the checkpoint's LoRA settings (LoRAModule.from_checkpoint reads them from it)"
                )
        expected = self.adapter_shapes
        missing, unexpected = sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"Adapter tensors of {source} do not match the module: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for key, tensor in state_dict.items():
            if tuple(tensor.shape) != expected[key]:
                raise ValueError(
                    f"Adapter tensor {key} of {source} has shape {tuple(tensor.shape)}, the module expects {expected[key]}"
                )
        by_module_key = {self.adapter_keys[k]: state_dict[k] for k in self.adapter_keys}
        strategy_model = self._trainer.strategy.model if self._trainer is not None else None
        if isinstance(strategy_model, FullyShardedDataParallel):  # FSDP1: addressed through its root wrapper
            root: torch.nn.Module = strategy_model
        else:
            params = {name: self.get_parameter(name) for name in by_module_key}
            if not any(isinstance(p, DTensor) for p in params.values()):
                # Plain and DDP parameters: a copy each, not a walk over every module of the base.
                with torch.no_grad():
                    for name, tensor in by_module_key.items():
                        params[name].copy_(tensor)
                return
            root = self
        # torch's distributed state-dict API loads full tensors into sharded (FSDP1, FSDP2) parameters.
        set_model_state_dict(root, by_module_key, options=StateDictOptions(full_state_dict=True, strict=False))

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
        uris.validate_name(name, "checkpoint name")
        options = {"ttl_seconds": ttl_seconds} if ttl_seconds is not None else None
        trainer.save_checkpoint(name, weights_only=checkpoint_type == "sampler", storage_options=options)
        return trainer.strategy.broadcast(io.resolve(name, checkpoint_type))

    def save_weights_and_get_sampling_client(self, max_seq_len: int | None = None) -> SamplingClient:
        """A client sampling from an immutable in-memory snapshot of the current adapter (nothing is written).

        The frozen base weights are shared with this module, the adapter is copied: later training does
        not change what the client samples.
        """
        from .sampling import SamplingClient, snapshot_identity

        snapshot = copy.deepcopy(self.model, memo=_frozen_memo(self.model))
        snapshot.requires_grad_(False)
        identity = snapshot_identity(self.adapter_state_dict())
        return SamplingClient(snapshot, self.get_tokenizer(), self.base_model_ref, identity, max_seq_len)

    @classmethod
    def from_checkpoint(
        cls,
        uri: str | os.PathLike[str],
        with_optimizer: bool = False,
        root: str | None = None,
        storage_options: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> LoRAModule:
        """Rebuild the module (base model, LoRA config) from a checkpoint and load its adapter.

        The optimizer starts fresh and training starts at step 0, unless ``with_optimizer`` (training
        checkpoints only) restores the optimizer moments and LR schedule when the optimizer is created.
        ``overrides`` replace constructor arguments, e.g. ``learning_rate`` or ``base_model``; the base is
        quantized as it was in training unless ``quantization`` says otherwise (None: full precision).
        """
        uri = uris.resolve(uri, root)
        manifest = storage.read_manifest(uri, storage_options)
        if with_optimizer and manifest.checkpoint_type != "training":
            raise ValueError(f"{uri} is a sampler checkpoint; with_optimizer=True needs a training checkpoint")
        names = list(manifest.files) if with_optimizer else [ADAPTER_WEIGHTS, ADAPTER_CONFIG]
        checkpoint = decode_checkpoint(manifest, storage.read_files(uri, manifest, names, storage_options), uri)
        config = checkpoint[LORA_KEY]["adapter_config"]
        kwargs: dict[str, Any] = {
            **{k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")},
            "base_model": manifest.base_model.name_or_path,
            "quantization": manifest.base_model.quantization,
            "rank": config["r"],
            "alpha": config["lora_alpha"],
            "dropout": config.get("lora_dropout", 0.0),
            "target_modules": config["target_modules"],
            **overrides,
        }
        module = cls(**kwargs)
        module.load_adapter(checkpoint["state_dict"], checkpoint[LORA_KEY])
        if with_optimizer:
            module._restore_optimizer_from = checkpoint
        return module


def _frozen_memo(model: torch.nn.Module) -> dict[int, Any]:
    """A ``deepcopy`` memo that shares the frozen base: its parameters and bitsandbytes' per-layer quantization
    state (an int8 layer keeps its quantized weight in ``state``, a 4-bit one its scales in ``quant_state``)."""
    memo: dict[int, Any] = {id(p): p for p in model.parameters() if not p.requires_grad}
    bnb = sys.modules.get("bitsandbytes")  # loaded by any quantized base
    if bnb is not None:
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear8bitLt):
                memo[id(module.state)] = module.state
            elif isinstance(module, bnb.nn.Linear4bit) and module.quant_state is not None:
                memo[id(module.quant_state)] = module.quant_state
    return memo


def _normalise(value: Any) -> Any:
    return sorted(value) if isinstance(value, (list, set, tuple)) else value
