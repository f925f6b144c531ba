"""The Python snippets of the Markdown docs, and a runner that executes one file's snippets like a reader would.

``collect(path)`` returns every ```` ```python ```` fenced block of a Markdown file, in order. An HTML comment on
the line right before a fence marks the block:

- ``<!-- snippet: skip (reason) -->`` opts it out (only for what cannot run offline on a CPU);
- ``<!-- snippet: signature -->``: its calls (``f(a, b=1, ...)``) document signatures; besides running, each
  must list the callable's parameters in order, with their defaults.

``claims(code)`` reads what a block says it produces:

- a trailing ``# -> <path>`` comment: that file or directory exists once the block ran (shell brace
  expansion, ``dir/{a,b}/``, names several; a trailing ``/`` asks for a directory; text after the path in
  parentheses is prose);
- ``# prints: <text>``, as a trailing comment of a ``print(...)`` line or on the line after one: the block
  wrote ``text`` to stdout, where ``...`` stands for any text within a line (as in doctest) and
  ``{a,b}`` for one of ``a`` and ``b``.

Run as ``python -m helpers.doc_snippets SPEC.json`` (cwd: the reader's working directory), it executes the
prelude and the blocks the spec lists in one namespace, each compiled under its Markdown file's name and
line numbers (a traceback points into the doc), and checks each block's claims right after it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import sys
import time
import types
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

FENCE_OPEN = re.compile(r"^(?P<indent> *)```(?P<lang>[\w+-]*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*snippet:\s*(?:skip\s*\((?P<reason>[^)]*\S[^)]*)\)|(?P<signature>signature))\s*-->\s*$")
MARKER_LOOSE = re.compile(r"<!--\s*snippet:")
PATH_CLAIM = re.compile(r"#\s*->\s*(?P<path>[^\s#]+)")
PRINT_CLAIM = re.compile(r"#\s*prints:\s*(?P<text>.+?)\s*$")


@dataclasses.dataclass(frozen=True)
class Snippet:
    """One fenced Python block: its Markdown file, the line of its first code line, its code."""

    file: str
    line: int
    code: str
    skip_reason: str | None = None
    signature: bool = False

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclasses.dataclass(frozen=True)
class Claim:
    """``kind`` is ``"exists"`` (``value`` a path) or ``"prints"`` (``value`` a text); ``line`` is 0-based in the block."""

    kind: str
    value: str
    line: int


def collect(path: Path, name: str | None = None) -> list[Snippet]:
    """Every ```python block of a Markdown file, in order, with its opt-out reason if it has one."""
    lines = path.read_text(encoding="utf-8").splitlines()
    name = name or path.name
    snippets: list[Snippet] = []
    i = 0
    while i < len(lines):
        opened = FENCE_OPEN.match(lines[i])
        if not opened:
            i += 1
            continue
        fence = opened["indent"] + "```"
        end = i + 1
        while end < len(lines) and lines[end].rstrip() != fence:
            end += 1
        if end == len(lines):
            raise ValueError(f"{name}:{i + 1}: unclosed code fence")
        if opened["lang"] in ("python", "py"):
            before = lines[i - 1] if i > 0 else ""
            marker = MARKER.match(before)
            if marker is None and MARKER_LOOSE.search(before):
                raise ValueError(
                    f"{name}:{i}: write <!-- snippet: skip (reason) --> or <!-- snippet: signature --> alone on the line"
                )
            body = "\n".join(line[len(opened["indent"]) :] for line in lines[i + 1 : end]) + "\n"
            reason = marker["reason"].strip() if marker and marker["reason"] else None
            snippets.append(Snippet(name, i + 2, body, reason, bool(marker and marker["signature"])))
        i = end + 1
    return snippets


def substitute(code: str, table: Iterable[tuple[str, str]]) -> str:
    """Apply ``(regex, replacement)`` pairs in order; the line count never changes (tracebacks stay on the doc's lines)."""
    for pattern, replacement in table:
        code = re.sub(pattern, replacement, code)
    return code


def expand_braces(text: str) -> list[str]:
    """Shell brace expansion of one or more ``{a,b,...}`` groups (not nested)."""
    match = re.search(r"\{([^{}]*)\}", text)
    if match is None:
        return [text]
    head, tail = text[: match.start()], text[match.end() :]
    return [expanded for choice in match[1].split(",") for expanded in expand_braces(head + choice + tail)]


def printed_pattern(text: str) -> str:
    """The regex of a ``# prints:`` text: ``...`` is any text within a line, ``{a,b}`` one of ``a`` and ``b``."""
    parts = re.split(r"(\.\.\.|\{[^{}]*\})", text)
    regex = []
    for part in parts:
        if part == "...":
            regex.append(r"[^\n]*?")
        elif part.startswith("{") and part.endswith("}") and "," in part:
            regex.append("(?:" + "|".join(re.escape(choice) for choice in part[1:-1].split(",")) + ")")
        else:
            regex.append(re.escape(part))
    return "".join(regex)


def claims(code: str) -> list[Claim]:
    """The ``# -> path`` and ``# prints: text`` claims of a block (after substitution)."""
    found: list[Claim] = []
    lines = code.splitlines()
    for n, line in enumerate(lines):
        comment = _comment(line)
        if comment is None:
            continue
        if path := PATH_CLAIM.match(comment):
            for expanded in expand_braces(path["path"]):
                found.append(Claim("exists", expanded, n))
        elif printed := PRINT_CLAIM.match(comment):
            code_part = line[: len(line) - len(comment)].strip()
            previous = lines[n - 1].strip() if n > 0 else ""
            if not ("print(" in code_part or (not code_part and "print(" in previous)):
                raise ValueError(f"line {n + 1} of the block: '# prints:' must follow a print(...) call")
            found.append(Claim("prints", printed["text"], n))
    return found


def _comment(line: str) -> str | None:
    """The ``#`` comment of a line of code, outside string literals (None if there is none)."""
    quote: str | None = None
    i = 0
    while i < len(line):
        char = line[i]
        if quote:
            if char == "\\":
                i += 1
            elif line.startswith(quote, i):
                i += len(quote) - 1
                quote = None
        elif line.startswith(('"""', "'''"), i):
            quote = line[i : i + 3]
            i += 2
        elif char in "\"'":
            quote = char
        elif char == "#":
            return line[i:]
        i += 1
    return None


def write_spec(path: Path, prelude: str | None, doc: Path, snippets: Sequence[tuple[Snippet, str]]) -> None:
    """The JSON the runner reads: the prelude, then each block's (substituted) code, doc path, line and claims."""
    blocks: list[dict[str, Any]] = []
    if prelude:
        name = f"<prelude of {doc.name}>"
        blocks.append({"where": name, "source": name, "line": 1, "code": prelude, "claims": [], "signature": False})
    for snippet, code in snippets:
        blocks.append(
            {
                "where": snippet.file,
                "source": str(doc.resolve()),
                "line": snippet.line,
                "code": code,
                "claims": [dataclasses.asdict(c) for c in claims(code)],
                "signature": snippet.signature,
            }
        )
    path.write_text(json.dumps({"blocks": blocks}, indent=1), encoding="utf-8")


def seed_checkpoints(
    root: str,
    run_id: str,
    sampler: Sequence[str] = (),
    training: Sequence[str] = (),
    steps: int = 2,
    **module_kwargs: Any,
) -> Any:
    """Train a tiny ``LoRAModule`` for ``steps`` steps under ``root``/``run_id`` and save the named sampler and
    training checkpoints (a doc's setup prelude); returns the module, still attached to its Trainer."""
    from helpers.training import batch_loader, make_trainer
    from lightning_lora_ckpt import LoRACheckpointIO, LoRAModule

    io = LoRACheckpointIO(root=root, run_id=run_id, async_save=False)
    kwargs = {"base_model": "tiny-qwen3", "rank": 4, "alpha": 8, "learning_rate": 1e-2, **module_kwargs}
    module = LoRAModule(**kwargs)
    make_trainer(io, max_steps=steps).fit(module, batch_loader(steps))
    for name in sampler:
        module.save_weights_for_sampler(name)
    for name in training:
        module.save_state(name)
    return module


def check_signatures(code: str, namespace: dict[str, Any], where: str) -> None:
    """Each top-level call ``f(a, b=1)`` of a signature block lists ``f``'s parameters in order, with their defaults
    (a bare name: a parameter without default)."""
    import ast
    import inspect

    calls = [s.value for s in ast.parse(code).body if isinstance(s, ast.Expr) and isinstance(s.value, ast.Call)]
    if not calls:
        raise AssertionError(f"{where}: a signature block holds no call")
    for call in calls:
        name = ast.unparse(call.func)
        documented: list[tuple[str, Any]] = [(ast.unparse(arg), inspect.Parameter.empty) for arg in call.args]
        documented += [(str(kw.arg), ast.literal_eval(kw.value)) for kw in call.keywords]
        parameters = inspect.signature(eval(name, namespace)).parameters.values()
        actual = [(p.name, p.default) for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if documented != actual:
            shown = ", ".join(n if d is inspect.Parameter.empty else f"{n}={d!r}" for n, d in actual)
            raise AssertionError(f"{where}: the doc's signature of {name} is not the code's: {name}({shown})")


class _Tee(io.TextIOBase):
    """Writes through to the real stdout and keeps a copy of what the current block printed."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.captured = io.StringIO()

    def write(self, text: str) -> int:
        self.captured.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", "utf-8")

    def fileno(self) -> int:
        return self.stream.fileno()


def _check_claims(block: dict[str, Any], printed: str) -> None:
    for claim in block["claims"]:
        where = f"{block['where']}:{block['line'] + claim['line']}"
        if claim["kind"] == "exists":
            target = Path(claim["value"])
            if target.is_dir() if claim["value"].endswith("/") else target.exists():
                continue
            parent = next((p for p in target.parents if p.is_dir()), Path("."))
            raise AssertionError(
                f"{where}: the doc says this block produces {claim['value']!r}, which does not exist "
                f"({parent} holds {sorted(os.listdir(parent))})"
            )
        if not re.search(printed_pattern(claim["value"]), printed):
            raise AssertionError(
                f"{where}: the doc says this prints {claim['value']!r}; it printed:\n{printed[-4000:]}"
            )


def run(spec_path: str) -> None:
    """Execute a spec's blocks in order in one namespace, checking each block's claims right after it."""
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    # A fresh __main__ module, as `python` gives a reader: classes the snippets define live in it.
    main = types.ModuleType("__main__")
    sys.modules["__main__"] = main
    namespace = main.__dict__
    tee = _Tee(sys.stdout)
    sys.stdout = tee
    for block in spec["blocks"]:
        where = f"{block['where']}:{block['line']}"
        print(f"=== running {where}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        tee.captured = io.StringIO()
        # Blank lines up to the block's first line: a traceback shows the doc's file, line and text.
        source = "\n" * (block["line"] - 1) + block["code"]
        exec(compile(source, block["source"], "exec"), namespace)
        sys.stdout.flush()
        if block["signature"]:
            check_signatures(block["code"], namespace, where)
        _check_claims(block, tee.captured.getvalue())
        print(f"=== {where}: ok ({time.perf_counter() - started:.1f} s)", file=sys.stderr, flush=True)


if __name__ == "__main__":
    run(sys.argv[1])
