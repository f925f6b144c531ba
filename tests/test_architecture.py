"""The package's shape: import-linter's layer contracts, no import cycles, small modules, a light CLI import.

Fast and model-free: the import graph is read from the source (grimp), never by importing the package.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grimp
from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "lightning_lora_ckpt"
MAX_LINES = 500


@contextlib.contextmanager
def loggers_left_enabled() -> Iterator[None]:
    """Undo what ``lint_imports`` does to logging: its ``dictConfig`` disables every logger that exists, which
    would silence the package's loggers (and the ``caplog`` checks of them) for the rest of the session."""
    loggers = [lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    disabled = {lg: lg.disabled for lg in loggers}
    try:
        yield
    finally:
        for lg, was_disabled in disabled.items():
            lg.disabled = was_disabled


def test_import_linter_contracts_are_kept(capsys) -> None:
    """Every contract in pyproject.toml's [tool.importlinter] holds (what ``lint-imports`` checks)."""
    with loggers_left_enabled():
        exit_code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), cache_dir=None, no_logo=True)
    report = capsys.readouterr().out
    assert exit_code == 0, report
    counts = re.search(r"Contracts: (\d+) kept, (\d+) broken", report)
    assert counts, report
    # layers; tools -> lightning layer only via the CLI; no Lightning below that layer; no fsspec in format/policy
    assert int(counts[1]) >= 4 and counts[2] == "0", report


def test_no_import_cycles() -> None:
    """No cycle among the package's modules, counting imports inside functions and under TYPE_CHECKING."""
    graph = grimp.build_graph(PACKAGE, cache_dir=None)
    modules = sorted(graph.modules)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in modules}
    assert "lightning_lora_ckpt.tools.cli" in edges["lightning_lora_ckpt.__main__"]  # the graph is really there
    cycles = [sorted(c) for c in _strongly_connected_components(edges) if len(c) > 1]
    cycles += [[m] for m in modules if m in edges[m]]
    details = [
        " <-> ".join(c) + "\n" + "\n".join(f"    {m} -> {d}" for m in c for d in edges[m] if d in c) for c in cycles
    ]
    assert not cycles, "import cycles:\n" + "\n".join(details)


def _strongly_connected_components(edges: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (no recursion limit to worry about)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(edges[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(edges.get(succ, []))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(component)
    return components


def test_strongly_connected_components_finds_a_cycle() -> None:
    """The cycle finder itself: a 3-cycle is one component; modules outside cycles are their own."""
    edges = {"a": ["b"], "b": ["c"], "c": ["a", "d"], "d": [], "e": ["d"]}
    components = sorted(sorted(c) for c in _strongly_connected_components(edges))
    assert components == [["a", "b", "c"], ["d"], ["e"]]


def test_modules_are_small() -> None:
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines()) for p in (ROOT / PACKAGE).rglob("*.py")}
    assert sizes, "no modules found"
    too_long = {path: n for path, n in sizes.items() if n > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"


def test_cli_import_loads_neither_torch_nor_lightning() -> None:
    """The management commands start without torch or Lightning (tools.cli imports the training passthrough lazily)."""
    code = "import json, sys\nimport lightning_lora_ckpt.tools.cli\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout)
    assert "lightning_lora_ckpt.tools.cli" in loaded
    heavy = sorted(
        m
        for m in loaded
        if m.split(".")[0] in ("torch", "lightning", "pytorch_lightning") or m.startswith(f"{PACKAGE}.lightning")
    )
    assert not heavy, f"importing lightning_lora_ckpt.tools.cli loaded {heavy}"
