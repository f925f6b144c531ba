"""The ``lightning-lora-ckpt`` command: LightningCLI training subcommands and checkpoint management."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.prompt import Confirm
from rich.table import Table

from ..format.layout import ROOT_ENV, default_root
from ..format.records import Checkpoint
from ..format.strict_json import iso_time
from ..storage.archive import extract_archive
from ..storage.fs import CheckpointWriteError
from ..storage.store import INCOMPLETE_AFTER, CheckpointStore

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


def _human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


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


@contextmanager
def _progress_bar(console: Console, enabled: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    """A rich progress bar per file, fed by the store's (name, done, total) callback."""
    if not enabled:
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        tasks: dict[str, Any] = {}

        def update(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = progress.add_task(name, total=total)
            progress.update(tasks[name], completed=done)

        yield update


def _confirm(args: argparse.Namespace, question: str) -> None:
    if args.yes:
        return
    if not sys.stdin or not sys.stdin.isatty():  # no one to ask: never read an answer from a pipe or a closed stdin
        raise RuntimeError(
            f"aborted: {args.command} asks for confirmation and stdin is not a terminal; pass -y to {args.command} "
            "without asking"
        )
    if not Confirm.ask(question, default=False):
        raise RuntimeError("aborted (pass -y to skip this question)")


# -- commands: each returns what --json prints -------------------------------------------------------
def cmd_list(store: CheckpointStore, args: argparse.Namespace, console: Console) -> Any:
    """``list``: the checkpoints of one run (oldest first), or one page of every run's (newest first).

    Args:
        store: the store of ``--root`` and ``--storage-options``.
        args: the parsed command line.
        console: where human-readable output goes.

    Returns:
        What ``--json`` prints (``checkpoints``, and ``cursor`` for every run's), else None.

    Raises:
        KeyError: ``run_id`` names no run.
        ValueError: an invalid run id, ``--limit`` or ``--offset``.
        FileNotFoundError: the root does not exist.
    """
    if not store.root_exists():  # a mistyped --root is an error, not an empty table
        raise FileNotFoundError(
            f"No checkpoint root at {store.root}: it does not exist (nothing was saved there yet?); "
            f"check --root or ${ROOT_ENV}"
        )
    if args.run_id:
        store.get_run(args.run_id)  # an unknown run is an error, not an empty table
        checkpoints = store.list_checkpoints(args.run_id)
        title, cursor = f"run {args.run_id}", None
    else:
        page = store.list_user_checkpoints(limit=args.limit, offset=args.offset)
        checkpoints, cursor = page.checkpoints, page.cursor
        title = f"{store.root}: {cursor.offset + 1}-{cursor.offset + len(checkpoints)} of {cursor.total_count}, newest first"
    if args.json:
        out: dict[str, Any] = {"checkpoints": [c.to_dict() for c in checkpoints]}
        if cursor:
            out["cursor"] = {"offset": cursor.offset, "limit": cursor.limit, "total_count": cursor.total_count}
        return out
    console.print(_checkpoint_table(title, checkpoints))
    return None


def cmd_info(store: CheckpointStore, args: argparse.Namespace, console: Console) -> Any:
    """``info``: a checkpoint's record and manifest (fingerprint, content sha256, files, versions).

    Args:
        store: the store of ``--root`` and ``--storage-options``.
        args: the parsed command line.
        console: where human-readable output goes.

    Returns:
        What ``--json`` prints, else None.

    Raises:
        CheckpointFormatError: there is no committed checkpoint at the URI, or its manifest is invalid.
        ValueError: the URI is a malformed ``lora://`` URI.
    """
    checkpoint, manifest = store.get(args.uri), store.manifest(args.uri)
    info = {
        **checkpoint.to_dict(),
        "epoch": manifest.epoch,
        "base_model_fingerprint": manifest.base_model.fingerprint,
        "content_sha256": manifest.content_sha256,
        "files": {n: {"size": f.size, "sha256": f.sha256} for n, f in manifest.files.items()},
        "versions": manifest.versions,
    }
    if args.json:
        return info
    table = Table(show_header=False, title=checkpoint.path)
    for key, value in info.items():
        table.add_row(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    console.print(table)
    return None


def cmd_set_ttl(store: CheckpointStore, args: argparse.Namespace, console: Console) -> Any:
    """``set-ttl``: set (``--ttl``) or remove (``--remove``) a checkpoint's expiry.

    Args:
        store: the store of ``--root`` and ``--storage-options``.
        args: the parsed command line.
        console: where human-readable output goes.

    Returns:
        What ``--json`` prints: the updated record and a message.

    Raises:
        ValueError: not exactly one of ``--ttl`` and ``--remove``, or a duration that is not positive.
        CheckpointFormatError: there is no committed checkpoint at the URI, or its manifest is invalid.
    """
    if args.remove == (args.ttl is not None):
        raise ValueError("pass exactly one of --ttl DURATION (e.g. 7d) or --remove")
    c = store.set_ttl(args.uri, None if args.remove else args.ttl)
    return _say(args, console, c, f"{c.path}: expires {iso_time(c.expires_at) if c.expires_at else 'never'}")


def cmd_publish(store: CheckpointStore, args: argparse.Namespace, console: Console) -> Any:
    """``publish`` / ``unpublish``: mark a checkpoint public or private.

    Args:
        store: the store of ``--root`` and ``--storage-options``.
        args: the parsed command line.
        console: where human-readable output goes.

    Returns:
        What ``--json`` prints: the updated record and a message.

    Raises:
        CheckpointConflictError: the checkpoint is already public (or private).
        CheckpointFormatError: there is no committed checkpoint at the URI, or its manifest is invalid.
    """
    c = store.publish(args.uri) if args.command == "publish" else store.unpublish(args.uri)
    return _say(args, console, c, f"{c.path}: {'public' if c.public else 'private'}")


def cmd_delete(store: CheckpointStore, args: argparse.Namespace, console: Console) -> Any:
    """``delete``: delete checkpoints, after confirmation unless ``-y``.

    Args:
        store: the store of ``--root`` and ``--storage-options``.
        args: the parsed command line.
        console: where human-readable output goes.

    Returns:
        What ``--json`` prints: the records of the deleted checkpoints.

    Raises:
        RuntimeError: the confirmation was declined.
        CheckpointFormatError: a URI has no committed checkpoint (nothing is deleted then).
        CheckpointWriteError: the storage kept failing.
    """
    checkpoints = [store.get(uri) for uri in args.uris]
    _confirm(args, f"Delete {len(checkpoints)} checkpoint(s): {', '.join(c.path for c in checkpoints)}?")
    for c in checkpoints:
        store.delete(c.path)
        if not args.json:
            console.print(f"deleted {c.path}")
    return [c.to_dict() for c in checkpoints]


def cmd_gc(store: CheckpointStore, args: argparse.Namespace, console: Console) -> Any:
    """``gc``: delete expired checkpoints and leftovers of interrupted writes, after confirmation unless ``-y``.

    Args:
        store: the store of ``--root`` and ``--storage-options``.
        args: the parsed command line.
        console: where human-readable output goes.

    Returns:
        What ``--json`` prints: ``dry_run``, the records of the (to be) deleted checkpoints and the URIs of the
        (to be) removed leftovers.

    Raises:
        RuntimeError: the confirmation was declined, or cannot be asked (stdin is not a terminal, no ``-y``).
        CheckpointWriteError: the storage kept failing.
    """
    planned = store.gc(dry_run=True)
    leftovers = store.incomplete(INCOMPLETE_AFTER)
    if (planned or leftovers) and not args.dry_run:
        listed = [c.path for c in planned] + leftovers
        _confirm(
            args,
            f"Delete {len(planned)} expired checkpoint(s) and {len(leftovers)} leftover(s) of interrupted writes: "
            f"{', '.join(listed)}?",
        )
        planned = store.gc(only=listed)  # exactly what was listed (those still due), never more
    if not args.json:
        verb = "would delete" if args.dry_run else "deleted"
        console.print(_checkpoint_table(f"gc {verb} {len(planned)} checkpoint(s)", planned))
        if leftovers:
            console.print(f"gc {'would remove' if args.dry_run else 'removed'} {len(leftovers)} leftover(s)")
    return {"dry_run": args.dry_run, "deleted": [c.to_dict() for c in planned], "leftovers": leftovers}


def cmd_download(store: CheckpointStore, args: argparse.Namespace, console: Console) -> Any:
    """``download``: copy a checkpoint into a local directory, verifying every file.

    Args:
        store: the store of ``--root`` and ``--storage-options``.
        args: the parsed command line.
        console: where human-readable output goes.

    Returns:
        What ``--json`` prints: the directory and a message.

    Raises:
        FileExistsError: the output directory exists and is not empty.
        CheckpointFormatError: there is no checkpoint at the URI, or a file is missing, unsafe or damaged.
    """
    with _progress_bar(console, not args.json) as progress:
        path = store.download(args.uri, args.output_dir, progress=progress)
    return _say(args, console, None, f"downloaded {store.resolve(args.uri)} to {path}", path=path)


def cmd_archive(store: CheckpointStore, args: argparse.Namespace, console: Console) -> Any:
    """``archive``: write a verified checkpoint as a ``.tar`` or ``.tar.gz``.

    Args:
        store: the store of ``--root`` and ``--storage-options``.
        args: the parsed command line.
        console: where human-readable output goes.

    Returns:
        What ``--json`` prints: the archive's path and a message.

    Raises:
        CheckpointFormatError: there is no checkpoint at the URI, or a file is missing, unsafe or damaged.
    """
    with _progress_bar(console, not args.json) as progress:
        path = store.archive(args.uri, args.tar_path, progress=progress)
    return _say(args, console, None, f"archived {store.resolve(args.uri)} to {path}", path=path)


def cmd_extract(store: CheckpointStore, args: argparse.Namespace, console: Console) -> Any:
    """``extract``: safely extract a checkpoint archive.

    Args:
        store: the store of ``--root`` and ``--storage-options``.
        args: the parsed command line.
        console: where human-readable output goes.

    Returns:
        What ``--json`` prints: the directory and a message.

    Raises:
        ValueError: a member is not a regular file or would land outside the output directory.
        FileNotFoundError: there is no archive at the path.
    """
    path = extract_archive(args.tar_path, args.output_dir, store.storage_options)
    return _say(args, console, None, f"extracted {args.tar_path} to {path}", path=path)


def cmd_verify(store: CheckpointStore, args: argparse.Namespace, console: Console) -> Any:
    """``verify``: check every file against the manifest; a damaged checkpoint sets ``args.exit_code`` to 2.

    Args:
        store: the store of ``--root`` and ``--storage-options``.
        args: the parsed command line.
        console: where human-readable output goes.

    Returns:
        What ``--json`` prints: the path, ``ok``, the file sizes and the problems found.

    Raises:
        CheckpointFormatError: there is no committed checkpoint at the URI, or its manifest is invalid.
    """
    report = store.verify(args.uri)
    if not args.json:
        console.print(f"{'ok' if report.ok else 'DAMAGED'}: {report.path} ({len(report.files)} files)")
        for problem in report.problems:
            console.print(f"  {problem}")
    if not report.ok:
        args.exit_code = 2
    return {"path": report.path, "ok": report.ok, "files": report.files, "problems": report.problems}


def cmd_push_hf(store: CheckpointStore, args: argparse.Namespace, console: Console) -> Any:
    """``push-hf``: push a checkpoint's PEFT adapter and a model card to the Hugging Face Hub.

    Args:
        store: the store of ``--root`` and ``--storage-options``.
        args: the parsed command line.
        console: where human-readable output goes.

    Returns:
        What ``--json`` prints: the commit URL and a message.

    Raises:
        CheckpointFormatError: the checkpoint is missing, damaged or malformed.
        ValueError: ``--tag`` is not a valid git tag name.
        HubPublishError: there is no token, the Hub is unreachable or it refused a request.
    """
    from ..storage.hub import push_to_hub  # imports huggingface_hub and torch: only when pushing

    url = push_to_hub(
        store.resolve(args.uri),
        args.repo_id,
        private=not args.public,
        revision_tag=args.tag,
        storage_options=store.storage_options,
    )
    return _say(args, console, None, f"pushed {store.resolve(args.uri)} to {url}", commit_url=url)


def cmd_sample(store: CheckpointStore, args: argparse.Namespace, console: Console) -> Any:
    """``sample``: sample continuations of ``--prompt`` from a checkpoint's adapter.

    Args:
        store: the store of ``--root`` and ``--storage-options``.
        args: the parsed command line.
        console: where human-readable output goes.

    Returns:
        What ``--json`` prints: the adapter's identity and the sampled sequences.

    Raises:
        CheckpointFormatError: the checkpoint is missing, damaged or malformed.
        ValueError: an empty prompt or ``--num-samples`` below 1.
    """
    import dataclasses

    from ..modeling.sampling import SamplingClient, SamplingParams  # imports torch: only when sampling

    client = SamplingClient.from_checkpoint(store.resolve(args.uri), storage_options=store.storage_options)
    params = SamplingParams(args.max_tokens, args.temperature, args.top_p, args.top_k, args.stop, args.seed)
    response = client.sample(args.prompt, params, num_samples=args.num_samples)
    if not args.json:
        for i, seq in enumerate(response.sequences):
            console.print(f"[{i}] ({seq.finish_reason}) {args.prompt}{seq.text}", highlight=False)
    return {
        "identity": dataclasses.asdict(client.identity),
        "sequences": [dataclasses.asdict(seq) for seq in response.sequences],
    }


def cmd_merge(store: CheckpointStore, args: argparse.Namespace, console: Console) -> Any:
    """``merge``: fold a checkpoint's LoRA adapter into its base, as a full HF model directory.

    Args:
        store: the store of ``--root`` and ``--storage-options``.
        args: the parsed command line.
        console: where human-readable output goes.

    Returns:
        What ``--json`` prints: the model directory and a message.

    Raises:
        CheckpointFormatError: the checkpoint is missing, damaged or malformed.
        ValueError: an unsupported ``--dtype`` or ``--max-shard-size``, another base, or an adapter that
            cannot be merged.
        FileExistsError: the output directory is not empty and ``--overwrite`` is not given.
    """
    from .export import merge_adapter  # imports torch and transformers: only when merging

    uri = store.resolve(args.uri)
    with _progress_bar(console, not args.json) as progress:
        path = merge_adapter(
            uri,
            args.output_dir,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            base_model=args.base_model,
            overwrite=args.overwrite,
            storage_options=store.storage_options,
            progress=progress,
        )
    return _say(args, console, None, f"merged {uri} into {path}", path=path)


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


def _say(args: argparse.Namespace, console: Console, checkpoint: Checkpoint | None, message: str, **extra: Any) -> Any:
    if not args.json:
        console.print(message, highlight=False)
    return {**(checkpoint.to_dict() if checkpoint else {}), **extra, "message": message}


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
    add("info", cmd_info, "show a checkpoint's metadata and files", "uri")
    p = add("set-ttl", cmd_set_ttl, "set (--ttl 7d) or remove (--remove) a checkpoint's expiry", "uri")
    p.add_argument("--ttl", help="seconds, or a number with s/m/h/d/w: 30m, 2h, 7d")
    p.add_argument("--remove", action="store_true")
    add("publish", cmd_publish, "mark a checkpoint public (never garbage-collected)", "uri")
    add("unpublish", cmd_publish, "mark a checkpoint private again", "uri")
    p = add("delete", cmd_delete, "delete checkpoints")
    p.add_argument("uris", nargs="+")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    p = add("gc", cmd_gc, "delete expired checkpoints (never a run's newest training checkpoint or a public one)")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    add("download", cmd_download, "copy a checkpoint into a local directory, verifying every file", "uri", "output_dir")
    add("archive", cmd_archive, "write a checkpoint as a .tar or .tar.gz (any URI)", "uri", "tar_path")
    add("extract", cmd_extract, "safely extract a checkpoint archive", "tar_path", "output_dir")
    p = add("push-hf", cmd_push_hf, "push a checkpoint's PEFT adapter and a model card to the Hugging Face Hub", "uri")
    p.add_argument("--repo-id", required=True)
    p.add_argument("--tag", default=None, help="tag naming the checkpoint (default: RUN-NAME)")
    p.add_argument("--public", action="store_true", help="create the repo public (default: private)")
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
        The exit status: 0 on success, 1 on an error, 2 if ``verify`` found a damaged checkpoint.

    Raises:
        SystemExit: from argparse, for ``--help`` or a bad command line.
    """
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
