"""Training-time callbacks: ``PeriodicCheckpoint`` (periodic, rolling, final, preemption; retention) and
``CheckpointTTL``."""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import operator
import time
from typing import Any, Literal

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from ..format.layout import CheckpointType
from ..format.manifest import Manifest
from ..format.records import Checkpoint
from ..format.strict_json import CheckpointFormatError
from ..format.ttl import parse_duration
from ..policy.retention import Retention, plan_retention
from ..storage.fs import storage_errors
from ..storage.read import read_manifest
from ..storage.store import CheckpointStore
from .checkpoint_io import LoRACheckpointIO
from .preemption import PreemptionSaver

log = logging.getLogger(__name__)

Kind = Literal["sampler", "state", "both"]
Cadence = Literal["periodic", "rolling", "final"]
_TYPES: dict[str, tuple[CheckpointType, ...]] = {
    "sampler": ("sampler",),
    "state": ("training",),
    "both": ("training", "sampler"),
}


def checkpoint_io(trainer: Trainer) -> LoRACheckpointIO:
    """The trainer's ``LoRACheckpointIO``, or a clear error if it has another plugin."""
    io = trainer.strategy.checkpoint_io
    if not isinstance(io, LoRACheckpointIO):
        raise RuntimeError(
            f"This callback needs Trainer(plugins=[LoRACheckpointIO(...)]), the trainer has {type(io).__name__}"
        )
    return io


class CheckpointTTL(Callback):
    """TTLs by cadence for the checkpoints ``PeriodicCheckpoint`` saves, and sweeps of expired ones.

    Args:
        periodic_ttl, rolling_ttl, final_ttl: seconds or ``"30m"``/``"2h"``/``"7d"``; None never expires.
        sweep: run the store's ``gc()`` (rank 0) when training starts and after the last write at its end.
    """

    def __init__(
        self,
        periodic_ttl: str | float | None = "7d",
        rolling_ttl: str | float | None = "2h",
        final_ttl: str | float | None = None,
        sweep: bool = True,
    ) -> None:
        self.ttl_seconds: dict[Cadence, float | None] = {
            "periodic": parse_duration(periodic_ttl),
            "rolling": parse_duration(rolling_ttl),
            "final": parse_duration(final_ttl),
        }
        self.sweep = sweep

    def _gc(self, trainer: Trainer) -> None:
        if not (self.sweep and trainer.is_global_zero):
            return
        io = checkpoint_io(trainer)
        io.wait()
        deleted = CheckpointStore(io.root, io.storage_options).gc()
        if deleted:
            rank_zero_info(f"CheckpointTTL: deleted {len(deleted)} expired checkpoint(s)")

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._gc(trainer)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._gc(trainer)


class PeriodicCheckpoint(Callback):
    """The cadences of a training loop, written through ``LoRACheckpointIO``.

    - *periodic*: every ``every_n_train_steps`` optimizer steps and/or ``every_n_seconds`` (decided on
      rank 0 and broadcast), named by zero-padded step (``000100``); ``kind`` is ``"sampler"``,
      ``"state"`` or ``"both"``;
    - *rolling*: a training checkpoint every ``rolling_every_n_steps`` named ``rolling-000150``; the
      previous rolling one is deleted only after the new one has committed;
    - *final*: ``final`` (of ``kind``) when fit ends;
    - *preemption* (``save_on_preemption``): on SIGTERM, or SLURM's requeue signal under Lightning's
      auto-requeue, a training checkpoint ``preempted-000123`` of the step reached, committed before the
      process exits (see ``lightning.preemption``); only the first such callback of a Trainer saves.

    Which periodic checkpoints stay: ``retention`` (a rule such as ``KeepLatest(2) | KeepBest("val_loss")``,
    or a list of rules, kept if any keeps it) is planned on rank 0 after each periodic save has committed,
    over the committed periodic checkpoints this callback wrote (never rolling, final or preemption ones, nor
    other callbacks'), with both types of a step judged together; what it does not keep is soft-deleted
    (``CheckpointStore.restore`` brings it back until ``gc`` purges it after its grace period). Published and
    pinned checkpoints and the newest training checkpoint are always kept. ``keep_last=N`` keeps the newest N
    of each type and deletes the older ones at once (not soft: a rotation that frees the space now).
    Either way a deletion of a type is skipped while the last save of that type has failed.

    TTLs come from a ``CheckpointTTL`` callback if the trainer has one. A name that already exists (a
    step replayed after a resume) is replaced, unless that checkpoint is published: then that save is
    skipped with a warning naming it (the published checkpoint keeps its bytes, its TTL and its public
    flag), and no rolling or ``keep_last`` deletion ever deletes a published checkpoint. ``trainer.fit(model, ckpt_path="last")`` resumes from the run's
    newest committed training checkpoint (whichever callback wrote it). It works beside Lightning's
    ``ModelCheckpoint`` (``enable_checkpointing`` on or off).
    """

    def __init__(
        self,
        every_n_train_steps: int | None = None,
        every_n_seconds: float | None = None,
        kind: Kind = "both",
        rolling_every_n_steps: int | None = None,
        keep_last: int | None = None,
        save_final: bool = True,
        retention: Retention | list[Retention] | None = None,
        save_on_preemption: bool = True,
    ) -> None:
        """See the class docstring.

        Raises:
            ValueError: an unknown ``kind``, a count or period that is not positive, ``retention`` that is not
                a rule or list of rules, or both ``keep_last`` and ``retention``.
        """
        if kind not in _TYPES:
            raise ValueError(f"kind must be one of {sorted(_TYPES)}, got {kind!r}")
        for name, value in (
            ("every_n_train_steps", every_n_train_steps),
            ("every_n_seconds", every_n_seconds),
            ("rolling_every_n_steps", rolling_every_n_steps),
            ("keep_last", keep_last),
        ):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive or None, got {value!r}")
        if keep_last is not None and retention is not None:
            raise ValueError(
                "Pass keep_last or retention, not both (retention=KeepLatest(n) keeps n steps, soft-deleting)"
            )
        self.every_n_train_steps = every_n_train_steps
        self.every_n_seconds = every_n_seconds
        self.kind = kind
        self.rolling_every_n_steps = rolling_every_n_steps
        self.keep_last = keep_last
        self.save_final = save_final
        self.retention = _union(retention)
        self.save_on_preemption = save_on_preemption
        self.preemption = PreemptionSaver()
        self.saved: dict[CheckpointType, list[str]] = {"training": [], "sampler": []}
        self._gone: collections.deque[tuple[CheckpointType, str]] = collections.deque()  # from the writer thread
        self.rolling: str | None = None
        #: The rolling checkpoint a save replaces, recorded in that save's own state: its deletion follows the save,
        #: and a resume from a process killed in between deletes it at the start.
        self._stale_rolling: str | None = None
        self._last_step = -1
        self._last_time = time.monotonic()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_train_steps=self.every_n_train_steps,
            every_n_seconds=self.every_n_seconds,
            kind=self.kind,
            rolling_every_n_steps=self.rolling_every_n_steps,
        )

    # -- when to save -----------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        checkpoint_io(trainer)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_time = time.monotonic()
        self._last_step = trainer.global_step  # nothing new to save at the step a resume starts from
        stale, self._stale_rolling = self._stale_rolling, None
        if stale and stale != self.rolling:
            trainer.strategy.remove_checkpoint(checkpoint_io(trainer).resolve(stale, "training"))
        if self._saves_on_preemption(trainer):
            self.preemption.start(trainer)

    def _saves_on_preemption(self, trainer: Trainer) -> bool:
        first = next(
            (c for c in trainer.callbacks if isinstance(c, PeriodicCheckpoint) and c.save_on_preemption),  # type: ignore[attr-defined]
            None,
        )
        return first is self

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step:  # gradient accumulation: no optimizer step since the last batch
            return
        self._last_step = step
        periodic = bool(self.every_n_train_steps and step % self.every_n_train_steps == 0)
        if self.every_n_seconds is not None:
            elapsed = trainer.strategy.broadcast(time.monotonic() - self._last_time >= self.every_n_seconds)
            periodic = periodic or elapsed
        if periodic:
            self._last_time = time.monotonic()
            name = f"{step:06d}"
            self._save(trainer, name, self._unpublished(trainer, name, _TYPES[self.kind]), "periodic")
            self._prune(trainer)
            self._retain(trainer)
        rolling_due = self.rolling_every_n_steps and step % self.rolling_every_n_steps == 0
        if rolling_due and not (periodic and "training" in _TYPES[self.kind]):
            self._save_rolling(trainer, f"rolling-{step:06d}")
        self.preemption.on_batch_end(trainer, checkpoint_io(trainer))

    def _save_rolling(self, trainer: Trainer, name: str) -> None:
        if not self._unpublished(trainer, name, ("training",)):
            return  # the previous rolling checkpoint stays the rolling one
        previous, self.rolling, self._stale_rolling = self.rolling, name, self.rolling
        self._save(trainer, name, ("training",), "rolling")
        self._stale_rolling = None
        if previous:
            trainer.strategy.remove_checkpoint(checkpoint_io(trainer).resolve(previous, "training"))

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.preemption.on_epoch_end(trainer, checkpoint_io(trainer))

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """On SIGTERM during fit (Lightning's ``SIGTERMException``): commit ``preempted-<step>`` before the exit."""
        io = trainer.strategy.checkpoint_io
        if isinstance(io, LoRACheckpointIO):  # else setup has refused the Trainer already
            self.preemption.on_exception(trainer, io, exception)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.preemption.stop()
        if self.save_final:
            self._save(trainer, "final", self._unpublished(trainer, "final", _TYPES[self.kind]), "final")

    # -- saving -----------------------------------------------------------------------------------
    @staticmethod
    def _unpublished(trainer: Trainer, name: str, types: tuple[CheckpointType, ...]) -> tuple[CheckpointType, ...]:
        """The types of ``types`` whose checkpoint ``name`` is not published (decided on rank 0, broadcast).

        A published checkpoint is never replaced (the storage would refuse it): its save is skipped, with a
        warning naming it.
        """
        io = checkpoint_io(trainer)
        keep = types
        if trainer.is_global_zero:
            published = [t for t in types if _is_published(io, io.resolve(name, t))]
            for checkpoint_type in published:
                log.warning(
                    "PeriodicCheckpoint: not saving %s checkpoint %s: %s is published and is never replaced "
                    "(a step replayed after a resume); it is left as it is",
                    checkpoint_type,
                    name,
                    io.resolve(name, checkpoint_type),
                )
            keep = tuple(t for t in types if t not in published)
        return tuple(trainer.strategy.broadcast(keep))

    def _save(self, trainer: Trainer, name: str, types: tuple[CheckpointType, ...], cadence: Cadence) -> None:
        if cadence == "periodic":  # recorded first, so the training checkpoint's own callback state lists it
            for checkpoint_type in types:
                self.saved[checkpoint_type].append(name)
        ttl = next((cb.ttl_seconds[cadence] for cb in trainer.callbacks if isinstance(cb, CheckpointTTL)), None)  # type: ignore[attr-defined]  # Trainer.callbacks is set by its CallbackConnector
        options = {"overwrite": True, **({"ttl_seconds": ttl} if ttl else {})}
        for checkpoint_type in types:
            trainer.save_checkpoint(name, weights_only=checkpoint_type == "sampler", storage_options=options)
        if "training" in types:
            self.preemption.saved(trainer.global_step)

    def _prune(self, trainer: Trainer) -> None:
        if self.keep_last is None:
            return
        io = checkpoint_io(trainer)
        for checkpoint_type, names in self.saved.items():
            while len(names) > self.keep_last:
                trainer.strategy.remove_checkpoint(io.resolve(names.pop(0), checkpoint_type))

    def _retain(self, trainer: Trainer) -> None:
        """Queue, behind this step's saves, the retention plan over this callback's periodic checkpoints and the
        soft deletion of what it does not keep (rank 0: the other ranks' plugins write nothing)."""
        self._forget_gone()
        if self.retention is None or not trainer.is_global_zero:
            return
        io, retention, gone = checkpoint_io(trainer), self.retention, self._gone
        own = [(t, name, io.resolve(name, t)) for t, names in self.saved.items() for name in dict.fromkeys(names)]

        def select() -> list[str]:
            mine = []
            for checkpoint_type, name, uri in own:
                manifest = _committed(io, uri)
                if manifest is None:
                    gone.append((checkpoint_type, name))
                else:
                    mine.append(Checkpoint.from_manifest(manifest, uri))
            plan = plan_retention(mine, retention)
            if plan.over_budget:
                log.warning("PeriodicCheckpoint: the checkpoints %s keeps exceed its byte budget; kept", retention)
            return [c.path for c in plan.delete]

        io.retire_after_saves(select)

    def _forget_gone(self) -> None:
        """Drop the names the writer thread found no longer committed (retired, failed): out of scope from now on."""
        while self._gone:
            checkpoint_type, name = self._gone.popleft()
            with contextlib.suppress(ValueError):
                self.saved[checkpoint_type].remove(name)

    @override
    def state_dict(self) -> dict[str, Any]:
        self._forget_gone()
        return {
            "saved": {t: list(v) for t, v in self.saved.items()},
            "rolling": self.rolling,
            "stale_rolling": self._stale_rolling,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.saved = {t: list(v) for t, v in state_dict["saved"].items()}
        self.rolling = state_dict.get("rolling")
        self._stale_rolling = state_dict.get("stale_rolling")


def _union(retention: Retention | list[Retention] | None) -> Retention | None:
    """One rule for ``retention``: a list (as YAML gives it) is the union of its rules."""
    if retention is None or isinstance(retention, Retention):
        return retention
    rules = list(retention) if isinstance(retention, (list, tuple)) else None
    if not rules or not all(isinstance(rule, Retention) for rule in rules):
        raise ValueError(f"retention must be a Retention rule or a non-empty list of them, got {retention!r}")
    return functools.reduce(operator.or_, rules)


def _committed(io: LoRACheckpointIO, uri: str) -> Manifest | None:
    """The manifest of a committed, not soft-deleted checkpoint at ``uri``, else None."""
    with storage_errors("list checkpoints", uri):
        try:
            manifest = read_manifest(uri, io.storage_options)
        except CheckpointFormatError:
            return None
    return manifest if manifest.deleted_at is None else None


def _is_published(io: LoRACheckpointIO, uri: str) -> bool:
    """Whether a committed checkpoint at ``uri`` is published (none there, or unreadable: not published)."""
    try:
        return read_manifest(uri, io.storage_options).public
    except (CheckpointFormatError, OSError):  # the storage itself refuses to replace a published checkpoint
        return False
