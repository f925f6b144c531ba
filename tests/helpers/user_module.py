"""A user's own LightningModule: a PEFT LoRA model built with ``peft.get_peft_model``, its own training step,
AdamW and StepLR — nothing from lightning_lora_ckpt but the base loader. Also a job script:

    python -m helpers.user_module ROOT RUN STEPS [CKPT_PATH]   (cwd: tests/)

trains STEPS steps (epochs of 4) through ``LoRACheckpointIO`` (Lightning's ModelCheckpoint every 2 steps, save_last) and
prints the sha256 of the final adapter tensors.
"""

from __future__ import annotations

import hashlib
import sys
from typing import Any

import lightning as L
import peft
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_lora_ckpt import LoRACheckpointIO, load_base_model


class UserLoRAModule(L.LightningModule):
    """Next-token LoRA fine-tuning of the built-in tiny Qwen3, written as a Lightning user would."""

    def __init__(self, lr: float = 1e-2, rank: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        base = load_base_model("tiny-qwen3")
        config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, target_modules=["q_proj", "v_proj"])
        torch.manual_seed(0)
        self.net = peft.get_peft_model(base, config)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.net(input_ids=batch["input_ids"]).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["target_tokens"].flatten())

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch))

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, step_size=3)}

    def adapter(self) -> dict[str, torch.Tensor]:
        """The trainable tensors by parameter name."""
        return {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of tensors in key order (bit-exact comparison across processes)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def data(n: int = 8, seed: int = 0) -> DataLoader:
    """``n`` batches of 2 random 16-token sequences (``input_ids``, ``target_tokens``)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, 1024, (2, 17), generator=g)
        batches.append({"input_ids": ids[:, :-1], "target_tokens": ids[:, 1:]})
    return DataLoader(batches, batch_size=None)


def trainer(io: LoRACheckpointIO, **kwargs: Any) -> L.Trainer:
    """A quiet deterministic CPU Trainer with the plugin; ``kwargs`` override the defaults."""
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "deterministic": True,
        **kwargs,
    }
    return L.Trainer(plugins=[io], **settings)


def main() -> None:
    root, run_id, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ckpt_path = sys.argv[4] if len(sys.argv) > 4 else None
    L.seed_everything(0)
    module = UserLoRAModule()
    checkpoints = ModelCheckpoint(every_n_train_steps=2, save_top_k=-1, save_last=True)
    io = LoRACheckpointIO(root=root, run_id=run_id, async_save=False)
    trainer(io, max_steps=steps, callbacks=[checkpoints]).fit(module, data(4), ckpt_path=ckpt_path)
    print(digest(module.adapter()))


if __name__ == "__main__":
    main()
