"""The ``lightning-lora-ckpt`` command: LightningCLI training subcommands and checkpoint management."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console

from ..format.layout import ROOT_ENV, default_root
from ..storage.fs import CheckpointWriteError
from ..storage.store import DELETE_GRACE, INCOMPLETE_AFTER, CheckpointStore
from .commands import (
    cmd_archive,
    cmd_compact,
    cmd_convert,
    cmd_delete,
    cmd_download,
    cmd_extract,
    cmd_gc,
    cmd_info,
    cmd_list,
    cmd_merge,
    cmd_pin,
    cmd_prune,
    cmd_publish,
    cmd_push_hf,
    cmd_reindex,
    cmd_restore,
    cmd_sample,
    cmd_set_ttl,
    cmd_verify,
)
from .serving_commands import cmd_check, cmd_export_base, cmd_hotload

TRAINING_COMMANDS = ("fit", "validate", "test", "predict")


def run_lightning_cli(args: Sequence[str] | None) -> None:
    """``fit``/``validate``/``test``/``predict`` configured by YAML; model, data, plugins and callbacks by
    class_path.

    Args:
        args: the command line after the program name (``fit -c config.yaml ...``), or None for ``sys.argv``.
    """
    # Imported here: the management commands must start without torch and Lightning.
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI

    # Any LightningModule and data module by class_path (LoRAModule, JSONLDataModule, or the user's own).
    LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=None if args is None else list(args),
        save_config_kwargs={"overwrite": True},
    )


def _one_line(err: BaseException, root: str) -> str:
    """An error as one line. The errors this package raises carry the thing and the fix and are printed as
    they are; any other (a storage error: credentials, an endpoint, the network) gets its type and a hint."""
    message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    if isinstance(err, ImportError):
        message = message or f"a package is missing ({err.name})"
    elif not isinstance(err, _EXPLAINED) or not message:
        message = (
            f"{type(err).__name__}: {message or 'no message'} (reaching {root}: check --root, --storage-options "
            "(endpoint, credentials) and the network; --debug shows the traceback)"
        )
    message = " ".join(message.split())  # storage errors may span lines
    return message if len(message) <= 1000 else message[:997] + "..."


#: Errors whose message names the thing and the fix (those this package raises).
_EXPLAINED = (
    KeyError,
    ValueError,
    RuntimeError,
    FileExistsError,
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    CheckpointWriteError,
)


def _age(value: str) -> float | str:
    """An age on the command line: seconds (``0`` included) as a number, else a duration like ``1d``."""
    try:
        return float(value)
    except ValueError:
        return value


def build_parser() -> argparse.ArgumentParser:
    """The parser of the checkpoint management commands (the training commands go to LightningCLI).

    Returns:
        The parser; each subcommand sets ``handler`` to its ``cmd_*`` function.
    """
    parser = argparse.ArgumentParser(
        prog="lightning-lora-ckpt",
        description="LoRA checkpoint lifecycle for Lightning. Training: "
        f"{', '.join(TRAINING_COMMANDS)} (LightningCLI, e.g. 'fit -c examples/demo.yaml'). "
        "Checkpoints are given as URIs, local paths or lora://RUN/{weights|sampler_weights}/NAME.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", default=None, help=f"checkpoint root URI (default: ${ROOT_ENV} or ./checkpoints)")
    common.add_argument("--storage-options", type=json.loads, default=None, help="fsspec options as JSON")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    commands = parser.add_subparsers(dest="command", required=True)

    def add(name: str, handler: Any, help: str, *positional: str) -> argparse.ArgumentParser:
        p = commands.add_parser(name, parents=[common], help=help, description=help)
        for arg in positional:
            p.add_argument(arg)
        p.set_defaults(handler=handler)
        return p

    p = add("list", cmd_list, "list checkpoints: of one run (oldest first), or of every run (newest first, paged)")
    p.add_argument("run_id", nargs="?")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--deleted", action="store_true", help="list the soft-deleted checkpoints (restorable) instead")
    add("info", cmd_info, "show a checkpoint's metadata, metrics and files (a soft-deleted one too)", "uri")
    p = add("set-ttl", cmd_set_ttl, "set (--ttl 7d) or remove (--remove) a checkpoint's expiry", "uri")
    p.add_argument("--ttl", help="seconds, or a number with s/m/h/d/w: 30m, 2h, 7d")
    p.add_argument("--remove", action="store_true")
    add("publish", cmd_publish, "mark a checkpoint public (never garbage-collected)", "uri")
    add("unpublish", cmd_publish, "mark a checkpoint private again", "uri")
    add("pin", cmd_pin, "pin a checkpoint: nothing deletes or replaces it until it is unpinned", "uri")
    add("unpin", cmd_pin, "unpin a checkpoint", "uri")
    add("restore", cmd_restore, "bring back a soft-deleted checkpoint (before gc purges it)", "uri")
    p = add(
        "prune",
        cmd_prune,
        "soft-delete the checkpoints of a run that no rule keeps (published, pinned and the newest training "
        "checkpoint are always kept)",
        "run_id",
    )
    p.add_argument("--keep-latest", type=int, default=None, metavar="N", help="keep the N newest steps")
    p.add_argument("--keep-every", type=int, default=None, metavar="N", help="keep the steps divisible by N")
    p.add_argument(
        "--keep-best",
        action="append",
        default=None,
        metavar="METRIC:MODE:N",
        help="keep the N best by a logged metric, MODE min or max, e.g. val_loss:min:2 (repeatable)",
    )
    p.add_argument("--max-bytes", default=None, metavar="B", help="byte budget of the run: bytes or 50GB, 1.5GiB")
    p.add_argument("--separately", action="store_true", help="judge sampler and training checkpoints apart")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    p = add("delete", cmd_delete, "delete checkpoints now, for good (a soft-deleted one too; never a pinned one)")
    p.add_argument("uris", nargs="+")
    p.add_argument("--cascade", action="store_true", help="also delete the delta snapshots that need a checkpoint")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    p = add(
        "gc",
        cmd_gc,
        "delete expired checkpoints and purge soft-deleted ones (never a run's newest training checkpoint, a "
        "public or a pinned one)",
    )
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--cascade", action="store_true", help="also delete the delta snapshots a due snapshot has")
    p.add_argument(
        "--incomplete-after",
        type=_age,
        default=INCOMPLETE_AFTER,
        help=f"remove leftovers of interrupted writes this old: seconds or 30m, 2h, 1d (default {INCOMPLETE_AFTER})",
    )
    p.add_argument(
        "--grace",
        type=_age,
        default=DELETE_GRACE,
        help=f"purge soft-deleted checkpoints deleted this long ago: seconds or 30m, 2h, 1d (default {DELETE_GRACE})",
    )
    p = add("reindex", cmd_reindex, "rewrite the listing index of a run (of every run) from its manifests")
    p.add_argument("run_id", nargs="?")
    add("compact", cmd_compact, "rewrite a delta snapshot as a base: its full weights, written whole", "uri")
    add("download", cmd_download, "copy a checkpoint into a local directory, verifying every file", "uri", "output_dir")
    add("archive", cmd_archive, "write a checkpoint as a .tar or .tar.gz (any URI)", "uri", "tar_path")
    add("extract", cmd_extract, "safely extract a checkpoint archive", "tar_path", "output_dir")
    p = add("push-hf", cmd_push_hf, "push a checkpoint's PEFT adapter and a model card to the Hugging Face Hub", "uri")
    p.add_argument("--repo-id", required=True)
    p.add_argument("--tag", default=None, help="tag naming the checkpoint (default: RUN-NAME)")
    p.add_argument("--public", action="store_true", help="create the repo public (default: private)")
    p.add_argument("--no-servable-check", action="store_true", help="push even an adapter vLLM cannot serve")
    p = add("check", cmd_check, "check that vLLM can serve a checkpoint's adapter (exit 2 if not, with reasons)", "uri")
    p.add_argument("--max-lora-rank", type=int, default=None, help="the server's --max-lora-rank")
    p = add("hotload", cmd_hotload, "load a checkpoint's adapter into a running vLLM server", "uri")
    p.add_argument("--url", required=True, help="the vLLM server, e.g. http://127.0.0.1:8000")
    p.add_argument("--unload", action="append", default=None, metavar="NAME", help="a served name to unload after")
    p.add_argument("--max-lora-rank", type=int, default=None, help="the server's --max-lora-rank")
    p.add_argument("--cache-dir", default=None, help="where remote checkpoints are downloaded for the server")
    p.add_argument("--api-key", default=None, help="the server's --api-key (default: $VLLM_API_KEY)")
    add(
        "export-base",
        cmd_export_base,
        "write a built-in base (e.g. tiny-qwen3-hd32) as a model directory",
        "name",
        "output_dir",
    )
    p = add("sample", cmd_sample, "sample continuations of a prompt from a checkpoint's adapter", "uri")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-samples", type=int, default=1)
    p = add(
        "merge",
        cmd_merge,
        "fold a checkpoint's LoRA adapter into its base: a full HF model directory that loads without PEFT",
        "uri",
        "output_dir",
    )
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 (default), float16 or float32")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors file, e.g. 500MB (default 2GB)")
    p.add_argument("--base-model", default=None, help="fold into this base (same config) instead of the manifest's")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p = add(
        "convert",
        cmd_convert,
        "write a checkpoint's adapter stacked over layers (MaxText's scan layout) or back as a PEFT directory",
        "uri",
        "output_dir",
    )
    p.add_argument("--layout", required=True, choices=("stacked", "unstacked"))
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    add("verify", cmd_verify, "check every file against the manifest's size and sha256 (exit 2 if damaged)", "uri")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lightning-lora-ckpt`` command.

    ``fit``, ``validate``, ``test`` and ``predict`` run LightningCLI; every other command manages
    checkpoints. Any error of a management command (bad input, a damaged checkpoint, and storage errors:
    missing credentials, an unreachable endpoint, a filesystem package not installed) is printed as one
    ``error: ...`` line on stderr instead of a traceback; ``--debug`` shows the traceback instead.

    Args:
        argv: the arguments after the program name, or None for ``sys.argv[1:]``.

    Returns:
        The exit status: 0 on success, 1 on an error, 2 if ``verify`` found a damaged checkpoint or ``check`` an
        adapter vLLM cannot serve.

    Raises:
        SystemExit: from argparse, for ``--help`` or a bad command line.
    """
    # bitsandbytes warns on import, through logging's last-resort handler, that an optional CPU kernel package
    # is missing: noise on every command that imports PEFT, not a problem of the command.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    words = list(sys.argv[1:] if argv is None else argv)
    if words and words[0] in TRAINING_COMMANDS:
        run_lightning_cli(argv)
        return 0
    args = build_parser().parse_args(words)
    args.exit_code = 0
    console = Console()
    if not console.is_terminal:  # piped or logged: do not squeeze tables into 80 columns
        console = Console(width=200)
    try:
        result = args.handler(CheckpointStore(args.root, args.storage_options), args, console)
    except Exception as err:
        if args.debug:
            raise
        print(f"error: {_one_line(err, default_root(args.root))}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
    return args.exit_code


if __name__ == "__main__":
    sys.exit(main())
