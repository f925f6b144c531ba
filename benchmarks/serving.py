"""Serving through vLLM, side by side in one run (CPU build of vLLM, from ``make setup-vllm``):

1. time from a sampler checkpoint's commit to the first token served from it, hotloaded into a running server
   (what ``VLLMHotload`` does after each save), against restarting vLLM with the adapter (``--lora-modules``);
2. the callback in a short training run: seconds from each save to the server listing the adapter;
3. ``DeploymentSampler`` against ``SamplingClient`` tokens/s on the same checkpoint (temperature 1, tiny model).

    python benchmarks/serving.py [--repeats 5] [--tokens 64]

Writes docs/serving-benchmark.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _common import quiet, token_batches

from lightning_lora_ckpt import (
    DeploymentSampler,
    LoRACheckpointIO,
    LoRAModule,
    PeriodicCheckpoint,
    SamplingClient,
    SamplingParams,
    VLLMHotload,
    hotload,
)
from lightning_lora_ckpt.modeling.base import export_builtin
from lightning_lora_ckpt.modeling.vllm_client import VLLMClient
from support.vllm_server import vllm_server

BASE = "tiny-qwen3-hd32"
PROMPT = [5, 17, 99, 250, 3]
OUT = Path(__file__).resolve().parents[1] / "docs" / "serving-benchmark.json"


def trainer(io: LoRACheckpointIO, steps: int, callbacks: list[Any] | None = None) -> Any:
    import lightning as L

    return L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        plugins=[io],
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def first_token_s(base_url: str, model: str) -> None:
    VLLMClient(base_url).completions({"model": model, "prompt": PROMPT, "max_tokens": 1, "temperature": 0})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    quiet()
    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    base_dir = export_builtin(BASE, work / "base")
    module = LoRAModule(BASE, rank=8, learning_rate=1e-2)
    io = LoRACheckpointIO(root=str(work / "ckpts"), run_id="bench", async_save=False)
    trainer(io, 2).fit(module, token_batches(1024, 2))
    results: dict[str, Any] = {"machine": platform.processor() or platform.machine(), "base": BASE}

    hotloaded = []
    with vllm_server(base_dir, log_dir=work) as server:
        first_token_s(server.base_url, server.model)  # the server's own warm-up (kernel compilation)
        for i in range(args.repeats):
            start = time.perf_counter()
            uri = module.save_weights_for_sampler(f"s{i}")
            committed = time.perf_counter()
            served = hotload(uri, server.base_url, unload=[a.vllm_name for a in hotloaded[-1:]])
            loaded = time.perf_counter()
            first_token_s(server.base_url, served.vllm_name)
            hotloaded.append(served)
            results.setdefault("hotload", []).append(
                {
                    "save_s": committed - start,
                    "load_s": loaded - committed,
                    "first_token_s": time.perf_counter() - committed,
                }
            )
        callback = VLLMHotload(server.base_url, keep=2)
        run_io = LoRACheckpointIO(root=str(work / "ckpts"), run_id="callback", async_save=True)
        trainer(run_io, 8, [callback, PeriodicCheckpoint(every_n_train_steps=2, kind="sampler")]).fit(
            LoRAModule(BASE, rank=8), token_batches(1024, 8)
        )
        results["callback_save_to_listed_s"] = callback.latencies

        newest = hotloaded[-1]
        local = SamplingClient.from_checkpoint(newest.uri)
        remote = DeploymentSampler(server.base_url, newest)
        params = SamplingParams(max_tokens=args.tokens, temperature=1.0, stop=[], seed=0)
        for name, client in (("SamplingClient", local), ("DeploymentSampler", remote)):
            for num_samples in (1, 8):
                client.sample(PROMPT, params, num_samples)  # warm
                start = time.perf_counter()
                tokens = sum(
                    s.completion_len
                    for _ in range(args.repeats)
                    for s in client.sample(PROMPT, params, num_samples).sequences
                )
                results.setdefault("tokens_per_s", {})[f"{name} n={num_samples}"] = tokens / (
                    time.perf_counter() - start
                )

    start = time.perf_counter()
    with vllm_server(base_dir, log_dir=work, extra_args=["--lora-modules", f"adapter={newest.lora_path}"]) as server:
        first_token_s(server.base_url, "adapter")
    results["restart_first_token_s"] = time.perf_counter() - start

    hot = results["hotload"]
    summary = {
        "hotload_first_token_s_median": statistics.median(h["first_token_s"] for h in hot),
        "hotload_load_s_median": statistics.median(h["load_s"] for h in hot),
        "restart_first_token_s": results["restart_first_token_s"],
    }
    summary["restart_over_hotload"] = summary["restart_first_token_s"] / summary["hotload_first_token_s_median"]
    results["summary"] = summary
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(json.dumps(results["tokens_per_s"], indent=2))
    print(f"callback save->listed: {[round(s, 3) for s in callback.latencies]}")


if __name__ == "__main__":
    main()
