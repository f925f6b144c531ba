"""File digests: BLAKE3 and sha256 against their reference implementations, reads capped at a limit, a forked
child hashing after its parent did (BLAKE3's thread pool does not survive fork), old sha256 manifests."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import blake3
import pytest

from helpers.checkpoints import fake_checkpoint
from lightning_lora_ckpt import CheckpointStore, LoRACheckpointIO
from lightning_lora_ckpt.format.digests import digest_hex, file_digest, read_with_digest
from lightning_lora_ckpt.storage.loading import open_checkpoint


@pytest.mark.parametrize("size", [1, 7, 8 << 20, (8 << 20) + 3, (3 << 23) + 5])
def test_digests_match_the_reference_implementations(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    assert file_digest(path) == (size, blake3.blake3(data).hexdigest()) == (size, digest_hex(data))
    assert file_digest(path, "sha256") == (size, hashlib.sha256(data).hexdigest())
    read, digest = read_with_digest(path, size)
    assert bytes(read) == data and digest == blake3.blake3(data).hexdigest() and not read.readonly
    capped, _ = read_with_digest(path, size // 2)
    assert bytes(capped) == data[: size // 2 + 1]  # one byte past the limit shows the file is longer


def test_a_forked_child_hashes_after_its_parent_did() -> None:
    data = os.urandom(32 << 20)
    expected = digest_hex(data)  # starts BLAKE3's thread pool in this process
    pid = os.fork()
    if pid == 0:
        os._exit(0 if digest_hex(data) == expected else 1)
    _, status = os.waitpid(pid, 0)  # pytest-timeout ends a hang
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_checkpoint_listing_sha256_digests_still_loads_and_verifies(tmp_path: Path) -> None:
    io = LoRACheckpointIO(root=str(tmp_path), run_id="run", async_save=False)
    io.save_checkpoint(fake_checkpoint(1), "t1")
    directory = tmp_path / "run" / "weights" / "t1"
    manifest_path = directory / "checkpoint.json"
    manifest = json.loads(manifest_path.read_text())
    assert all(set(entry) == {"size", "blake3"} for entry in manifest["files"].values())
    manifest["files"] = {
        name: {"size": entry["size"], "sha256": hashlib.sha256((directory / name).read_bytes()).hexdigest()}
        for name, entry in manifest["files"].items()
    }
    manifest_path.write_text(json.dumps(manifest))  # what a checkpoint written before BLAKE3 lists
    assert CheckpointStore(str(tmp_path)).verify(str(directory)).ok
    assert open_checkpoint(str(directory), with_state=True).manifest.files["training_state.json"].algorithm == "sha256"
    (directory / "training_state.json").write_bytes(b"{}")
    assert not CheckpointStore(str(tmp_path)).verify(str(directory)).ok
