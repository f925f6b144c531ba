"""The command line end to end (subprocess, JSON parsed back), and `make demo` itself.

The management commands on each backend are part of the storage contract (tests/storage_suite.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.checkpoints import fake_checkpoint
from helpers.cli import cli
from lightning_lora_ckpt import CheckpointStore, LoRACheckpointIO, LoRAModule

REPO = Path(__file__).resolve().parents[1]


def test_errors_are_one_line_with_nonzero_exit(tmp_path: Path) -> None:
    for args in (
        ("list", "nope", "--root", str(tmp_path)),
        ("info", "lora://run/weights/missing", "--root", str(tmp_path)),
        ("set-ttl", "lora://run/weights/x", "--root", str(tmp_path)),
        ("info", "lora://run/bad-kind/x"),
    ):
        out = cli(*args)
        assert out.returncode == 1, args
        assert out.stderr.startswith("error: ") and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_verify_reports_damage_with_exit_code_2(tmp_path: Path) -> None:
    io = LoRACheckpointIO(root=str(tmp_path), run_id="run", async_save=False)
    io.save_checkpoint(fake_checkpoint(1), "t1")
    (tmp_path / "run" / "weights" / "t1" / "training_state.json").write_text("{}")
    out = cli("verify", "lora://run/weights/t1", "--root", str(tmp_path))
    assert out.returncode == 2 and "DAMAGED" in out.stdout and "training_state.json" in out.stdout


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


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "examples").glob("*.yaml")))
def test_example_configs_parse(config: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lightning_lora_ckpt", "fit", "-c", f"examples/{config}", "--print_config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.slow
def test_lifecycle_config_trains_and_autoresumes(tmp_path: Path) -> None:
    root = tmp_path / "ckpts"
    config = (REPO / "examples" / "lifecycle.yaml").read_text()
    config = config.replace("root: ./checkpoints", f"root: {root}").replace("examples/data/", f"{REPO}/examples/data/")
    (tmp_path / "lifecycle.yaml").write_text(config)
    base = [sys.executable, "-m", "lightning_lora_ckpt", "fit", "-c", str(tmp_path / "lifecycle.yaml")]
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"} | {"HF_HOME": str(tmp_path / "hf")}
    for extra in (["--trainer.max_steps", "12"], ["--trainer.max_steps", "14", "--ckpt_path", "last"]):
        out = subprocess.run([*base, *extra], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
    assert "no Hugging Face token" in out.stderr  # HubPublisher logs and training goes on (fail_on_error: false)
    store = CheckpointStore(str(root))
    assert {c.checkpoint_id: c.step for c in store.list_checkpoints("lifecycle")} == {
        "weights/rolling-000010": 10,
        "weights/final": 14,
        "sampler_weights/final": 14,
    }
    assert store.get("lora://lifecycle/weights/rolling-000010").expires_at is not None
