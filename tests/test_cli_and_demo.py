"""The command line end to end, and `make demo` itself."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_lora_ckpt import CheckpointStore, LoRAModule

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lightning_lora_ckpt.cli", *args], capture_output=True, text=True)


def test_list_json_and_table(trained) -> None:
    module, io, _ = trained
    module.save_state("t", ttl_seconds=600)
    module.save_weights_for_sampler("s")
    out = cli("list", "--root", io.root, "--json")
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)["run"]
    assert [(c["checkpoint_id"], c["step"], c["lora_rank"]) for c in listed] == [
        ("weights/t", 4, 4),
        ("sampler_weights/s", 4, 4),
    ]
    assert listed[0]["expires_at"] is not None and listed[1]["expires_at"] is None
    table = cli("list", "run", "--root", io.root)
    assert table.returncode == 0 and "sampler_weights/s" in table.stdout and "weights/t" in table.stdout


def test_unknown_run_is_a_one_line_error(tmp_path: Path) -> None:
    out = cli("list", "nope", "--root", str(tmp_path))
    assert out.returncode == 1
    assert out.stderr.strip().startswith("error: No run 'nope'") and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_make_demo_trains_checkpoints_and_resumes() -> None:
    out = subprocess.run(["make", "demo"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    first, last = map(float, re.search(r"train_loss: ([\d.]+) at step \d+ -> ([\d.]+)", out.stdout).groups())
    assert last < first - 2.0, out.stdout[-2000:]
    assert "Restored all states from the checkpoint at lora://demo/weights/final" in out.stderr + out.stdout
    store = CheckpointStore(str(REPO / "checkpoints"))
    ids = {c.checkpoint_id: c.step for c in store.list_checkpoints("demo")}
    assert ids == {
        "weights/000050": 50,
        "sampler_weights/000050": 50,
        "weights/000100": 100,
        "sampler_weights/000100": 100,
        "weights/final": 130,
        "sampler_weights/final": 130,
    }
    module = LoRAModule.from_checkpoint("lora://demo/sampler_weights/final", root=str(REPO / "checkpoints"))
    assert module.hparams.rank == 16
