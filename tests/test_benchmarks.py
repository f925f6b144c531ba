"""The benchmark suite runs end to end (a tiny 8B-shaped group) and reports every row and target; no timing is
asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.append(str(BENCHMARKS))
import report  # noqa: E402  (benchmarks/ is not a package)
import scale  # noqa: E402
import suite  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    tmp = tmp_path_factory.mktemp("bench")
    out_json, out_md = tmp / "bench.json", tmp / "bench.md"
    # the whole path, with the 8B shape cut to one layer of rank 4 (the GPU group runs only where CUDA is)
    quick = ["--base-model", "tiny-qwen3", "--repeats", "1", "--scale-layers", "1", "--scale-rank", "4"]
    quick += ["--list-checkpoints", "25"]
    outputs = ["--json", str(out_json), "--markdown", str(out_md), "--workdir", str(tmp)]
    subprocess.run(
        [sys.executable, str(BENCHMARKS / "suite.py"), *quick, *outputs],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return json.loads(out_json.read_text()), out_md.read_text()


def test_every_row_is_measured(quick_run: tuple[dict[str, Any], str]) -> None:
    result, _ = quick_run
    rows = result["rows"]
    assert list(rows) == list(suite.ROWS)
    for key, row in rows.items():
        assert row["seconds"] > 0, key
        assert row["description"] == suite.ROWS[key]
        assert len(row["samples"]["seconds"]) == result["config"]["repeats"] == 1
        if key.startswith(("save.", "s3.")):
            assert row["bytes"] > 0, key
    save = rows["save.ours_training_async"]
    assert save["committed_seconds"] >= save["seconds"]
    assert rows["save.ours_sampler"]["bytes"] < rows["save.ours_training_sync"]["bytes"]
    assert rows["save.ours_sampler"]["bytes"] < rows["save.lightning_default"]["bytes"]
    # the same files; only the checkpoint name in the manifest differs
    assert rows["save.ours_training_async"]["bytes"] == pytest.approx(rows["save.ours_training_sync"]["bytes"], abs=64)
    assert rows["s3.ours_upload"]["bytes"] == rows["s3.s3fs_put"]["bytes"] == rows["save.ours_training_sync"]["bytes"]
    assert result["config"]["base_model"] == "tiny-qwen3"
    assert result["config"]["trainable_parameters"] < result["config"]["parameters"]
    assert {"cpu", "cores", "ram_gib", "disk", "torch"} <= set(result["machine"])


def test_targets_and_ratios_follow_from_rows(quick_run: tuple[dict[str, Any], str]) -> None:
    result, _ = quick_run
    groups = {"suite": result["rows"], "scale": result["scale"]["rows"], "s3_list": result["s3_list"]["rows"]}
    assert [t["name"] for t in result["targets"]] == [t.name for t in suite.TARGETS]
    for target, spec in zip(result["targets"], suite.TARGETS, strict=True):
        assert target["limit"] == spec.limit
        rows = groups[spec.group]
        a_row, a_field = spec.numerator
        denominator = rows[spec.denominator[0]][spec.denominator[1]] if spec.denominator else 1
        assert target["value"] == pytest.approx(rows[a_row][a_field] / denominator)
        assert target["pass"] == (target["value"] <= target["limit"])
    assert set(result["comparisons"]) == set(suite.COMPARISONS)
    assert set(result["scale"]["comparisons"]) == set(scale.COMPARISONS)
    limits = {t["name"]: t["limit"] for t in result["targets"]}
    assert limits["save_vs_floor"] == 1.10 and limits["async_blocking_vs_sync_8b"] == 0.05
    assert {"async_extra_memory_8b", "async_blocking_vs_dcp_async", "s3_list_10k_seconds"} <= set(limits)


def test_scale_group_is_measured(quick_run: tuple[dict[str, Any], str]) -> None:
    result, _ = quick_run
    group = result["scale"]
    assert list(group["rows"]) == list(scale.ROWS)
    cfg = group["config"]
    assert cfg["layers"] == 1 and cfg["lora_rank"] == 4 and cfg["reads_verified"] is True
    # adapter + exp_avg + exp_avg_sq of r=4 on the 7 projections of one layer, and a 4-byte step per parameter
    assert cfg["trainable_parameters"] == sum(4 * (i + o) for _, i, o in scale.LLAMA3_8B)
    assert cfg["state_bytes"] == 3 * 4 * cfg["trainable_parameters"] + 4 * 2 * len(scale.LLAMA3_8B)
    for key, row in group["rows"].items():
        assert row["seconds"] > 0 and row["description"] == scale.ROWS[key], key
        if key.startswith("save."):
            assert row["bytes"] > 0, key
    for key in ("save.ours_async", "save.lightning_async", "save.dcp_async"):
        row = group["rows"][key]
        assert row["seconds"] <= row["copied_seconds"] <= row["committed_seconds"], key
        assert row["state_bytes"] == cfg["state_bytes"] and "extra_rss_bytes" in row, key
    if torch.cuda.is_available():  # the saves only, the state on the GPU
        assert [k for k in result["gpu"]["rows"] if not k.startswith("save.")] == []
    else:
        assert result["gpu"] == {"skipped": "no CUDA"}


def test_s3_list_group_is_measured(quick_run: tuple[dict[str, Any], str]) -> None:
    """The listing group on moto: the scan reads every manifest, the index lists in a handful of requests."""
    group = quick_run[0]["s3_list"]
    rows = group["rows"]
    assert set(rows) == {"list.scan_10k", "reindex_10k", "list.ours_10k", "last_10k", "page_10k", "save_at_10k"}
    assert rows["list.scan_10k"]["listed"] == rows["list.ours_10k"]["listed"] == group["checkpoints"] == 25
    # the scan: the GET that finds no index, then every manifest
    assert rows["list.scan_10k"]["by_operation"]["GetObject"] == 1 + 25 and rows["reindex_10k"]["previous"] == "missing"
    assert rows["list.ours_10k"]["requests"] <= 3 and rows["last_10k"]["requests"] <= 4
    assert "## Listing one run on S3" in quick_run[1]


def test_quick_and_unmeasured_groups_are_recorded_as_skipped() -> None:
    rows = {"save.ours_training_sync": {"seconds": 1.0}, "save.floor": {"seconds": 2.0}}
    targets = [t for t in suite.TARGETS if t.name in ("save_vs_floor", "resume_vs_floor_8b", "s3_list_10k_requests")]
    entries = report.evaluate(targets, {"suite": {"rows": rows}, "scale": {"skipped": "--quick"}})
    assert entries[0] == {
        "name": "save_vs_floor",
        "description": targets[0].description,
        "value": 0.5,
        "limit": 1.10,
        "pass": True,
    }
    assert [(e["value"], e["pass"], e["skipped"]) for e in entries[1:]] == [
        (None, None, "--quick"),
        (None, None, report.NOT_MEASURED),
    ]
    assert report.scale_markdown("8B", {"skipped": "--quick"})[-1] == "Skipped: --quick."


def test_markdown_agrees_with_json(quick_run: tuple[dict[str, Any], str]) -> None:
    result, markdown = quick_run
    assert markdown == suite.to_markdown(result)
    lines = markdown.splitlines()
    for key, row in result["rows"].items():
        (line,) = [line for line in lines if line.startswith(f"| {row['description']} |")]
        assert f"| {row['seconds']:.3f}" in line, key
        if "bytes" in row:
            assert f"| {row['bytes']:,} (" in line, key
    for key, row in result["scale"]["rows"].items():
        (line,) = [line for line in lines if line.startswith(f"| {row['description']} |")]
        assert f"| {row['seconds']:.3f} |" in line, key
    for target in result["targets"]:
        (line,) = [line for line in lines if line.startswith(f"| {target['description']} |")]
        if target["value"] is None:
            assert line.endswith("| skipped |") and target["skipped"] in line
            continue
        assert line.endswith("| PASS |" if target["pass"] else "| **MISS** |")
        assert f"| {target['value']:.4f} |" in line
    assert result["machine"]["cpu"] in markdown


def test_full_parameter_benchmark_measures_a_real_chain(tmp_path: Path) -> None:
    """``benchmarks/full_parameter.py`` on the tiny model: the plugin's base and deltas, rebuilt through the chain."""
    args = ["--base-model", "tiny-qwen3", "--steps", "4", "--every", "2", "--repeats", "1", "--workdir", str(tmp_path)]
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "full_parameter.py"), *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    rows = json.loads(out.stdout)["rows"]
    assert rows["snapshot.deltas"]["steps"] == [2, 4] and rows["rebuild.chain"]["deltas"] == 2
    assert all(0 < b < rows["snapshot.base"]["bytes"] for b in rows["snapshot.deltas"]["bytes"])
    assert rows["snapshot.newest_against_base"]["bytes"] > 0 and rows["save.floor"]["bytes"] > 0
