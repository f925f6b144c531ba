"""The fast local tier of ``LoRACheckpointIO``: saves commit to a local disk, then are mirrored to the durable root.

On spot or preemptible machines the durable root (S3, GCS, a network disk) is slow to write and the local
NVMe disk is fast but may vanish with the machine. With ``LoRACheckpointIO(local_tier="/local/nvme/dir")``
each save of the layout ``<root>/<run>/<kind>/<name>`` commits under ``<local_tier>/<run>/<kind>/<name>``
(the local commit protocol: atomic, fsynced), and one background thread copies each committed checkpoint to
the durable root, in commit order, every file verified (:func:`~..storage.mirror.copy_checkpoint`). Once
a checkpoint is mirrored, older local copies of its run and kind are removed (the newest stays for a fast
resume). Resuming (``ckpt_path="last"``) takes the newest committed training checkpoint of either tier.
Losing the local disk loses at most the checkpoints not yet mirrored; ``teardown`` (the end of fit) waits
for the mirror.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ..format import layout
from ..format.layout import CheckpointType
from ..format.records import RUN_FILE, Checkpoint
from ..policy.retention import checkpoint_order
from ..storage.commit import delete_checkpoint, write_if_absent
from ..storage.fs import CheckpointWriteError
from ..storage.mirror import copy_checkpoint
from ..storage.store import CheckpointStore

log = logging.getLogger(__name__)


class LocalTier:
    """Local commits mirrored to a durable root in the background (see the module docstring).

    Args:
        directory: the local directory (created if absent).
        durable_root: the plugin's root, where checkpoints are mirrored.
        storage_options: fsspec options of the durable root.
        on_failure: called with the error of a failed mirror (the plugin raises or warns per ``on_error``).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        durable_root: str,
        storage_options: dict[str, Any],
        on_failure: Callable[[CheckpointWriteError], None],
    ) -> None:
        self.directory = os.path.abspath(os.fspath(directory))
        self.durable_root = durable_root.rstrip("/")
        self.storage_options = storage_options
        self._on_failure = on_failure
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future[None]] = []
        self._lock = threading.Lock()

    def local_uri(self, uri: str) -> str | None:
        """Where a save to the durable ``uri`` commits locally; None for a URI outside the durable root's layout."""
        parts = layout.split_checkpoint_uri(uri)
        if parts is None or parts[0].rstrip("/") != self.durable_root:
            return None
        _, run_id, checkpoint_type, name = parts
        return layout.checkpoint_uri(self.directory, run_id, checkpoint_type, name)

    def mirror(self, local: str, durable: str) -> None:
        """Queue the copy of the locally committed ``local`` to ``durable`` (after every job queued before it).

        Args:
            local: the local checkpoint just committed.
            durable: its URI under the durable root.
        """
        self.submit(lambda: self._copy(local, durable), f"mirror checkpoint {local} to")

    def submit(self, job: Callable[[], Any], action: str) -> None:
        """Queue ``job`` behind every mirror queued before it (a deletion at the durable root must follow the
        mirror of what it deletes); a failure goes to ``on_failure`` as a ``CheckpointWriteError``.

        Args:
            job: what to run in the mirror thread.
            action: what it does, for the error message ("mirror checkpoint X to" / "delete checkpoint").
        """

        def run() -> None:
            try:
                job()
            except Exception as err:
                self._on_failure(
                    CheckpointWriteError(f"Could not {action} the durable root {self.durable_root}: {err}")
                )

        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="lora-ckpt-mirror")
            self._pending = [f for f in self._pending if not f.done()]
            self._pending.append(self._pool.submit(run))

    def _copy(self, local: str, durable: str) -> None:
        run_root, run_id, checkpoint_type, name = layout.split_checkpoint_uri(durable) or ("", "", "training", "")
        with open(os.path.join(self.directory, run_id, RUN_FILE), "rb") as f:
            write_if_absent(layout.join(run_root, run_id, RUN_FILE), f.read(), self.storage_options)
        copy_checkpoint(local, durable, None, self.storage_options)
        log.info("Mirrored checkpoint %s to %s", local, durable)
        self._drop_older(run_id, checkpoint_type, name)

    def _drop_older(self, run_id: str, checkpoint_type: CheckpointType, name: str) -> None:
        """Remove the local copies of ``run_id``'s checkpoints of that type older than the one just mirrored."""
        local = CheckpointStore(self.directory)
        checkpoints = [c for c in local.list_checkpoints(run_id) if c.checkpoint_type == checkpoint_type]
        mirrored = next((c for c in checkpoints if c.path.endswith(f"/{name}")), None)
        # Newest first: in a snapshot chain a delta goes before the parent it needs (which stays while one does).
        for older in sorted(checkpoints, key=checkpoint_order, reverse=True):
            if mirrored is not None and checkpoint_order(older) < checkpoint_order(mirrored):
                delete_checkpoint(older.path)

    def forget(self, durable: str) -> None:
        """Delete the local copy of a checkpoint deleted from the durable root (if there is one).

        Args:
            durable: the checkpoint's URI under the durable root.
        """
        local = self.local_uri(durable)
        if local is not None:
            delete_checkpoint(local)

    def newest(self, run_id: str, checkpoint_type: CheckpointType = "training") -> Checkpoint | None:
        """The newest committed checkpoint of ``run_id`` in the local tier, or None.

        Args:
            run_id: the run.
            checkpoint_type: ``"training"`` or ``"sampler"``.

        Returns:
            Its record, or None.
        """
        if not os.path.isdir(os.path.join(self.directory, run_id)):
            return None
        return CheckpointStore(self.directory).last_checkpoint(run_id, checkpoint_type)

    def wait(self) -> None:
        """Block until every queued mirror has finished (their failures went to ``on_failure``)."""
        with self._lock:
            pending = list(self._pending)
        for future in pending:
            with contextlib.suppress(Exception):
                future.result()

    def close(self) -> None:
        """Wait for the mirror, then stop its thread."""
        self.wait()
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


def newest_of(*checkpoints: Checkpoint | None) -> Checkpoint | None:
    """The newest (highest step, then latest) of the given checkpoints, ignoring None.

    Args:
        checkpoints: records, or None.

    Returns:
        The newest record, or None if none was given.
    """
    present = [c for c in checkpoints if c is not None]
    return max(present, key=checkpoint_order, default=None)
