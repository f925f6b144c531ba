"""The benchmark suite's quick mode runs end to end and reports every row; no timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.append(str(BENCHMARKS))
import suite  # noqa: E402  (benchmarks/ is not a package)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    tmp = tmp_path_factory.mktemp("bench")
    out_json, out_md = tmp / "bench.json", tmp / "bench.md"
    quick = ["--base-model", "tiny-qwen3", "--repeats", "1"]
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
    rows = result["rows"]
    assert [t["name"] for t in result["targets"]] == [t.name for t in suite.TARGETS]
    for target, spec in zip(result["targets"], suite.TARGETS, strict=True):
        (a_row, a_field), (b_row, b_field) = spec.numerator, spec.denominator
        assert target["value"] == pytest.approx(rows[a_row][a_field] / rows[b_row][b_field])
        assert target["pass"] == (target["value"] <= target["limit"])
    assert set(result["comparisons"]) == set(suite.COMPARISONS)


def test_markdown_agrees_with_json(quick_run: tuple[dict[str, Any], str]) -> None:
    result, markdown = quick_run
    assert markdown == suite.to_markdown(result)
    lines = markdown.splitlines()
    for key, row in result["rows"].items():
        (line,) = [line for line in lines if line.startswith(f"| {row['description']} |")]
        assert f"| {row['seconds']:.3f}" in line, key
        if "bytes" in row:
            assert f"| {row['bytes']:,} (" in line, key
    for target in result["targets"]:
        (line,) = [line for line in lines if line.startswith(f"| {target['description']} |")]
        assert line.endswith("| PASS |" if target["pass"] else "| **MISS** |")
        assert f"| {target['value']:.4f} |" in line
    assert result["machine"]["cpu"] in markdown
