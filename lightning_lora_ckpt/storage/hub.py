"""Publishing a checkpoint's PEFT adapter to the Hugging Face Hub (``push_to_hub``), with ``huggingface_hub``.

The Hub is one more place adapters are stored; the ``HubPublisher`` callback (lightning layer) calls
:func:`push_to_hub` during training.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.errors import HfHubHTTPError, HTTPError

from ..format.layout import TYPE_DIRS
from ..format.manifest import STATE_FILES, Manifest
from ..format.strict_json import iso_time
from .loading import open_checkpoint

log = logging.getLogger(__name__)

CARD_TAGS = ["lora", "peft", "lightning-lora-ckpt"]
# What git refuses in a ref name (git check-ref-format), for one path component.
_BAD_REF = re.compile(r"^[.-]|\.\.|[\x00-\x20\x7f~^:?*\[\\/]|@\{|\.lock$|\.$|^@$")


class HubPublishError(RuntimeError):
    """A checkpoint could not be published: no token, the Hub unreachable, or a request refused.

    A ``RuntimeError``; the Hub's own error, if any, is its ``__cause__``.
    """


def push_to_hub(
    uri: str,
    repo_id: str,
    *,
    private: bool = True,
    token: str | None = None,
    revision_tag: str | None = None,
    metrics: dict[str, float] | None = None,
    root: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Upload a checkpoint's PEFT adapter and a model card to ``repo_id`` in one commit, tag it, return its URL.

    ``uri`` is a committed sampler or training checkpoint (any URI or ``lora://``); its files are verified
    against the manifest first. The repo is created if needed. The tag is ``revision_tag`` or
    ``<run_id>-<name>``; an existing tag of that name moves to the new commit. ``token`` defaults to
    huggingface_hub's own (``HF_TOKEN``, ``hf auth login``), the endpoint to ``HF_ENDPOINT``.

    Args:
        uri: the checkpoint (any fsspec URI, local path or ``lora://``).
        repo_id: the Hub model repo, ``<owner>/<name>``.
        private: create the repo private (an existing repo keeps its visibility).
        token: a Hugging Face token with write access, or None for huggingface_hub's.
        revision_tag: the git tag of the commit, or None for ``<run_id>-<name>``.
        metrics: values listed in the model card, by name.
        root: where ``lora://`` URIs resolve (``$LORA_CKPT_ROOT`` if None).
        storage_options: fsspec options of the checkpoint's filesystem.

    Returns:
        The URL of the commit.

    Raises:
        CheckpointFormatError: the checkpoint is missing, damaged or malformed.
        ValueError: ``revision_tag`` (or the default tag) is not a valid git tag name, or ``uri`` is a
            malformed ``lora://`` URI.
        HubPublishError: there is no token, the Hub is unreachable or it refused a request.
    """
    opened = open_checkpoint(uri, root, storage_options)
    manifest, files = opened.manifest, {n: data for n, data in opened.files.items() if n not in STATE_FILES}
    tag = revision_tag or _default_tag(manifest)
    if _BAD_REF.search(tag):
        raise ValueError(f"{tag!r} is not a valid git tag name; pass another revision_tag")
    files["README.md"] = model_card(manifest, repo_id, tag, metrics or {}).encode()
    token = token or get_token()
    if not token:
        raise HubPublishError(f"Cannot push to {repo_id}: no Hugging Face token; pass token= or set HF_TOKEN")
    api = HfApi(token=token)  # built per call: the endpoint and token are read now, not at import
    kind = TYPE_DIRS[manifest.checkpoint_type]
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=bytes(data)) for name, data in files.items()]
    with _hub_errors(api, repo_id):
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.create_commit(
            repo_id,
            operations,
            commit_message=f"Add {manifest.run_id}/{kind}/{manifest.name} (step {manifest.step})",
        )
        _move_tag(api, repo_id, tag, commit.oid)
    return commit.commit_url


def model_card(manifest: Manifest, repo_id: str, tag: str, metrics: dict[str, float]) -> str:
    """The ``README.md`` of a pushed checkpoint: PEFT (or, for a full-parameter checkpoint, transformers) metadata and
    where the weights come from.

    Args:
        manifest: the checkpoint's manifest.
        repo_id: the Hub repo it is pushed to.
        tag: the git tag of the push, used in the loading example.
        metrics: values to list, by name.

    Returns:
        The model card: YAML metadata (base model, ``library_name: peft`` or ``transformers``, tags), then Markdown.
    """
    full = manifest.full_parameter  # a whole model directory: transformers loads it, no PEFT
    library = "transformers" if full else "peft"
    data = ModelCardData(base_model=manifest.base_model.name_or_path, library_name=library, tags=CARD_TAGS)
    what = "Full-parameter fine-tune of" if full else "LoRA adapter for"
    loader = "transformers import AutoModelForCausalLM" if full else "peft import AutoPeftModelForCausalLM"
    lines = [
        f"# {repo_id}",
        "",
        f"{what} `{manifest.base_model.name_or_path}`, saved by lightning-lora-ckpt.",
        "",
        f"- run: `{manifest.run_id}`",
        f"- checkpoint: `{manifest.name}` ({manifest.checkpoint_type}, step {manifest.step}, epoch {manifest.epoch})",
        f"- LoRA rank: {manifest.lora_rank}",
        f"- saved: {iso_time(manifest.created_at)}",
        *(f"- {name}: {value:.6g}" for name, value in sorted(metrics.items())),
        "",
        "```python",
        f"from {loader}",
        "",
        f'model = {loader.rsplit(" ", 1)[-1]}.from_pretrained("{repo_id}", revision="{tag}")',
        "```",
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))


def _default_tag(manifest: Manifest) -> str:
    return re.sub(r"\.\.+", ".", f"{manifest.run_id}-{manifest.name}").removesuffix(".lock").rstrip(".")


def _move_tag(api: HfApi, repo_id: str, tag: str, revision: str) -> None:
    try:
        api.create_tag(repo_id, tag=tag, revision=revision)
    except HfHubHTTPError as err:
        if err.response is None or err.response.status_code != 409:
            raise
        # The name was saved again (a ``final`` after a resume): the tag follows the newest save.
        api.delete_tag(repo_id, tag=tag)
        api.create_tag(repo_id, tag=tag, revision=revision)


@contextlib.contextmanager
def _hub_errors(api: HfApi, repo_id: str) -> Iterator[None]:
    try:
        yield
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        cause = "the token was refused or lacks write access" if status in (401, 403) else f"HTTP {status}"
        raise HubPublishError(f"Cannot push to {repo_id} at {api.endpoint}: {cause} ({err})") from err
    except (HTTPError, OSError) as err:
        raise HubPublishError(f"Cannot push to {repo_id}: the Hub at {api.endpoint} is unreachable ({err})") from err
