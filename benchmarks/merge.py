"""Merging a LoRA adapter into a full model: ``merge_adapter`` versus PEFT's ``merge_and_unload`` + ``save_pretrained``.

    python benchmarks/merge.py                              # qwen3-0.6b-shape, bf16 base in 500MB shards, r=16 all-linear
    python benchmarks/merge.py --base-model tiny-qwen3      # a quick run
    python benchmarks/merge.py --repeats 5 --json merge.json

The random-init base is first saved as a local HF directory (bf16, ``--shard-size`` shards, with the
tokenizer); an r=16 all-linear ``LoRAModule`` on it is trained one step, its ``lora_B`` matrices are
filled with noise (so every targeted weight changes visibly) and it is saved as a sampler checkpoint.
Then each method writes a bf16 model directory with the same shard size, each run in its own fresh
subprocess so its peak RSS (``VmHWM``) is its own; both children import the same libraries before the
clock starts, and the methods alternate order every round. Figures are medians over ``--repeats``.
Finally the two outputs are compared tensor by tensor (bf16: within one rounding step).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import elapsed, machine, make_trainer, path_bytes, quiet, token_batches

METHODS = ("ours", "peft")


def peak_rss_bytes() -> int:
    """This process's peak resident set size (``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def child(method: str, uri: str, base_dir: str, out: str, shard_size: str) -> None:
    """Run one method once; print its seconds and peak RSS as JSON."""
    quiet()
    import peft  # both children import the same libraries before the clock starts
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_lora_ckpt import merge_adapter

    def theirs() -> None:
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
        merged = peft.PeftModel.from_pretrained(base, uri).merge_and_unload()
        merged.save_pretrained(out, max_shard_size=shard_size)
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)

    def ours() -> None:
        merge_adapter(uri, out, dtype="bfloat16", max_shard_size=shard_size)

    rss_after_imports = peak_rss_bytes()
    seconds, _ = elapsed(ours if method == "ours" else theirs)
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak_rss_bytes(), "rss_after_imports": rss_after_imports}))


def run_child(method: str, uri: str, base_dir: Path, out: Path, shard_size: str) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    args = [sys.executable, __file__, "--child", method, uri, str(base_dir), str(out), shard_size]
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def prepare(workdir: Path, base_model: str, rank: int, shard_size: str) -> tuple[Path, str]:
    """Save the base as a bf16 HF directory and an adapter (trained one step, noisy lora_B) on it; return both."""
    import torch

    from lightning_lora_ckpt import LoRACheckpointIO, LoRAModule, load_base_model, load_tokenizer

    base_dir = workdir / "base"
    load_base_model(base_model, dtype=torch.bfloat16).save_pretrained(base_dir, max_shard_size=shard_size)
    load_tokenizer(base_model).save_pretrained(base_dir)
    module = LoRAModule(str(base_dir), rank=rank, alpha=2 * rank, dtype="bfloat16")
    io = LoRACheckpointIO(root=str(workdir / "ckpts"), run_id="bench", async_save=False)
    make_trainer([io], steps=1).fit(module, token_batches(module.model.config.vocab_size, 1))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.01, generator=generator)
    return base_dir, module.save_weights_for_sampler("adapter")


def compare(ours: Path, theirs: Path, base: Path) -> dict[str, Any]:
    """Same tensor names and shapes; the largest difference in units of the tensor's largest magnitude,
    between the two outputs and (to show the adapter was folded in) between ours and the base."""
    import torch
    from safetensors import safe_open

    def index(path: Path) -> dict[str, Path]:
        files = sorted(path.glob("*.safetensors"))
        keys = {}
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                keys.update(dict.fromkeys(h.keys(), f))
        return keys

    def load(files: dict[str, Path], key: str) -> torch.Tensor:
        with safe_open(str(files[key]), framework="pt") as h:
            return h.get_tensor(key).float()

    def relative(x: torch.Tensor, y: torch.Tensor) -> float:
        return float((x - y).abs().max() / y.abs().max().clamp_min(1e-12))

    a, b, c = index(ours), index(theirs), index(base)
    worst = changed = 0.0
    for key in sorted(set(a) & set(b)):
        x, y = load(a, key), load(b, key)
        if x.shape != y.shape:
            raise AssertionError(f"{key}: shape {tuple(x.shape)} (ours) != {tuple(y.shape)} (peft)")
        worst = max(worst, relative(x, y))
        changed = max(changed, relative(x, load(c, key)))
    return {
        "same_tensor_names": set(a) == set(b),
        "only_ours": sorted(set(a) - set(b))[:5],
        "only_peft": sorted(set(b) - set(a))[:5],
        "max_relative_difference": worst,
        "max_relative_change_from_base": changed,
        "shards": {"ours": len(set(a.values())), "peft": len(set(b.values()))},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default="qwen3-0.6b-shape")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--shard-size", default="500MB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--child", nargs=5, metavar=("METHOD", "URI", "BASE", "OUT", "SHARD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    quiet()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMPDIR")) as tmp:
        workdir = Path(tmp)
        result: dict[str, Any] = {"machine": machine(workdir)}
        base_dir, uri = prepare(workdir, args.base_model, args.rank, args.shard_size)
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
        for i in range(args.repeats):
            for method in METHODS if i % 2 == 0 else METHODS[::-1]:
                runs[method].append(run_child(method, uri, base_dir, workdir / method, args.shard_size))
        check = compare(workdir / "ours", workdir / "peft", base_dir)
        result |= {
            "base_model": args.base_model,
            "rank": args.rank,
            "shard_size": args.shard_size,
            "repeats": args.repeats,
            "base_safetensors_bytes": sum(path_bytes(f) for f in base_dir.glob("*.safetensors")),
            "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        }
    for method, rs in runs.items():
        result[method] = {
            "seconds": statistics.median(r["seconds"] for r in rs),
            "peak_rss_bytes": statistics.median(r["peak_rss_bytes"] for r in rs),
            "rss_after_imports": statistics.median(r["rss_after_imports"] for r in rs),
            "all_seconds": [round(r["seconds"], 3) for r in rs],
        }
    ours, peft = result["ours"], result["peft"]
    result["ratios"] = {
        "seconds_ours_over_peft": ours["seconds"] / peft["seconds"],
        "peak_rss_ours_over_peft": ours["peak_rss_bytes"] / peft["peak_rss_bytes"],
        "peak_rss_above_imports_ours_over_peft": (ours["peak_rss_bytes"] - ours["rss_after_imports"])
        / (peft["peak_rss_bytes"] - peft["rss_after_imports"]),
    }
    result["check"] = check
    mib = 1 << 20
    print(f"\n{args.base_model}, r={args.rank}, bf16 output, {args.shard_size} shards, median of {args.repeats}\n")
    print("| method | seconds | peak RSS (MiB) | peak RSS above imports (MiB) |")
    print("|---|---:|---:|---:|")
    for method, label in (("ours", "merge_adapter"), ("peft", "PEFT merge_and_unload + save_pretrained")):
        r = result[method]
        above = (r["peak_rss_bytes"] - r["rss_after_imports"]) / mib
        print(f"| {label} | {r['seconds']:.2f} | {r['peak_rss_bytes'] / mib:.0f} | {above:.0f} |")
    ratios = result["ratios"]
    print(
        f"| ours / peft | {ratios['seconds_ours_over_peft']:.2f} | {ratios['peak_rss_ours_over_peft']:.2f} "
        f"| {ratios['peak_rss_above_imports_ours_over_peft']:.2f} |"
    )
    print(f"\noutputs: {json.dumps(check)}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
