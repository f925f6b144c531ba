"""The listing index's contract (lightning_lora_ckpt/storage/index.py), run on every backend.

A mixin of the storage contract (tests/storage_suite.py): tests/test_storage_backends.py adds it to each backend's
class, which provides ``self.uri`` and ``self.options``. The truth is always the manifests: after any sequence of
changes, crashes between a change and its settle, or a torn or hostile index, what a listing returns must be
exactly what reading every manifest gives.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from helpers.checkpoints import fake_checkpoint, populate
from helpers.cli import cli_json
from lightning_lora_ckpt import CheckpointFormatError, CheckpointStore, LoRACheckpointIO
from lightning_lora_ckpt.format.index_entry import IndexEntry
from lightning_lora_ckpt.policy.retention import KeepLatest
from lightning_lora_ckpt.storage import index as index_module
from lightning_lora_ckpt.storage import lifecycle
from lightning_lora_ckpt.storage.index import INDEX_FILE, RunIndex


class IndexContract:
    """Listing through the per-run index agrees with the manifests, whatever happens to the index."""

    uri: str
    options: dict[str, Any]

    def _store(self) -> CheckpointStore:
        return CheckpointStore(self.uri, self.options)

    def _truth(self, store: CheckpointStore, run_id: str) -> list[tuple[str, Any]]:
        """What reading every manifest of the run gives: (checkpoint id, entry data), sorted."""
        manifests = store._run_index(run_id).scan()
        return sorted((f"{k}/{n}", IndexEntry.data_of(m)) for (k, n), m in manifests.items())

    def _indexed(self, store: CheckpointStore, run_id: str) -> list[tuple[str, Any]]:
        """What the run's index document holds (raises if there is none)."""
        raw = store.fs.cat_file(f"{store._root_path}/{run_id}/{INDEX_FILE}")
        return sorted(json.loads(raw)["checkpoints"].items())

    def _listed(self, store: CheckpointStore, run_id: str) -> list[str]:
        return sorted(c.checkpoint_id for c in store.list_checkpoints(run_id))

    def test_every_change_keeps_the_index_equal_to_the_manifests(self) -> None:
        populate(self.uri, self.options)
        store = self._store()
        assert self._indexed(store, "r1") == self._truth(store, "r1") and len(self._truth(store, "r1")) == 3
        store.set_ttl("lora://r1/weights/t1", "2h")
        store.publish("lora://r1/sampler_weights/s1")
        store.pin("lora://r1/weights/t2")
        assert self._indexed(store, "r1") == self._truth(store, "r1")
        store.unpublish("lora://r1/sampler_weights/s1")
        store.prune("r1", KeepLatest(1))  # soft-deletes the step-1 checkpoints t1 and s1
        assert self._indexed(store, "r1") == self._truth(store, "r1")
        soft = sorted(d.checkpoint.checkpoint_id for d in store.deleted("r1"))
        assert soft == ["sampler_weights/s1", "weights/t1"] and self._listed(store, "r1") == ["weights/t2"]
        store.restore("lora://r1/sampler_weights/s1")
        store.delete("lora://r1/weights/t1")
        assert self._indexed(store, "r1") == self._truth(store, "r1")
        assert self._listed(store, "r1") == ["sampler_weights/s1", "weights/t2"]
        assert store._run_index("r1")._intents() == []  # every writer settled and dropped its intent

    def test_a_current_index_lists_without_reading_a_manifest(self, monkeypatch: pytest.MonkeyPatch) -> None:
        populate(self.uri, self.options)
        store = self._store()
        reads: list[Any] = []
        read = RunIndex._read
        monkeypatch.setattr(RunIndex, "_read", lambda self, keys: read(self, reads.extend(keys) or keys))
        assert self._listed(store, "r1") == ["sampler_weights/s1", "weights/t1", "weights/t2"]
        assert store.last_checkpoint("r1").checkpoint_id == "weights/t2"
        assert reads == []

    def test_a_writer_that_died_before_settling_is_seen_and_settled_later(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        populate(self.uri, self.options)
        store = self._store()
        io = LoRACheckpointIO(root=self.uri, run_id="r1", async_save=False, storage_options=self.options)
        with monkeypatch.context() as m:  # the process "dies" between its change and its settle
            m.setattr(RunIndex, "settle", lambda self, key: False)
            io.save_checkpoint(fake_checkpoint(7), "t7")
            store.delete("lora://r1/weights/t1")
        assert self._listed(store, "r1") == ["sampler_weights/s1", "weights/t2", "weights/t7"]
        assert self._indexed(store, "r1") != self._truth(store, "r1")  # the index alone would be wrong
        assert store.last_checkpoint("r1").checkpoint_id == "weights/t7"
        monkeypatch.setattr(lifecycle, "STALE_INTENT_AFTER", 0.0)
        store.gc()
        assert self._indexed(store, "r1") == self._truth(store, "r1")
        assert store._run_index("r1")._intents() == []

    def test_a_torn_or_malformed_index_is_ignored_and_repaired(self) -> None:
        populate(self.uri, self.options)
        store = self._store()
        io = LoRACheckpointIO(root=self.uri, run_id="r1", async_save=False, storage_options=self.options)
        path = f"{store._root_path}/r1/{INDEX_FILE}"
        good = json.loads(store.fs.cat_file(path))
        entry = good["checkpoints"]["weights/t1"]

        def crafted(run_id: str = "r1", **entries: Any) -> bytes:
            return json.dumps({**good, "run_id": run_id, "checkpoints": {**good["checkpoints"], **entries}}).encode()

        hostile = {
            "empty": b"",
            "torn": b'{"format": "lightning-lora-ckpt-index", "format_version": 1, "run_id": "r1", "checkpoints": {',
            "array": b"[1, 2]",
            "deep": b"{" * 100_000,
            "other-run": crafted("r2"),
            "traversal": crafted(**{"weights/../../x": entry}),
            "wrong-kind": crafted(**{"sampler_weights/t1": entry}),
            "extra-key": crafted(**{"weights/t1": {**entry, "files": {}}}),
            "bad-type": crafted(**{"weights/t1": {**entry, "step": -1}}),
        }
        for step, (case, raw) in enumerate(hostile.items(), 3):
            store.fs.pipe_file(path, raw)
            listed = self._listed(store, "r1")
            assert listed[:2] == ["sampler_weights/s1", "weights/t1"] and "weights/t2" in listed, case
            assert store.last_checkpoint("r1").checkpoint_id == ("weights/t2" if step == 3 else f"weights/t{step - 1}")
            io.save_checkpoint(fake_checkpoint(step), f"t{step}")  # the next writer rewrites it from the manifests
            assert self._indexed(store, "r1") == self._truth(store, "r1"), case

    def test_a_well_formed_index_that_lies_never_moves_the_resume_point(self) -> None:
        """An index that names a checkpoint without a manifest, or lost entries (e.g. an older version wrote to
        the run), is taken at its word only for listing: the resume point is confirmed by the manifests, gc and
        reindex rewrite the index."""
        populate(self.uri, self.options)
        store = self._store()
        path = f"{store._root_path}/r1/{INDEX_FILE}"
        good = json.loads(store.fs.cat_file(path))
        invented = {**good["checkpoints"]["weights/t1"], "step": 9}
        store.fs.pipe_file(
            path, json.dumps({**good, "checkpoints": {**good["checkpoints"], "weights/t9": invented}}).encode()
        )
        assert store.last_checkpoint("r1").checkpoint_id == "weights/t2"
        with pytest.raises(CheckpointFormatError, match="missing"):
            store.get("lora://r1/weights/t9")
        store.gc()
        assert self._indexed(store, "r1") == self._truth(store, "r1")
        store.fs.pipe_file(path, json.dumps({**good, "checkpoints": {}}).encode())
        assert store.last_checkpoint("r1").checkpoint_id == "weights/t2"
        assert store.last_checkpoint("r1", "sampler").checkpoint_id == "sampler_weights/s1"
        assert store.reindex("r1")[0].added == ["sampler_weights/s1", "weights/t1", "weights/t2"]
        assert self._listed(store, "r1") == ["sampler_weights/s1", "weights/t1", "weights/t2"]

    def test_an_oversized_index_is_not_read(self, monkeypatch: pytest.MonkeyPatch) -> None:
        populate(self.uri, self.options)
        monkeypatch.setattr(index_module, "MAX_INDEX_BYTES", 100)
        assert self._listed(self._store(), "r1") == ["sampler_weights/s1", "weights/t1", "weights/t2"]

    def test_a_run_without_an_index_is_listed_and_indexed_by_its_next_writer(self) -> None:
        populate(self.uri, self.options)
        store = self._store()
        store.fs.rm_file(f"{store._root_path}/r1/{INDEX_FILE}")  # as an older version left it
        assert self._listed(store, "r1") == ["sampler_weights/s1", "weights/t1", "weights/t2"]
        store.set_ttl("lora://r1/weights/t1", "1h")
        assert self._indexed(store, "r1") == self._truth(store, "r1") and len(self._truth(store, "r1")) == 3

    def test_reindex_reports_and_repairs(self) -> None:
        populate(self.uri, self.options)
        store = self._store()
        path = f"{store._root_path}/r1/{INDEX_FILE}"
        document = json.loads(store.fs.cat_file(path))
        del document["checkpoints"]["weights/t1"]
        document["checkpoints"]["weights/t2"]["step"] = 99
        store.fs.pipe_file(path, json.dumps(document).encode())
        report = store.reindex("r1")[0]
        assert (report.previous, report.added, report.changed) == ("stale", ["weights/t1"], ["weights/t2"])
        assert self._indexed(store, "r1") == self._truth(store, "r1")
        store.fs.pipe_file(path, b"garbage")
        if self.uri.startswith("memory://"):  # a store of this process only: no CLI
            out = [r.to_dict() for r in store.reindex()]
        else:
            out = cli_json("reindex", "--root", self.uri, "--storage-options", json.dumps(self.options))
        assert [(r["run_id"], r["previous"]) for r in out] == [("r1", "invalid"), ("r2", "current")]
        with pytest.raises(KeyError, match="No run 'nope'"):
            store.reindex("nope")

    def test_concurrent_writers_keep_the_index_exact(self) -> None:
        populate(self.uri, self.options)
        store = self._store()
        errors: list[BaseException] = []

        def writer(i: int) -> None:
            try:
                io = LoRACheckpointIO(root=self.uri, run_id="r1", async_save=False, storage_options=self.options)
                for j in range(3):
                    io.save_checkpoint(fake_checkpoint(10 * i + j), f"c{i}-{j}")
                store.set_ttl(f"lora://r1/weights/c{i}-0", "1h")
                store.delete(f"lora://r1/weights/c{i}-1")
            except BaseException as err:
                errors.append(err)

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert self._indexed(store, "r1") == self._truth(store, "r1") and len(self._truth(store, "r1")) == 3 + 8
