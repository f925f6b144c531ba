"""Training-time callbacks: ``PeriodicCheckpoint``."""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch import Callback, LightningModule, Trainer

from .io import LoRACheckpointIO
from .uris import CheckpointType

Kind = Literal["sampler", "state", "both"]
_TYPES: dict[str, tuple[CheckpointType, ...]] = {
    "sampler": ("sampler",),
    "state": ("training",),
    "both": ("training", "sampler"),
}


class PeriodicCheckpoint(Callback):
    """Saves checkpoints named by zero-padded step (``000100``) every N steps, and ``final`` at the end of fit.

    Args:
        every_n_train_steps: save after every N optimizer steps (None: no periodic saves).
        kind: ``"sampler"`` (adapter only), ``"state"`` (training checkpoint) or ``"both"``.
        keep_last: keep only the newest N periodic checkpoints of each type (older ones are deleted
            after the newer ones are committed); None keeps all.
        save_final: save ``final`` (of ``kind``) when fit ends.
    """

    def __init__(
        self,
        every_n_train_steps: int | None = None,
        kind: Kind = "both",
        keep_last: int | None = None,
        save_final: bool = True,
    ) -> None:
        if kind not in _TYPES:
            raise ValueError(f"kind must be one of {sorted(_TYPES)}, got {kind!r}")
        for name, value in (("every_n_train_steps", every_n_train_steps), ("keep_last", keep_last)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        self.every_n_train_steps = every_n_train_steps
        self.kind = kind
        self.keep_last = keep_last
        self.save_final = save_final
        self.saved: dict[str, list[str]] = {t: [] for t in ("training", "sampler")}
        self._last_step = -1

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not isinstance(trainer.strategy.checkpoint_io, LoRACheckpointIO):
            raise RuntimeError("PeriodicCheckpoint needs Trainer(plugins=[LoRACheckpointIO(...)])")

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.every_n_train_steps and step % self.every_n_train_steps == 0 and step != self._last_step:
            self._last_step = step
            self._save(trainer, f"{step:06d}")
            self._prune(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.save_final:
            io = trainer.strategy.checkpoint_io
            for checkpoint_type in _TYPES[self.kind]:
                trainer.strategy.remove_checkpoint(io.resolve("final", checkpoint_type))
            self._save(trainer, "final")

    def _save(self, trainer: Trainer, name: str) -> None:
        if name != "final":  # recorded first, so the training checkpoint's own callback state lists it
            for checkpoint_type in _TYPES[self.kind]:
                self.saved[checkpoint_type].append(name)
        for checkpoint_type in _TYPES[self.kind]:
            trainer.save_checkpoint(name, weights_only=checkpoint_type == "sampler")

    def _prune(self, trainer: Trainer) -> None:
        if self.keep_last is None:
            return
        io = trainer.strategy.checkpoint_io
        for checkpoint_type, names in self.saved.items():
            while len(names) > self.keep_last:
                trainer.strategy.remove_checkpoint(io.resolve(names.pop(0), checkpoint_type))

    def state_dict(self) -> dict[str, Any]:
        return {"saved": {t: list(v) for t, v in self.saved.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.saved = {t: list(v) for t, v in state_dict["saved"].items()}
