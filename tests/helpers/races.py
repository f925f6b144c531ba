"""Two processes racing on one checkpoint's metadata, round after round, released together by a barrier.

The test process prepares each round (a fresh checkpoint, a reset flag), then both workers run their
operation of that round at once; every outcome (the returned record, or the error's type and message)
comes back at the end. Workers are spawned processes with a storage client of their own, as two hosts
would have.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.synchronize
from datetime import timedelta
from typing import Any

from helpers.checkpoints import fake_checkpoint
from lightning_lora_ckpt import CheckpointStore, LoRACheckpointIO
from lightning_lora_ckpt.format.strict_json import utcnow

#: One worker's operation in a round: (name, argument); see :func:`_apply`.
Op = tuple[str, Any]
#: What an operation gave: ("ok", public, expires_at iso or None) or ("error", type name, message).
Outcome = tuple[str, Any, Any]


def _apply(store: CheckpointStore, io: LoRACheckpointIO, uri: str, op: Op) -> Outcome:
    name, arg = op
    try:
        if name == "publish":
            c = store.publish(uri)
        elif name == "unpublish":
            c = store.unpublish(uri)
        elif name == "set_ttl":
            c = store.set_ttl(uri, arg)
        elif name == "delete":
            c = store.delete(uri)
        elif name == "gc":  # arg: hours ahead of now that expiry is judged at
            deleted = store.gc(now=utcnow() + timedelta(hours=arg))
            return ("ok", [d.path for d in deleted], None)
        elif name == "overwrite":  # arg: the step (version) saved over the checkpoint
            io.save_checkpoint(fake_checkpoint(arg, training=False), uri, {"overwrite": True})
            return ("ok", arg, None)
        else:
            raise ValueError(f"unknown operation {name!r}")
    except Exception as err:
        return ("error", type(err).__name__, str(err))
    return ("ok", c.public, c.expires_at.isoformat() if c.expires_at else None)


def _worker(
    root: str,
    options: dict[str, Any],
    uri: str,
    index: int,
    ops: list[Op],
    start: multiprocessing.synchronize.Barrier,
    done: multiprocessing.synchronize.Barrier,
    results: Any,
) -> None:
    store = CheckpointStore(root, options)
    io = LoRACheckpointIO(root=root, run_id="race", async_save=False, storage_options=options)
    outcomes = []
    for op in ops:
        start.wait(timeout=120)
        outcomes.append(_apply(store, io, uri, op))
        done.wait(timeout=120)
    results.put((index, outcomes))


class Race:
    """One spawned worker per plan, released round by round (use as a context manager).

    Args:
        root: the checkpoint root.
        options: its storage options.
        uri: the checkpoint the operations act on.
        plans: each worker's operations, one per round (all plans the same length).
    """

    def __init__(self, root: str, options: dict[str, Any], uri: str, plans: list[list[Op]]) -> None:
        ctx = mp.get_context("spawn")
        self._start, self._done = ctx.Barrier(len(plans) + 1), ctx.Barrier(len(plans) + 1)
        self._results = ctx.Queue()
        self._workers = [
            ctx.Process(target=_worker, args=(root, options, uri, i, p, self._start, self._done, self._results))
            for i, p in enumerate(plans)
        ]

    def __enter__(self) -> Race:
        for w in self._workers:
            w.start()
        return self

    def round(self) -> None:
        """Release every worker's next operation at once and wait until all have finished it."""
        self._start.wait(timeout=300)
        self._done.wait(timeout=300)

    def outcomes(self) -> list[list[Outcome]]:
        """Each worker's outcomes, by round (call after the last round)."""
        return [outcomes for _, outcomes in sorted(self._results.get(timeout=60) for _ in self._workers)]

    def __exit__(self, *exc: object) -> None:
        for w in self._workers:
            w.join(timeout=30)
            if w.is_alive():
                w.kill()
