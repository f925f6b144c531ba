"""Preemption: a real training process gets SIGTERM (or SLURM's requeue signal) mid-run; a training checkpoint of the
step it reached is committed before it exits, and ``fit(ckpt_path="last")`` in a new process continues exactly.

The child (``CHILD`` below) trains the 16 shuffled steps of ``helpers.resume`` (dropout, warmup, a linear schedule,
a ``StatefulDataLoader``, so a mid-epoch resume is exact) and, at the steps it is told, writes a marker file and
waits until the signal the test then sends has arrived: the step the signal meets is known exactly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers.resume import adapter, train
from lightning_lora_ckpt import CheckpointStore, LoRACheckpointIO

pytestmark = pytest.mark.stress

TESTS = Path(__file__).resolve().parent

CHILD = textwrap.dedent(
    """
    import json, logging, os, sys, time
    sys.path.insert(0, sys.argv[1])
    import lightning as L
    from helpers.resume import RESUME_KWARGS, LossRecorder, adapter, shuffled_loader
    from helpers.user_module import digest
    from lightning_lora_ckpt import LoRACheckpointIO, LoRAModule, PeriodicCheckpoint

    root, markers, options, ckpt_path = sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5]
    here, every = sys.argv[6], int(sys.argv[7])  # the test's directory (markers, default_root_dir); the save period
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")

    class WaitForSignal(L.Callback):
        # At each step of `markers` (step -> "term" or "usr1": during the step; "late-term": after PeriodicCheckpoint's
        # end-of-step hook; "epoch-term": after its end-of-epoch hook): write the marker STEP, wait for the signal.
        def __init__(self, late):
            self.late = late

        def on_train_batch_end(self, trainer, *args):
            self.wait(trainer, "late-" if self.late else "")

        def on_train_epoch_end(self, trainer, pl_module):
            if self.late:
                self.wait(trainer, "epoch-")

        def wait(self, trainer, where):
            wanted = markers.get(str(trainer.global_step), "")
            if not wanted or wanted.removesuffix("term").removesuffix("usr1") != where:
                return
            wanted = wanted.removeprefix(where)
            with open(os.path.join(here, f"marker-{trainer.global_step}"), "w") as f:
                f.write(str(os.getpid()))
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if wanted == "term" and trainer.received_sigterm or wanted == "usr1" and saver.preemption.signalled_at:
                    break
                time.sleep(0.005)

    L.seed_everything(0)
    tier = {"local_tier": os.environ["LOCAL_TIER"]} if os.environ.get("LOCAL_TIER") else {}
    io = LoRACheckpointIO(root=root, run_id="run", storage_options=options or None, **tier)
    recorder, saver = LossRecorder(), PeriodicCheckpoint(every_n_train_steps=every, kind="state", save_final=False)
    plugins = [io]
    if os.environ.get("SLURM_JOB_ID"):  # srun's variables: Lightning's SLURM auto-requeue (SIGUSR1)
        from lightning.fabric.plugins.environments import SLURMEnvironment
        plugins.append(SLURMEnvironment(auto_requeue=True))
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, deterministic=True, max_steps=16, plugins=plugins,
        callbacks=[recorder, WaitForSignal(False), saver, WaitForSignal(True)], default_root_dir=here,
    )
    module = LoRAModule(**RESUME_KWARGS)
    result = {}
    try:
        trainer.fit(module, shuffled_loader(stateful=True), ckpt_path=None if ckpt_path == "none" else ckpt_path)
    except SystemExit as stop:
        result["exit"] = type(stop).__name__
    result.update(
        losses=recorder.losses, step=trainer.global_step, adapter=digest(adapter(module)),
        seconds=saver.preemption.last_commit_seconds,
    )
    print("RESULT " + json.dumps(result), flush=True)
    if "exit" in result:
        raise SystemExit(0)
    """
)


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[float], str]:
    """The uninterrupted 16-step run: its losses and the digest of its final adapter."""
    from helpers.user_module import digest

    root = str(tmp_path_factory.mktemp("straight"))
    module, losses = train(LoRACheckpointIO(root=root, run_id="straight"), stateful=True)
    return losses, digest(adapter(module))


def child(
    tmp_path: Path,
    root: str,
    markers: dict[int, str],
    options: dict[str, Any],
    ckpt_path: str,
    env: dict[str, str],
    every: int = 4,
) -> subprocess.Popen[str]:
    """The training child: ``markers`` maps steps to the signal it waits for there (``"term"``, ``"usr1"``)."""
    args = [str(TESTS), root, json.dumps({str(k): v for k, v in markers.items()}), json.dumps(options), ckpt_path]
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, *args, str(tmp_path), str(every)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )


def wait_for(path: Path, process: subprocess.Popen[str], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            _, err = process.communicate()
            pytest.fail(f"the child exited before {path.name}: {err[-3000:]}")
        assert time.monotonic() < deadline, f"no {path.name} after {timeout} s"
        time.sleep(0.01)


def finish(process: subprocess.Popen[str]) -> tuple[dict[str, Any], str]:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    line = next(line for line in out.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT ")), err


def preempt_and_resume(
    tmp_path: Path,
    root: str,
    options: dict[str, Any],
    straight: tuple[list[float], str],
    at: int = 11,
    every: int = 4,
    where: str = "",
    env: dict[str, str] | None = None,
) -> float:
    """SIGTERM at step ``at`` (``where``: "" during the step, "late-" after PeriodicCheckpoint's end-of-step hook,
    "epoch-" after its end-of-epoch hook), then resume in a new process; returns the seconds from SIGTERM to the
    commit."""
    process = child(tmp_path, root, {at: f"{where}term"}, options, "none", env or {}, every)
    wait_for(tmp_path / f"marker-{at}", process)
    sent = time.monotonic()
    os.kill(process.pid, signal.SIGTERM)
    first, err = finish(process)
    exited = time.monotonic() - sent
    assert first["exit"] == "SIGTERMException" and first["step"] == at
    assert "committed" in err and f"preempted-{at:06d} at step {at}" in err, err[-3000:]
    store = CheckpointStore(root, options or None)
    last = store.last_checkpoint("run", "training")
    assert last is not None and last.checkpoint_id == f"weights/preempted-{at:06d}" and last.step == at
    assert store.verify(last.path).ok
    print(
        f"\n[preemption] {root.split('://')[0] if '://' in root else 'local'}: SIGTERM -> committed "
        f"{first['seconds']:.3f} s (in the child), SIGTERM -> process exit {exited:.3f} s"
    )

    resumed, _ = finish(child(tmp_path, root, {}, options, "last", env or {}, every))
    losses, digest = straight
    assert first["losses"] + resumed["losses"] == losses  # bit-identical, every loss
    assert resumed["adapter"] == digest and resumed["step"] == 16
    return float(first["seconds"])


def test_sigterm_mid_run_commits_the_step_reached_and_resumes_exactly(
    tmp_path: Path, straight: tuple[list[float], str]
) -> None:
    seconds = preempt_and_resume(tmp_path, str(tmp_path / "ckpts"), {}, straight)
    assert seconds < 30  # SLURM's default KillWait between SIGTERM and SIGKILL


def test_sigterm_after_the_step_hooks_is_saved_on_the_exception(
    tmp_path: Path, straight: tuple[list[float], str]
) -> None:
    """The signal arrives once PeriodicCheckpoint's end-of-step hook has run: it saves when Lightning raises."""
    preempt_and_resume(tmp_path, str(tmp_path / "ckpts"), {}, straight, at=11, where="late-")


@pytest.mark.parametrize(
    "where",
    ["", "late-", "epoch-"],
    ids=["at-the-last-step", "after-its-hooks", "after-the-epoch-hooks"],  # saved: end of step, of epoch, on exit
)
def test_sigterm_at_the_end_of_an_epoch(tmp_path: Path, straight: tuple[list[float], str], where: str) -> None:
    """The last batch of epoch 0 (a StatefulDataLoader): the resume starts epoch 1 at its first batch, exactly,
    wherever the signal lands: during the step, after PeriodicCheckpoint's end-of-step hook (it saves at the end
    of the epoch), or after its end-of-epoch hook (it saves when Lightning stops, the epoch counted complete)."""
    preempt_and_resume(tmp_path, str(tmp_path / "ckpts"), {}, straight, at=8, every=3, where=where)


def test_sigterm_with_an_s3_root(tmp_path: Path, s3_server: dict[str, Any], straight: tuple[list[float], str]) -> None:
    root = f"s3://{s3_server['bucket']}/preempt-{uuid.uuid4().hex[:8]}"
    preempt_and_resume(tmp_path, root, s3_server["storage_options"], straight, at=6)


def test_sigterm_with_a_local_tier_and_an_s3_root(
    tmp_path: Path, s3_server: dict[str, Any], straight: tuple[list[float], str]
) -> None:
    """The preemption checkpoint commits locally and reaches the durable root before the process exits."""
    root = f"s3://{s3_server['bucket']}/tiered-{uuid.uuid4().hex[:8]}"
    env = {"LOCAL_TIER": str(tmp_path / "nvme")}
    preempt_and_resume(tmp_path, root, s3_server["storage_options"], straight, at=6, env=env)


@pytest.fixture
def slurm_env() -> Iterator[dict[str, str]]:
    """What srun sets for one task: Lightning then uses SLURMEnvironment (auto-requeue on SIGUSR1)."""
    yield {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "train",
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
    }


def test_slurm_requeue_signal_saves_at_the_next_step_and_sigterm_after_it(
    tmp_path: Path, slurm_env: dict[str, str], straight: tuple[list[float], str]
) -> None:
    root = str(tmp_path / "ckpts")
    process = child(tmp_path, root, {5: "usr1", 7: "term"}, {}, "none", slurm_env)
    wait_for(tmp_path / "marker-5", process)
    os.kill(process.pid, signal.SIGUSR1)  # SLURM's warning ahead of the time limit: Lightning requeues the job
    wait_for(tmp_path / "marker-7", process)
    store = CheckpointStore(root)
    requeued = store.get("lora://run/weights/preempted-000005")  # committed at step 5, and training went on
    assert requeued.step == 5
    os.kill(process.pid, signal.SIGTERM)  # what SLURM sends once the job is requeued
    first, err = finish(process)
    assert first["exit"] == "SIGTERMException" and first["step"] == 7
    assert "on the SLURM requeue signal, committed" in err and "on SIGTERM, committed" in err, err[-3000:]
    last = store.last_checkpoint("run", "training")
    assert last is not None and last.checkpoint_id == "weights/preempted-000007"
    resumed, _ = finish(child(tmp_path, root, {}, {}, "last", {}))
    assert first["losses"] + resumed["losses"] == straight[0] and resumed["adapter"] == straight[1]


def test_sigterm_at_a_periodic_save_writes_no_second_checkpoint(
    tmp_path: Path, straight: tuple[list[float], str]
) -> None:
    """SIGTERM at the step of a periodic training save: that checkpoint is the resume point, nothing else is written."""
    root = str(tmp_path / "ckpts")
    process = child(tmp_path, root, {4: "term"}, {}, "none", {})
    wait_for(tmp_path / "marker-4", process)
    os.kill(process.pid, signal.SIGTERM)
    first, err = finish(process)
    assert first["step"] == 4 and "the training checkpoint of step 4 saved before it" in err, err[-2000:]
    assert {c.checkpoint_id for c in CheckpointStore(root).list_checkpoints("run")} == {"weights/000004"}
    resumed, _ = finish(child(tmp_path, root, {}, {}, "last", {}))
    assert first["losses"] + resumed["losses"] == straight[0] and resumed["adapter"] == straight[1]


DDP_JOB = textwrap.dedent(
    """
    import json, logging, os, sys, time
    sys.path.insert(0, sys.argv[1])
    import lightning as L
    from torch.utils.data import DataLoader
    from helpers.training import token_batches
    from lightning_lora_ckpt import LoRACheckpointIO, LoRAModule, PeriodicCheckpoint

    root, here, ckpt_path = sys.argv[2], sys.argv[3], sys.argv[4]
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")

    class WaitAt6(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 6 and ckpt_path == "none":
                if trainer.is_global_zero:
                    open(os.path.join(here, "marker-6"), "w").write(str(os.getpid()))
                deadline = time.monotonic() + 120
                while not trainer.received_sigterm and time.monotonic() < deadline:
                    time.sleep(0.005)

    L.seed_everything(0)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=12, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        plugins=[LoRACheckpointIO(root=root, run_id="run")],
        callbacks=[WaitAt6(), PeriodicCheckpoint(every_n_train_steps=4, kind="state", save_final=False)],
    )
    module = LoRAModule("tiny-qwen3", rank=4, alpha=8, learning_rate=1e-2)
    result = {"rank": trainer.global_rank}
    try:
        loader = DataLoader(token_batches(16), batch_size=None)
        trainer.fit(module, loader, ckpt_path=None if ckpt_path == "none" else ckpt_path)
    except SystemExit as stop:
        result["exit"] = type(stop).__name__
    result["step"] = trainer.global_step
    print("RESULT " + json.dumps(result), flush=True)
    """
)


def test_sigterm_under_ddp_stops_every_rank_at_one_step_and_rank_0_commits(tmp_path: Path) -> None:
    """Two processes (gloo): Lightning forwards the signal and stops both at the same step, where they save together
    (a collective save: only rank 0 writes), then a new two-process fit resumes from it."""
    (tmp_path / "job.py").write_text(DDP_JOB)
    root = str(tmp_path / "ckpts")

    def job(ckpt_path: str) -> subprocess.Popen[str]:
        command = [sys.executable, str(tmp_path / "job.py"), str(TESTS), root, str(tmp_path), ckpt_path]
        return subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    process = job("none")
    wait_for(tmp_path / "marker-6", process)
    os.kill(process.pid, signal.SIGTERM)  # rank 0, the launcher: Lightning passes it on to rank 1
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    results = [json.loads(line.removeprefix("RESULT ")) for line in out.splitlines() if line.startswith("RESULT ")]
    assert sorted((r["rank"], r.get("exit"), r["step"]) for r in results) == [
        (0, "SIGTERMException", 6),
        (1, "SIGTERMException", 6),
    ]
    assert err.count("on SIGTERM, committed") == 1 and "preempted-000006 at step 6" in err, err[-3000:]
    last = CheckpointStore(root).last_checkpoint("run", "training")
    assert last is not None and last.checkpoint_id == "weights/preempted-000006"
    resumed = job("last")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert {json.loads(line[7:])["step"] for line in out.splitlines() if line.startswith("RESULT ")} == {12}
