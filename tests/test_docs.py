"""Every Python snippet of README.md and docs/*.md runs, and what the docs say it prints or writes holds.

One test per Markdown file: its ```python blocks run in order in one fresh process (a reader pasting them one
after another into ``python``, in a scratch directory holding the repo's ``examples/``), after the offline
stand-ins below and the file's setup prelude. Claims (``# -> path``, ``# prints: text``), opt-outs
(``<!-- snippet: skip (reason) -->``) and signature blocks (``<!-- snippet: signature -->``) are described
in ``helpers/doc_snippets.py``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from helpers.doc_snippets import Claim, Snippet, claims, collect, expand_braces, printed_pattern, substitute, write_spec

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
#: Pages whose snippets talk to a running vLLM server: tests/test_serving.py runs them (make test-serving).
SERVING_DOCS = [REPO / "docs" / "serving.md"]
WITH_SNIPPETS = [doc for doc in DOCS if collect(doc) and doc not in SERVING_DOCS]

# The offline stand-ins, applied in order to every snippet before it runs: (regex, replacement).
STAND_INS: list[tuple[str, str]] = [
    # a Hugging Face model id -> the built-in tiny Qwen3 (built from a config, no download)
    (r'"Qwen/Qwen3-0\.6B"', '"tiny-qwen3"'),
    # a bucket -> a local directory in the reader's scratch directory
    (r"\bs3://(my-bucket|bucket)/", r"remote/\1/"),
    # the user's data -> the data shipped in examples/
    (r'"train\.jsonl"', '"examples/data/demo_train.jsonl"'),
    # a long training run -> a few steps
    (r"\bmax_steps=1000\b", "max_steps=4"),
]

# What a page takes as already there: the names it uses unimported, the placeholders of its signature blocks,
# and the checkpoints its snippets read (trained for a couple of steps by helpers.doc_snippets.seed_checkpoints
# under the same root and names). Setup names start with "_" and are deleted, so no snippet can lean on them.
PRELUDES: dict[str, str] = {
    "README.md": """
from helpers.doc_snippets import seed_checkpoints as _seed

# the s3://my-bucket/ckpts run of the "Sampling, merging and QLoRA" block
_seed("remote/my-bucket/ckpts", "exp1", sampler=["best", "step-2000"])
del _seed
""",
    "guide.md": """
import os as _os

from support.hub_server import HubServer as _HubServer

# push_to_hub goes to a Hub on loopback (set before huggingface_hub is imported: it reads these once)
_url = _HubServer("hf_docs_token").start().url
_os.environ.update(HF_ENDPOINT=_url, HF_TOKEN="hf_docs_token", HF_HUB_OFFLINE="0", HF_HOME=_os.path.abspath("hf"))

from helpers.doc_snippets import seed_checkpoints as _seed
from lightning_lora_ckpt import (
    CheckpointTTL,
    HubPublisher,
    JSONLDataModule,
    LoRACheckpointIO,
    LoRAModule,
    PeriodicCheckpoint,
    push_to_hub,
)

_seed("checkpoints", "run", sampler=["final"])
del _os, _HubServer, _url, _seed
# the placeholders of the signature blocks
base_model = "tiny-qwen3"
train_file = "examples/data/demo_train.jsonl"
uri = "lora://run/sampler_weights/final"
repo_id = "tester/docs-adapter"
""",
    "sampling.md": """
from helpers.doc_snippets import seed_checkpoints as _seed
from lightning_lora_ckpt import SamplingClient, SamplingParams

# the run's sampler checkpoints, and `model`: a LoRAModule in training
model = _seed("checkpoints", "run", sampler=["000200", "final"])
tokens = model.get_tokenizer()("The capital of France")["input_ids"]
del _seed
""",
    "merge.md": """
from helpers.doc_snippets import seed_checkpoints as _seed

_seed("checkpoints", "exp1", sampler=["final"])
del _seed
""",
    "layouts.md": """
from helpers.doc_snippets import seed_checkpoints as _seed

_seed("checkpoints", "run", sampler=["final"])
del _seed
""",
    "qlora.md": """
import lightning as L

from lightning_lora_ckpt import (
    JSONLDataModule,
    LoRACheckpointIO,
    LoRAModule,
    PeriodicCheckpoint,
    SamplingClient,
    merge_adapter,
)
""",
    "storage.md": """
from lightning_lora_ckpt import CheckpointStore, LoRACheckpointIO
""",
    "faults-and-hostile-input.md": """
from lightning_lora_ckpt import LoRACheckpointIO
""",
}


def _name(doc: Path) -> str:
    return doc.relative_to(REPO).as_posix() if doc.is_relative_to(REPO) else doc.name


def _runnable(doc: Path, stand_ins: Sequence[tuple[str, str]] = ()) -> list[tuple[Snippet, str]]:
    table = [*stand_ins, *STAND_INS]
    return [(s, substitute(s.code, table)) for s in collect(doc, _name(doc)) if s.skip_reason is None]


def run_page(
    doc: Path, tmp_path: Path, prelude: str | None = None, stand_ins: Sequence[tuple[str, str]] = ()
) -> subprocess.CompletedProcess[str]:
    """Run a page's snippets (``stand_ins``, then :data:`STAND_INS` applied, after ``prelude``) in a fresh process,
    cwd a scratch directory holding the repo's ``examples/``."""
    reader = tmp_path / "reader"
    reader.mkdir()
    (reader / "examples").symlink_to(REPO / "examples", target_is_directory=True)
    spec = tmp_path / "spec.json"
    write_spec(spec, prelude, doc, _runnable(doc, stand_ins))
    env = {k: v for k, v in os.environ.items() if k not in ("LORA_CKPT_ROOT", "HF_ENDPOINT", "HF_TOKEN")}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf_home"),
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join([str(TESTS), *filter(None, [env.get("PYTHONPATH")])]),
    )
    return subprocess.run(
        [sys.executable, "-m", "helpers.doc_snippets", str(spec)],
        cwd=reader,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("doc", WITH_SNIPPETS, ids=_name)
def test_doc_snippets_run_and_claims_hold(doc: Path, tmp_path: Path) -> None:
    proc = run_page(doc, tmp_path, PRELUDES.get(doc.name))
    assert proc.returncode == 0, (
        f"a snippet of {_name(doc)} failed (its file:line is in the traceback)\n"
        f"--- stderr (tail)\n{proc.stderr[-12000:]}\n--- stdout (tail)\n{proc.stdout[-3000:]}"
    )


@pytest.mark.parametrize(
    ("code", "error"),
    [
        ("print('hi')  # prints: hi\nx = 1  # -> out.txt\n", "produces 'out.txt'"),
        ("print('hi')  # prints: ho\n", "prints 'ho'"),
        ("x = 1\n\nundefined_name\n", "NameError"),
        ("open('out.txt', 'w').close()  # -> out.txt\nprint(x)  # prints: 2\n", None),
    ],
)
def test_runner_fails_on_a_broken_snippet_or_claim(tmp_path: Path, code: str, error: str | None) -> None:
    page = tmp_path / "page.md"
    page.write_text(f"# Page\n\n```python\n{code}```\n")
    proc = run_page(page, tmp_path, prelude="x = 2\n")
    if error is None:
        assert proc.returncode == 0, proc.stderr
    else:
        assert proc.returncode != 0
        assert error in proc.stderr and "page.md" in proc.stderr, proc.stderr


def test_stand_ins_and_preludes_are_all_in_use() -> None:
    """A stand-in no snippet needs any more, or a prelude for a page without snippets, is stale: remove it."""
    runnable = [snippet.code for doc in WITH_SNIPPETS for snippet, _ in _runnable(doc)]
    for pattern, _ in STAND_INS:
        assert any(re.search(pattern, code) for code in runnable), f"no snippet matches the stand-in {pattern!r}"
    assert set(PRELUDES) <= {doc.name for doc in WITH_SNIPPETS}


def test_collect_markers_and_claims(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "text\n"
        "```python\n"
        "x = 1  # -> out/{a,b}/ (two folders)\n"
        "print('#', x)  # prints: # 1\n"
        "```\n"
        "<!-- snippet: skip (needs a GPU) -->\n"
        "```python\n"
        "torch.cuda.init()\n"
        "```\n"
        "<!-- snippet: signature -->\n"
        "```py\n"
        "f(a, b=1)\n"
        "print(a)\n"
        "# prints: a\n"
        "```\n"
        "```bash\n"
        "echo no\n"
        "```\n"
    )
    first, skipped, signature = collect(page)
    assert (first.line, first.skip_reason, first.signature) == (3, None, False)
    assert claims(first.code) == [Claim("exists", "out/a/", 0), Claim("exists", "out/b/", 0), Claim("prints", "# 1", 1)]
    assert (skipped.skip_reason, skipped.code) == ("needs a GPU", "torch.cuda.init()\n")
    assert signature.signature and claims(signature.code) == [Claim("prints", "a", 2)]
    assert expand_braces("w/{x,y}/{1,2}") == ["w/x/1", "w/x/2", "w/y/1", "w/y/2"]
    pattern = printed_pattern(".../weights/step={4,8}.ckpt")
    assert re.search(pattern, "/tmp/x/weights/step=8.ckpt\n")
    assert not re.search(pattern, "/tmp/x/weights/step=6.ckpt\n")

    page.write_text("<!-- snippet: skip -->\n```python\nx = 1\n```\n")
    with pytest.raises(ValueError, match="snippet: skip"):
        collect(page)
    with pytest.raises(ValueError, match="must follow a print"):
        claims("x = 1  # prints: 1\n")
