"""Two-process CPU DDP and FSDP2 (gloo): one rank writes, only the adapter is gathered, and a checkpoint
saved at one world size resumes at another; the same for full-parameter training (rank=0), whose gathered
checkpoint is one Hugging Face model directory whatever the world size."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from lightning_lora_ckpt import CheckpointStore
from lightning_lora_ckpt.storage.loading import open_checkpoint

JOB = Path(__file__).parent / "support" / "distributed_job.py"  # run as a script
pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning's FSDPStrategy needs CUDA")


def run(
    strategy: str,
    devices: int,
    root: Path,
    run_id: str,
    steps: int,
    ckpt: str | None = None,
    user: bool = False,
    rank: int = 4,
) -> Path:
    args = [sys.executable, str(JOB), strategy, str(devices), str(root), run_id, str(steps), *([ckpt] if ckpt else [])]
    env = {
        **os.environ,
        "ACCELERATOR": "cuda" if strategy == "fsdp1" else "cpu",
        "USER_MODULE": "1" if user else "0",
        "LORA_RANK": str(rank),
    }
    out = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=root.parent, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    return root / run_id / "weights" / f"step{steps}"


def tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The weights (the adapter, or a full-parameter checkpoint's model shards) and the optimizer moments."""
    weights = sorted(p for p in checkpoint.glob("*.safetensors") if p.name != "training_state.safetensors")
    return {
        **{k: v for p in weights for k, v in safetensors.torch.load_file(p).items()},
        **{
            k: v
            for k, v in safetensors.torch.load_file(checkpoint / "training_state.safetensors").items()
            if k.startswith("optimizer_states")
        },
    }


def assert_same(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert set(ta) == set(tb)
    for key in ta:
        # Adam turns float-summation-order differences of early gradients into visible (small) steps.
        torch.testing.assert_close(ta[key], tb[key], rtol=1e-3, atol=5e-4, msg=key)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist") / "ckpts"
    runs = {name: run(name, 1 if name == "single" else 2, root, name, 4) for name in ("single", "ddp", "fsdp2")}
    runs["reference"] = run("single", 1, root, "reference", 6, str(runs["single"]))  # resumed in one process
    return runs


def test_multi_process_checkpoints_equal_the_single_process_one(runs: dict[str, Path]) -> None:
    for name in ("ddp", "fsdp2"):
        assert_same(runs["single"], runs[name])
        files = sorted(p.name for p in runs[name].iterdir())
        assert files == sorted(p.name for p in runs["single"].iterdir())  # one writer, one set of files
        assert (runs[name] / "adapter_model.safetensors").stat().st_size == (
            runs["single"] / "adapter_model.safetensors"
        ).stat().st_size
    assert CheckpointStore(str(runs["single"].parents[2])).get(str(runs["fsdp2"])).step == 4


@pytest.mark.parametrize(
    ("source", "target", "devices"), [("fsdp2", "single", 1), ("single", "fsdp2", 2), ("ddp", "single", 1)]
)
def test_resume_at_another_world_size(runs: dict[str, Path], source: str, target: str, devices: int) -> None:
    resumed = run(target, devices, runs["single"].parents[2], f"{source}-to-{target}", 6, str(runs[source]))
    assert_same(runs["reference"], resumed)


@needs_cuda
@pytest.mark.parametrize(("source", "target"), [("fsdp1", "single"), ("single", "fsdp1")])
def test_lightning_fsdp_strategy_on_cuda(runs: dict[str, Path], source: str, target: str) -> None:
    root = runs["single"].parents[2]
    fsdp1 = run("fsdp1", 1, root, f"fsdp1-{source}", 4)
    assert_same(runs["single"], fsdp1)
    first = fsdp1 if source == "fsdp1" else runs["single"]
    resumed = run(target, 1, root, f"{source}-to-{target}-cuda", 6, str(first))
    assert_same(runs["reference"], resumed)


def test_ddp_with_a_users_own_module(tmp_path: Path) -> None:
    """Two-process DDP with a LightningModule of the user's (peft.get_peft_model), the plugin only."""
    root = tmp_path / "ckpts"
    single = run("single", 1, root, "user-single", 4, user=True)
    ddp = run("ddp", 2, root, "user-ddp", 4, user=True)
    assert_same(single, ddp)
    assert sorted(p.name for p in ddp.iterdir()) == sorted(p.name for p in single.iterdir())
    resumed = run("single", 1, root, "user-ddp-to-single", 6, str(ddp), user=True)
    continued = run("single", 1, root, "user-single-6", 6, str(single), user=True)
    assert_same(continued, resumed)


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The runs of :func:`runs`, training every parameter (rank=0)."""
    root = tmp_path_factory.mktemp("dist-full") / "ckpts"
    runs = {name: run(name, 1 if name == "single" else 2, root, name, 4, rank=0) for name in ("single", "ddp", "fsdp2")}
    runs["reference"] = run("single", 1, root, "reference", 6, str(runs["single"]), rank=0)
    return runs


@pytest.mark.stress
def test_full_parameter_checkpoints_are_one_model_directory_whatever_the_world_size(full_runs: dict[str, Path]) -> None:
    single = full_runs["single"]
    assert (single / "model.safetensors").is_file() and (single / "config.json").is_file()
    for name in ("ddp", "fsdp2"):
        assert_same(single, full_runs[name])
        assert sorted(p.name for p in full_runs[name].iterdir()) == sorted(p.name for p in single.iterdir())
        assert (full_runs[name] / "config.json").read_bytes() == (single / "config.json").read_bytes()


@pytest.mark.stress
def test_full_parameter_snapshot_chains_whatever_the_world_size(full_runs: dict[str, Path]) -> None:
    """Under DDP and FSDP2 the writing rank keeps the chain: a base, then deltas, rebuilt to the same weights."""
    store = CheckpointStore(str(full_runs["single"].parents[2]))

    def snapshots(run_id: str) -> list[tuple[str | None, dict[str, torch.Tensor]]]:
        listed = [c for c in store.list_checkpoints(run_id) if c.checkpoint_type == "sampler"]
        return [(c.snapshot, open_checkpoint(c.path).adapter) for c in listed]

    single = snapshots("single")
    assert [s for s, _ in single] == ["base", "delta", "delta", "delta"]
    for name in ("ddp", "fsdp2"):
        chain = snapshots(name)
        assert [s for s, _ in chain] == [s for s, _ in single]
        for (_, ours), (_, theirs) in zip(chain, single, strict=True):
            assert ours.keys() == theirs.keys()
            for key in ours:
                torch.testing.assert_close(ours[key], theirs[key], rtol=1e-3, atol=5e-4, msg=key)


@pytest.mark.stress
@pytest.mark.parametrize(
    ("source", "target", "devices"), [("fsdp2", "single", 1), ("single", "fsdp2", 2), ("ddp", "single", 1)]
)
def test_full_parameter_resume_at_another_world_size(
    full_runs: dict[str, Path], source: str, target: str, devices: int
) -> None:
    root = full_runs["single"].parents[2]
    resumed = run(target, devices, root, f"{source}-to-{target}", 6, str(full_runs[source]), rank=0)
    assert_same(full_runs["reference"], resumed)
