"""Publishing sampler weights to the Hugging Face Hub: ``push_to_hub`` and the ``HubPublisher`` callback."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.errors import HfHubHTTPError, HTTPError
from lightning.pytorch import Callback, LightningModule, Trainer

from . import storage, uris
from .callbacks import checkpoint_io
from .manifest import ADAPTER_CONFIG, ADAPTER_WEIGHTS, Manifest, iso_time
from .records import Checkpoint
from .store import CheckpointStore

log = logging.getLogger(__name__)

Strategy = Literal["final", "every_save", "best"]
CARD_TAGS = ["lora", "peft", "lightning-lora-ckpt"]
# What git refuses in a ref name (git check-ref-format), for one path component.
_BAD_REF = re.compile(r"^[.-]|\.\.|[\x00-\x20\x7f~^:?*\[\\/]|@\{|\.lock$|\.$|^@$")


class HubPublishError(RuntimeError):
    """A checkpoint could not be published: no token, the Hub unreachable, or a request refused."""


def push_to_hub(
    uri: str,
    repo_id: str,
    *,
    private: bool = True,
    token: str | None = None,
    revision_tag: str | None = None,
    metrics: dict[str, float] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Upload a checkpoint's PEFT adapter and a model card to ``repo_id`` in one commit, tag it, return its URL.

    ``uri`` is a committed sampler or training checkpoint (any URI or ``lora://``); its files are verified
    against the manifest first. The repo is created if needed. The tag is ``revision_tag`` or
    ``<run_id>-<name>``; an existing tag of that name moves to the new commit. ``token`` defaults to
    huggingface_hub's own (``HF_TOKEN``, ``hf auth login``), the endpoint to ``HF_ENDPOINT``.
    """
    uri = uris.resolve(uri)
    manifest = storage.read_manifest(uri, storage_options)
    files = storage.read_files(uri, manifest, [ADAPTER_WEIGHTS, ADAPTER_CONFIG], storage_options)
    tag = revision_tag or _default_tag(manifest)
    if _BAD_REF.search(tag):
        raise ValueError(f"{tag!r} is not a valid git tag name; pass another revision_tag")
    files["README.md"] = model_card(manifest, repo_id, tag, metrics or {}).encode()
    token = token or get_token()
    if not token:
        raise HubPublishError(f"Cannot push to {repo_id}: no Hugging Face token; pass token= or set HF_TOKEN")
    api = HfApi(token=token)  # built per call: the endpoint and token are read now, not at import
    kind = uris.TYPE_DIRS[manifest.checkpoint_type]
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data) for name, data in files.items()]
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
    """The ``README.md`` of a pushed checkpoint: PEFT metadata and where the adapter comes from."""
    data = ModelCardData(base_model=manifest.base_model.name_or_path, library_name="peft", tags=CARD_TAGS)
    lines = [
        f"# {repo_id}",
        "",
        f"LoRA adapter for `{manifest.base_model.name_or_path}`, saved by lightning-lora-ckpt.",
        "",
        f"- run: `{manifest.run_id}`",
        f"- checkpoint: `{manifest.name}` ({manifest.checkpoint_type}, step {manifest.step}, epoch {manifest.epoch})",
        f"- LoRA rank: {manifest.lora_rank}",
        f"- saved: {iso_time(manifest.created_at)}",
        *(f"- {name}: {value:.6g}" for name, value in sorted(metrics.items())),
        "",
        "```python",
        "from peft import AutoPeftModelForCausalLM",
        "",
        f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}", revision="{tag}")',
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


class HubPublisher(Callback):
    """Publishes the run's sampler checkpoints (saved through ``LoRACheckpointIO``) to the Hub during fit.

    - ``"final"``: the newest sampler checkpoint when fit ends (``PeriodicCheckpoint``'s ``final``);
    - ``"every_save"``: each new sampler checkpoint, looked for after every optimizer step and when
      training ends;
    - ``"best"``: a new sampler checkpoint only if the logged ``monitor`` then beats (per ``mode``) the
      value at the last publish.

    Only committed checkpoints are listed, so nothing half-written is published. Rank 0 publishes from one
    background thread, one checkpoint at a time: a checkpoint superseded while a publish runs is skipped,
    and the newest one is always considered when fit ends, after the pending writes have committed. Each
    checkpoint is tried once. Failures are logged as warnings, or raised at the end of fit with
    ``fail_on_error``; local checkpoints are only ever read.
    """

    def __init__(
        self,
        repo_id: str,
        strategy: Strategy = "final",
        private: bool = True,
        token: str | None = None,
        monitor: str | None = None,
        fail_on_error: bool = False,
        mode: Literal["min", "max"] = "min",
    ) -> None:
        if strategy not in ("final", "every_save", "best"):
            raise ValueError(f"strategy must be 'final', 'every_save' or 'best', got {strategy!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if strategy == "best" and not monitor:
            raise ValueError("strategy='best' needs monitor=<name of a logged metric>")
        self.repo_id, self.strategy, self.private, self.token = repo_id, strategy, private, token
        self.monitor, self.fail_on_error, self.mode = monitor, fail_on_error, mode
        self.published: frozenset[str] = frozenset()
        self.best: float | None = None
        self._seen: str | None = None
        self._errors: list[Exception] = []
        self._executor: ThreadPoolExecutor | None = None
        self._running: Future[None] | None = None
        self._last_step = -1

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        checkpoint_io(trainer)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.strategy == "final" or not trainer.is_global_zero or trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        if self._running is None or self._running.done():
            self._submit(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The last periodic save, before a ``final`` saved at this same step can supersede it.
        if self.strategy != "final" and trainer.is_global_zero:
            self._publish_after_writes(trainer)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self._publish_after_writes(trainer)
        self.wait()
        errors, self._errors = self._errors, []
        if errors and self.fail_on_error:
            raise HubPublishError(f"HubPublisher could not publish to {self.repo_id}: {errors[0]}") from errors[0]

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._shutdown()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._shutdown()

    def state_dict(self) -> dict[str, Any]:
        return {"published": sorted(self.published), "best": self.best}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.published = frozenset(state_dict["published"])
        self.best = state_dict.get("best")

    def wait(self) -> None:
        """Block until the running publish, if any, has finished."""
        if self._running is not None:
            self._running.result()
            self._running = None

    # -- publishing ---------------------------------------------------------------------------------
    def _publish_after_writes(self, trainer: Trainer) -> None:
        self.wait()
        checkpoint_io(trainer).wait()
        self._submit(trainer)

    def _submit(self, trainer: Trainer) -> None:
        io = checkpoint_io(trainer)
        if io.run_id is None:  # nothing saved yet
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        store = CheckpointStore(io.root, io.storage_options)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-hub-publisher")
        self._running = self._executor.submit(self._publish_newest, store, io.run_id, metrics)

    def _publish_newest(self, store: CheckpointStore, run_id: str, metrics: dict[str, float]) -> None:
        try:
            newest = store.last_checkpoint(run_id, "sampler")
            if newest is None or _key(newest) in self.published or _key(newest) == self._seen:
                return
            self._seen = _key(newest)
            metric = metrics.get(self.monitor) if self.monitor else None
            if self.strategy == "best" and not self._improves(metric):
                return
            url = push_to_hub(
                newest.path,
                self.repo_id,
                private=self.private,
                token=self.token,
                metrics=metrics,
                storage_options=store.storage_options,
            )
            # A new set, not an in-place add: state_dict() may be iterating the old one on the training thread.
            self.published = self.published | {_key(newest)}
            self.best = metric if metric is not None else self.best
            log.info("HubPublisher: published %s to %s", newest.path, url)
        except Exception as err:
            log.warning("HubPublisher could not publish to %s: %s", self.repo_id, err)
            self._errors.append(err)

    def _improves(self, metric: float | None) -> bool:
        if metric is None:
            return False
        return self.best is None or (metric < self.best if self.mode == "min" else metric > self.best)

    def _shutdown(self) -> None:
        self.wait()
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None


def _key(checkpoint: Checkpoint) -> str:
    """Identity of one save: a name saved again (``final`` of a later fit) is a new checkpoint."""
    return f"{checkpoint.run_id}/{checkpoint.checkpoint_id}@{iso_time(checkpoint.time)}"
