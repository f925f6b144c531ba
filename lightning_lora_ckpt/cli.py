"""The ``lightning-lora-ckpt`` command: LightningCLI training subcommands and checkpoint management."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.cli import LightningCLI
from rich.console import Console
from rich.table import Table

from .data import JSONLDataModule
from .module import LoRAModule
from .records import Checkpoint
from .store import CheckpointStore
from .uris import ROOT_ENV

TRAINING_COMMANDS = ("fit", "validate", "test", "predict")


def run_lightning_cli(args: Sequence[str] | None) -> None:
    """``fit``/``validate``/``test``/``predict`` configured by YAML; model, data, plugins and callbacks by class_path."""
    LightningCLI(
        LoRAModule,
        JSONLDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=None if args is None else list(args),
        save_config_kwargs={"overwrite": True},
    )


def _human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _checkpoint_table(title: str, checkpoints: list[Checkpoint]) -> Table:
    table = Table(title=title)
    for column in ("type", "id", "step", "size", "created", "expires", "public"):
        table.add_column(column, no_wrap=True)
    table.add_column("path", overflow="fold")
    for c in checkpoints:
        table.add_row(
            c.checkpoint_type,
            c.checkpoint_id,
            str(c.step),
            _human_size(c.size_bytes),
            f"{c.time:%Y-%m-%d %H:%M}",
            f"{c.expires_at:%Y-%m-%d %H:%M}" if c.expires_at else "never",
            "yes" if c.public else "no",
            c.path,
        )
    return table


def cmd_list(store: CheckpointStore, args: argparse.Namespace, console: Console) -> Any:
    run_ids = [store.get_run(args.run_id).run_id] if args.run_id else [r.run_id for r in store.list_runs()]
    checkpoints = {run_id: store.list_checkpoints(run_id) for run_id in run_ids}
    if args.json:
        return {run_id: [c.to_dict() for c in cs] for run_id, cs in checkpoints.items()}
    for run_id, cs in checkpoints.items():
        console.print(_checkpoint_table(f"run {run_id}", cs))
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-lora-ckpt",
        description=f"LoRA checkpoint lifecycle for Lightning. Training: {', '.join(TRAINING_COMMANDS)} "
        "(LightningCLI, e.g. 'fit -c examples/demo.yaml').",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", default=None, help=f"checkpoint root URI (default: ${ROOT_ENV} or ./checkpoints)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("list", parents=[common], help="list runs and their committed checkpoints")
    p.add_argument("run_id", nargs="?", help="only this run")
    p.set_defaults(handler=cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if words and words[0] in TRAINING_COMMANDS:
        run_lightning_cli(argv)
        return 0
    args = build_parser().parse_args(words)
    console = Console()
    if not console.is_terminal:  # piped or logged: do not squeeze the table into 80 columns
        console = Console(width=200)
    try:
        result = args.handler(CheckpointStore(args.root), args, console)
    except (KeyError, ValueError, OSError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
