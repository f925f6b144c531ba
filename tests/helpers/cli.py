"""The command line in a subprocess, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any


def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """``python -m lightning_lora_ckpt ARGS`` with ``stdin``; its exit status and captured output."""
    return subprocess.run(
        [sys.executable, "-m", "lightning_lora_ckpt", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=120,
    )


def cli_json(*args: str) -> Any:
    """The parsed ``--json`` output of a command that must succeed."""
    out = cli(*args, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)
