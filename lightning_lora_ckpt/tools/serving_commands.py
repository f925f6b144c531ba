"""The serving commands of ``lightning-lora-ckpt``: ``check`` (can vLLM serve it?), ``hotload`` (into a running
vLLM server) and ``export-base`` (a built-in base as a model directory a server can load)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

from rich.console import Console

from ..storage.store import CheckpointStore


def cmd_check(store: CheckpointStore, args: argparse.Namespace, console: Console) -> Any:
    """``check``: whether vLLM can serve a checkpoint's adapter (exit 2 if not), with the reasons.

    Raises:
        CheckpointFormatError: the checkpoint is missing, damaged or malformed.
    """
    from ..modeling.servable import servable_report  # imports torch and transformers: only when checking
    from ..storage.loading import open_checkpoint

    uri = store.resolve(args.uri)
    report = servable_report(
        open_checkpoint(uri, storage_options=store.storage_options), args.max_lora_rank, raise_if_not=False
    )
    if not report.ok:
        args.exit_code = 2
    if not args.json:
        verdict = "servable" if report.ok else "NOT servable"
        console.print(
            f"{uri}: {verdict} by vLLM (rank {report.lora_rank}, {report.architecture or 'architecture unknown'})",
            highlight=False,
        )
        for problem in report.problems:
            console.print(f"  problem: {problem}", highlight=False)
        for note in report.notes:
            console.print(f"  note: {note}", highlight=False)
    return {**dataclasses.asdict(report), "ok": report.ok}


def cmd_hotload(store: CheckpointStore, args: argparse.Namespace, console: Console) -> Any:
    """``hotload``: load a checkpoint's adapter into a running vLLM server and print the name it serves.

    Raises:
        CheckpointFormatError: the checkpoint is missing, damaged or malformed.
        NotServableError: vLLM cannot serve it; nothing was sent.
        ValueError: the server serves another base.
        VLLMServerError: the server is unreachable or refused.
    """
    from ..modeling.hotload import hotload  # imports torch and transformers: only when hotloading

    served = hotload(
        store.resolve(args.uri),
        args.url,
        unload=args.unload or (),
        max_lora_rank=args.max_lora_rank,
        cache_dir=args.cache_dir,
        storage_options=store.storage_options,
        api_key=args.api_key or os.environ.get("VLLM_API_KEY"),
    )
    if not args.json:
        console.print(f"{served.base_url} serves {served.uri} as {served.vllm_name}", highlight=False)
    return dataclasses.asdict(served)


def cmd_export_base(store: CheckpointStore, args: argparse.Namespace, console: Console) -> Any:
    """``export-base``: write a built-in base (``tiny-qwen3-hd32``, ...) as a model directory with its tokenizer.

    Raises:
        ValueError: the name is not a built-in base.
        FileExistsError: the output directory is not empty.
    """
    from ..modeling.base import export_builtin  # imports torch and transformers

    path = export_builtin(args.name, args.output_dir)
    if not args.json:
        console.print(f"wrote {args.name} to {path}", highlight=False)
    return {"name": args.name, "path": path}
