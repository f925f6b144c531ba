"""The command line end to end (subprocess, JSON parsed back), and `make demo` itself."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import fake_checkpoint

from lightning_lora_ckpt import CheckpointStore, LoRACheckpointIO, LoRAModule

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lightning_lora_ckpt", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=120,
    )


def cli_json(*args: str) -> Any:
    out = cli(*args, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture
def populated(root: tuple[str, dict[str, Any]]) -> list[str]:
    uri, options = root
    io = LoRACheckpointIO(root=uri, run_id="run", async_save=False, storage_options=options)
    io.save_checkpoint(fake_checkpoint(1), "t1", {"ttl_seconds": 1})
    io.save_checkpoint(fake_checkpoint(2, training=False), "s2")
    io.save_checkpoint(fake_checkpoint(3), "t3")
    return ["--root", uri, "--storage-options", json.dumps(options)]


@pytest.mark.parametrize("root", ["local", "s3"], indirect=True)
def test_management_commands_end_to_end(populated: list[str], tmp_path: Path) -> None:
    listed = cli_json("list", "run", *populated)["checkpoints"]
    assert [(c["checkpoint_id"], c["step"]) for c in listed] == [
        ("weights/t1", 1),
        ("sampler_weights/s2", 2),
        ("weights/t3", 3),
    ]
    page = cli_json("list", "--limit", "2", *populated)
    assert (
        page["cursor"] == {"offset": 0, "limit": 2, "total_count": 3}
        and page["checkpoints"][0]["checkpoint_id"] == "weights/t3"
    )
    info = cli_json("info", "lora://run/weights/t3", *populated)
    assert info["step"] == 3 and set(info["files"]) == {
        "adapter_model.safetensors",
        "adapter_config.json",
        "training_state.safetensors",
        "training_state.json",
    }
    assert cli_json("set-ttl", "lora://run/sampler_weights/s2", "--ttl", "2h", *populated)["expires_at"]
    assert cli_json("set-ttl", "lora://run/sampler_weights/s2", "--remove", *populated)["expires_at"] is None
    assert cli_json("publish", "lora://run/sampler_weights/s2", *populated)["public"] is True
    conflict = cli("publish", "lora://run/sampler_weights/s2", *populated)
    assert conflict.returncode == 1 and "already public" in conflict.stderr
    assert cli_json("unpublish", "lora://run/sampler_weights/s2", *populated)["public"] is False
    assert cli_json("verify", "lora://run/weights/t3", *populated)["ok"] is True
    downloaded = cli_json("download", "lora://run/weights/t3", str(tmp_path / "dl"), *populated)["path"]
    assert (Path(downloaded) / "training_state.safetensors").exists()
    table = cli("download", "lora://run/sampler_weights/s2", str(tmp_path / "dl2"), *populated)
    assert table.returncode == 0 and "adapter_model.safetensors" in table.stdout  # the progress bar's rows
    cli_json("archive", "lora://run/weights/t3", str(tmp_path / "t3.tar.gz"), *populated)
    extracted = cli_json("extract", str(tmp_path / "t3.tar.gz"), str(tmp_path / "x"), *populated)["path"]
    assert cli_json("verify", extracted)["ok"] is True
    gc = cli_json("gc", "--dry-run", *populated)
    assert [c["checkpoint_id"] for c in gc["deleted"]] == ["weights/t1"]
    refused = cli("delete", "lora://run/weights/t1", *populated, stdin="n\n")
    assert refused.returncode == 1 and "aborted" in refused.stderr
    assert [c["checkpoint_id"] for c in cli_json("gc", "-y", *populated)["deleted"]] == ["weights/t1"]
    cli_json("delete", "-y", "lora://run/sampler_weights/s2", *populated)
    assert [c["checkpoint_id"] for c in cli_json("list", "run", *populated)["checkpoints"]] == ["weights/t3"]


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
