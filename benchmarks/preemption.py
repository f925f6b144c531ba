"""The time from SIGTERM to a committed training checkpoint, on a real training process.

    python benchmarks/preemption.py                           # qwen3-0.6b-shape, bf16 base, r=16 all-linear, AdamW
    python benchmarks/preemption.py --base-model tiny-qwen3   # a quick run
    python benchmarks/preemption.py --s3                      # the durable root on a loopback moto S3 server

A child process trains with ``PeriodicCheckpoint(every_n_train_steps=5, kind="state")`` (asynchronous saves)
and ``save_on_preemption=True``. After step ``--at`` the parent waits half a step and sends SIGTERM, so the
signal lands in the middle of a step, as a preemption does: ``signal_to_commit_seconds`` (from the parent's
``kill`` to the end of the child's ``on_exception``, after the preemption checkpoint has committed, both on the
wall clock) includes the rest of that step, the saves still in flight and the synchronous preemption save.
Also printed: the step time, the child's own log figures (the save alone, and the time from when Python ran
the signal handler, which waits for the torch operation in progress), the seconds to the process's exit and
the checkpoint found.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import BUCKET, machine, moto_s3

COMMITTED = re.compile(r"committed (.+?) at step (\d+), ([\d.]+) s after the signal \(saving took ([\d.]+) s\)")


def child(base_model: str, root: str, options: dict[str, Any], marker: str, steps: int) -> None:
    """Train until SIGTERM; write ``marker`` with the mean step time after each step."""
    import lightning as L
    from _common import make_trainer, quiet, token_batches

    from lightning_lora_ckpt import LoRACheckpointIO, LoRAModule, PeriodicCheckpoint

    quiet()
    started: list[float] = []

    class Marker(L.Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            started.append(time.perf_counter())

        def on_exception(self, *args: Any) -> None:  # after PeriodicCheckpoint's: its checkpoint has committed
            Path(f"{marker}.exited").write_text(repr(time.time()))

        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            step_s = time.perf_counter() - started[-1]
            Path(f"{marker}.tmp").write_text(json.dumps({"step": trainer.global_step, "step_seconds": step_s}))
            os.replace(f"{marker}.tmp", marker)  # whole, for the parent reading it

    module = LoRAModule(base_model, rank=16, alpha=32, dtype="bfloat16")
    io = LoRACheckpointIO(root=root, run_id="preempt", storage_options=options or None)
    trainer = make_trainer([io], steps)
    trainer.callbacks.extend([PeriodicCheckpoint(every_n_train_steps=5, kind="state", save_final=False), Marker()])
    trainer.fit(module, token_batches(module.model.config.vocab_size, steps, length=128))


def measure(base_model: str, root: str, options: dict[str, Any], at: int, workdir: Path) -> dict[str, Any]:
    marker = workdir / "marker.json"
    args = [sys.executable, __file__, "--child", base_model, root, json.dumps(options), str(marker)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    state: dict[str, Any] = {}
    while state.get("step", 0) < at:
        if process.poll() is not None:
            raise RuntimeError(f"the child exited early: {process.stderr.read()[-3000:] if process.stderr else ''}")
        time.sleep(0.01)
        if marker.exists():
            state = json.loads(marker.read_text())
    time.sleep(state["step_seconds"] / 2)  # mid-step
    sent = time.time()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=600)
    exited = time.time() - sent
    found = COMMITTED.search(err)
    if process.returncode != 0 or not found:
        raise RuntimeError(f"no preemption checkpoint (exit {process.returncode}): {err[-3000:]}")
    return {
        "step_seconds": round(state["step_seconds"], 3),
        "signal_to_commit_seconds": round(float(Path(f"{marker}.exited").read_text()) - sent, 3),
        "handler_to_commit_seconds": float(found[3]),
        "preemption_save_seconds": float(found[4]),
        "signal_to_exit_seconds": round(exited, 3),
        "checkpoint": found[1],
        "step": int(found[2]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default="qwen3-0.6b-shape")
    parser.add_argument("--at", type=int, default=3, help="send SIGTERM half a step after this step")
    parser.add_argument("--s3", action="store_true", help="the durable root on a loopback moto S3 server")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        base_model, root, options, marker = args.child
        child(base_model, root, json.loads(options), marker, steps=1000)
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.s3:
            with moto_s3() as s3:
                result = measure(args.base_model, f"s3://{BUCKET}/preempt", s3, args.at, Path(tmp))
        else:
            result = measure(args.base_model, str(Path(tmp) / "ckpts"), {}, args.at, Path(tmp))
        result["machine"] = machine(tmp)
    print(json.dumps({"base_model": args.base_model, "s3": args.s3, **result}, indent=2))


if __name__ == "__main__":
    main()
