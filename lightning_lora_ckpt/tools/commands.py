"""The checkpoint management commands of ``lightning-lora-ckpt``: one ``cmd_*`` function per subcommand.

Each takes the store, the parsed arguments and a rich console, prints for people, and returns what
``--json`` prints. The parser and the entry point are in :mod:`.cli`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.prompt import Confirm
from rich.table import Table

from ..format.layout import ROOT_ENV
from ..format.records import Checkpoint
from ..format.strict_json import iso_time
from ..policy.retention import parse_retention
from ..storage.archive import extract_archive
from ..storage.fs import CheckpointConflictError
from ..storage.store import CheckpointStore, DeletedCheckpoint


def _human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _checkpoint_table(
    title: str, checkpoints: list[Checkpoint], extra: tuple[str, dict[str, str]] | None = None
) -> Table:
    """One row per checkpoint; ``extra``: one more column (its name, and its value by checkpoint path)."""
    table = Table(title=title)
    for column in ("type", "id", "step", "size", "created", "expires", "public", "pinned"):
        table.add_column(column, no_wrap=True)
    table.add_column("metrics", overflow="fold")
    if extra:
        table.add_column(extra[0], overflow="fold")
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
            "yes" if c.pinned else "no",
            " ".join(f"{name}={value:.4g}" for name, value in sorted(c.metrics.items())),
            *([extra[1].get(c.path, "")] if extra else []),
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
    """``list``: the checkpoints of one run (oldest first), or one page of every run's (newest first); with
    ``--deleted`` the soft-deleted ones (of one run or of all), oldest deletion first.

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
    if args.deleted:
        return _list_deleted(store.deleted(args.run_id or None), args, console)
    if args.run_id:
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


def _list_deleted(deleted: list[DeletedCheckpoint], args: argparse.Namespace, console: Console) -> Any:
    if args.json:
        return {"checkpoints": [d.to_dict() for d in deleted]}
    when = {d.checkpoint.path: f"{d.deleted_at:%Y-%m-%d %H:%M}" for d in deleted}
    title = f"{len(deleted)} soft-deleted checkpoint(s) (lightning-lora-ckpt restore URI brings one back)"
    console.print(_checkpoint_table(title, [d.checkpoint for d in deleted], ("deleted", when)))
    return None


def cmd_info(store: CheckpointStore, args: argparse.Namespace, console: Console) -> Any:
    """``info``: a checkpoint's record and manifest (fingerprint, content sha256, files, versions); a soft-deleted
    checkpoint is shown too, with its ``deleted_at``.

    Raises:
        CheckpointFormatError: there is no committed checkpoint at the URI, or its manifest is invalid.
        ValueError: the URI is a malformed ``lora://`` URI.
    """
    manifest = store.manifest(args.uri)
    checkpoint = store.get(args.uri, include_deleted=True)
    info = {
        **checkpoint.to_dict(),
        "deleted_at": iso_time(manifest.deleted_at) if manifest.deleted_at else None,
        "epoch": manifest.epoch,
        "base_model_fingerprint": manifest.base_model.fingerprint,
        "content_sha256": manifest.content_sha256,
        "files": {n: f.to_json() for n, f in manifest.files.items()},
        "versions": manifest.versions,
        **({"rebuilds": {n: f.to_json() for n, f in manifest.rebuilds.items()}} if manifest.rebuilds else {}),
    }
    if args.json:
        return info
    table = Table(show_header=False, title=checkpoint.path)
    for key, value in info.items():
        table.add_row(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    console.print(table)
    if manifest.deleted_at:
        console.print(f"soft-deleted: lightning-lora-ckpt restore {checkpoint.path} brings it back", highlight=False)
    return None


def cmd_set_ttl(store: CheckpointStore, args: argparse.Namespace, console: Console) -> Any:
    """``set-ttl``: set (``--ttl``) or remove (``--remove``) a checkpoint's expiry.

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

    Raises:
        CheckpointConflictError: the checkpoint is already public (or private).
        CheckpointFormatError: there is no committed checkpoint at the URI, or its manifest is invalid.
    """
    c = store.publish(args.uri) if args.command == "publish" else store.unpublish(args.uri)
    return _say(args, console, c, f"{c.path}: {'public' if c.public else 'private'}")


def cmd_pin(store: CheckpointStore, args: argparse.Namespace, console: Console) -> Any:
    """``pin`` / ``unpin``: pin a checkpoint (nothing deletes or replaces it) or unpin it.

    Raises:
        CheckpointConflictError: the checkpoint is already pinned (or not pinned).
        CheckpointFormatError: there is no committed checkpoint at the URI (or it is soft-deleted).
    """
    c = store.pin(args.uri) if args.command == "pin" else store.unpin(args.uri)
    return _say(args, console, c, f"{c.path}: {'pinned' if c.pinned else 'not pinned'}")


def cmd_restore(store: CheckpointStore, args: argparse.Namespace, console: Console) -> Any:
    """``restore``: bring back a soft-deleted checkpoint before ``gc`` purges it.

    Raises:
        CheckpointConflictError: the checkpoint is not soft-deleted.
        CheckpointFormatError: there is no checkpoint at the URI (purged, deleted, or never committed).
    """
    c = store.restore(args.uri)
    return _say(args, console, c, f"restored {c.path}")


def cmd_prune(store: CheckpointStore, args: argparse.Namespace, console: Console) -> Any:
    """``prune``: soft-delete the checkpoints of a run that the retention options do not keep, after confirmation
    unless ``-y`` or ``--dry-run``.

    Raises:
        KeyError: the run does not exist.
        ValueError: no retention option, or a bad one.
        RuntimeError: the confirmation was declined, or cannot be asked (stdin is not a terminal, no ``-y``).
        CheckpointWriteError: the storage kept failing.
    """
    store.get_run(args.run_id)  # an unknown run is an error, not an empty plan
    retention = parse_retention(args.keep_latest, args.keep_every, args.keep_best or (), args.max_bytes)
    together = not args.separately
    plan = store.prune(args.run_id, retention, dry_run=True, together=together)
    if plan.delete and not args.dry_run:
        _confirm(
            args,
            f"Soft-delete {len(plan.delete)} checkpoint(s) of run {args.run_id} (restorable until gc purges them): "
            f"{', '.join(c.path for c in plan.delete)}?",
        )
        only = [c.path for c in plan.delete]  # what was listed, never more
        plan = store.prune(args.run_id, retention, together=together, only=only)
    if plan.over_budget and not args.json:
        console.print(f"warning: the checkpoints that must be kept alone exceed the budget of {retention!r}")
    if not args.json:
        verb = "would soft-delete" if args.dry_run else "soft-deleted"
        console.print(_checkpoint_table(f"prune {verb} {len(plan.delete)} checkpoint(s)", plan.delete))
        kept = f"prune keeps {len(plan.keep)} checkpoint(s) of run {args.run_id}"
        console.print(_checkpoint_table(kept, plan.keep, ("kept because", plan.reasons)))
    return {
        "dry_run": args.dry_run,
        "run_id": args.run_id,
        "retention": repr(retention),
        "over_budget": plan.over_budget,
        "deleted": [c.to_dict() for c in plan.delete],
        "kept": [{**c.to_dict(), "reason": plan.reasons.get(c.path)} for c in plan.keep],
    }


def cmd_delete(store: CheckpointStore, args: argparse.Namespace, console: Console) -> Any:
    """``delete``: delete checkpoints for good (a soft-deleted one too), after confirmation unless ``-y``.

    Raises:
        RuntimeError: the confirmation was declined.
        CheckpointConflictError: a checkpoint is pinned (nothing is deleted then).
        CheckpointFormatError: a URI has no committed checkpoint (nothing is deleted then).
        CheckpointWriteError: the storage kept failing.
    """
    checkpoints = [store.get(uri, include_deleted=True) for uri in args.uris]
    for c in checkpoints:
        if c.pinned:
            raise CheckpointConflictError(
                f"Checkpoint {c.path} is pinned and is never deleted; unpin it first (lightning-lora-ckpt unpin {c.path})"
            )
    _confirm(args, f"Delete {len(checkpoints)} checkpoint(s): {', '.join(c.path for c in checkpoints)}?")
    for c in checkpoints:
        store.delete(c.path, cascade=args.cascade)
        if not args.json:
            console.print(f"deleted {c.path}")
    return [c.to_dict() for c in checkpoints]


def cmd_gc(store: CheckpointStore, args: argparse.Namespace, console: Console) -> Any:
    """``gc``: delete expired checkpoints, purge soft-deleted ones older than ``--grace``, and remove leftovers of
    interrupted writes, after confirmation unless ``-y``.

    Raises:
        RuntimeError: the confirmation was declined, or cannot be asked (stdin is not a terminal, no ``-y``).
        CheckpointWriteError: the storage kept failing.
    """
    planned = store.gc(dry_run=True, incomplete_after=args.incomplete_after, grace=args.grace, cascade=args.cascade)
    leftovers = store.incomplete(args.incomplete_after)
    if (planned or leftovers) and not args.dry_run:
        listed = [c.path for c in planned] + leftovers
        _confirm(
            args,
            f"Delete {len(planned)} expired or soft-deleted checkpoint(s) and {len(leftovers)} leftover(s) of "
            f"interrupted writes: {', '.join(listed)}?",
        )
        # what was listed, never more
        planned = store.gc(incomplete_after=args.incomplete_after, only=listed, grace=args.grace, cascade=args.cascade)
    if not args.json:
        verb = "would delete" if args.dry_run else "deleted"
        console.print(_checkpoint_table(f"gc {verb} {len(planned)} checkpoint(s)", planned))
        if leftovers:
            console.print(f"gc {'would remove' if args.dry_run else 'removed'} {len(leftovers)} leftover(s)")
    return {"dry_run": args.dry_run, "deleted": [c.to_dict() for c in planned], "leftovers": leftovers}


def cmd_reindex(store: CheckpointStore, args: argparse.Namespace, console: Console) -> Any:
    """``reindex``: rewrite the listing index of one run (or of every run) from its manifests.

    Raises:
        KeyError: there is no such run.
        CheckpointConflictError: writers kept changing the index meanwhile.
    """
    reports = store.reindex(args.run_id)
    if not args.json:
        for r in reports:
            changes = f"+{len(r.added)} -{len(r.removed)} ~{len(r.changed)}"
            console.print(f"{r.run_id}: index was {r.previous}; {r.checkpoints} checkpoint(s) ({changes})")
    return [r.to_dict() for r in reports]


def cmd_compact(store: CheckpointStore, args: argparse.Namespace, console: Console) -> Any:
    """``compact``: rewrite a delta snapshot as a base (its weights whole, the same bytes).

    Raises:
        CheckpointConflictError: it is not a delta snapshot, or it is published or pinned.
        CheckpointFormatError: it is missing or damaged, or its chain is broken.
    """
    checkpoint = store.compact(args.uri)
    return _say(args, console, checkpoint, f"compacted {checkpoint.path} into a base")


def cmd_download(store: CheckpointStore, args: argparse.Namespace, console: Console) -> Any:
    """``download``: copy a checkpoint into a local directory, verifying every file.

    Raises:
        FileExistsError: the output directory exists and is not empty.
        CheckpointFormatError: there is no checkpoint at the URI, or a file is missing, unsafe or damaged.
    """
    with _progress_bar(console, not args.json) as progress:
        path = store.download(args.uri, args.output_dir, progress=progress)
    return _say(args, console, None, f"downloaded {store.resolve(args.uri)} to {path}", path=path)


def cmd_archive(store: CheckpointStore, args: argparse.Namespace, console: Console) -> Any:
    """``archive``: write a verified checkpoint as a ``.tar`` or ``.tar.gz``.

    Raises:
        CheckpointFormatError: there is no checkpoint at the URI, or a file is missing, unsafe or damaged.
    """
    with _progress_bar(console, not args.json) as progress:
        path = store.archive(args.uri, args.tar_path, progress=progress)
    return _say(args, console, None, f"archived {store.resolve(args.uri)} to {path}", path=path)


def cmd_extract(store: CheckpointStore, args: argparse.Namespace, console: Console) -> Any:
    """``extract``: safely extract a checkpoint archive.

    Raises:
        ValueError: a member is not a regular file or would land outside the output directory.
        FileNotFoundError: there is no archive at the path.
    """
    path = extract_archive(args.tar_path, args.output_dir, store.storage_options)
    return _say(args, console, None, f"extracted {args.tar_path} to {path}", path=path)


def cmd_verify(store: CheckpointStore, args: argparse.Namespace, console: Console) -> Any:
    """``verify``: check every file against the manifest; a damaged checkpoint sets ``args.exit_code`` to 2.

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

    Raises:
        CheckpointFormatError: the checkpoint is missing, damaged or malformed.
        ValueError: ``--tag`` is not a valid git tag name.
        HubPublishError: there is no token, the Hub is unreachable or it refused a request.
        NotServableError: vLLM cannot serve the adapter (and ``--no-servable-check`` is not given).
    """
    from ..modeling.servable import check_servable  # imports torch and transformers: only when pushing
    from ..storage.hub import push_to_hub

    if not args.no_servable_check:
        check_servable(store.resolve(args.uri), storage_options=store.storage_options)
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

    Raises:
        CheckpointFormatError: the checkpoint is missing, damaged or malformed.
        ValueError: an empty prompt or ``--num-samples`` below 1.
    """
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


def cmd_convert(store: CheckpointStore, args: argparse.Namespace, console: Console) -> Any:
    """``convert``: a checkpoint's adapter stacked over layers (MaxText's scan layout) or as a PEFT directory.

    Raises:
        CheckpointFormatError: the source is missing, damaged or malformed.
        ValueError: the layers cannot be stacked (the message names the key).
        FileExistsError: the output directory is not empty and ``--overwrite`` is not given.
    """
    from .convert import convert_layout  # imports torch: only when converting

    done = convert_layout(
        store.resolve(args.uri),
        args.output_dir,
        args.layout,
        overwrite=args.overwrite,
        storage_options=store.storage_options,
    )
    message = f"wrote {done.layout} adapter of {done.source.get('uri')} to {done.path}"
    return _say(args, console, None, message, **dataclasses.asdict(done))


def _say(args: argparse.Namespace, console: Console, checkpoint: Checkpoint | None, message: str, **extra: Any) -> Any:
    if not args.json:
        console.print(message, highlight=False)
    return {**(checkpoint.to_dict() if checkpoint else {}), **extra, "message": message}
