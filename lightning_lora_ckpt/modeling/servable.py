"""``check_servable``: whether a serving engine (vLLM) can serve a checkpoint's adapter, before a hotload or publish.

The checks are vLLM's own (``vllm/lora/peft_helper.py``, ``lora_model.py``), run here so a refusal comes with its
reason before anything is uploaded or loaded: PEFT settings vLLM does not implement (``modules_to_save``, DoRA,
LoRA bias, aLoRA, QALoRA, ...), a rank above the server's ``--max-lora-rank``, adapters on the embeddings or the
output head of an architecture whose vLLM model has no LoRA embedding modules, and architectures vLLM serves
without LoRA. Which architectures support what comes from ``vllm_lora_support.json``, generated from vLLM by
``scripts/vllm_lora_support.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from ..storage.loading import OpenedCheckpoint, open_checkpoint
from .base import load_config
from .peft_adapter import check_servable_config

TARGETS = ("vllm",)
_SUPPORT_FILE = Path(__file__).with_name("vllm_lora_support.json")
#: The module path of a PEFT adapter key (``....q_proj.lora_A.weight`` -> ``....q_proj``).
_MODULE_OF_KEY = re.compile(r"^(?:base_model\.model\.)?(.+?)\.lora_(?:embedding_)?[AB](?:\.[^.]+)?(?:\.weight)?$")
#: PEFT settings vLLM refuses, as (setting, is it set?, vLLM's reason).
_UNSUPPORTED = (
    ("use_dora", bool, "vLLM does not support DoRA"),
    ("lora_bias", bool, "vLLM does not support LoRA bias (lora_bias)"),
    ("alora_invocation_tokens", bool, "vLLM does not support Activated LoRA (aLoRA)"),
    ("use_qalora", bool, "vLLM does not support QALoRA"),
    ("use_bdlora", bool, "vLLM does not support block-diagonal LoRA (BD-LoRA)"),
)


class NotServableError(ValueError):
    """The checkpoint cannot be served by the target engine; ``report.problems`` says why.

    Attributes:
        report: the full report.
    """

    def __init__(self, report: ServableReport) -> None:
        super().__init__(f"Checkpoint {report.uri} cannot be served by {report.target}: {'; '.join(report.problems)}")
        self.report = report


@dataclasses.dataclass(frozen=True)
class ServableReport:
    """What :func:`check_servable` found.

    Attributes:
        uri: the checkpoint's URI.
        target: the serving engine checked against (``"vllm"``).
        architecture: the base's architecture (e.g. ``Qwen3ForCausalLM``), or None if its config is unavailable.
        lora_rank: the adapter's largest rank (``r`` and ``rank_pattern``).
        modules: the module names the adapter's tensors target (the last part of each path).
        problems: why it cannot be served; empty if it can.
        notes: what could not be checked, and why.
    """

    uri: str
    target: str
    architecture: str | None
    lora_rank: int
    modules: tuple[str, ...]
    problems: tuple[str, ...]
    notes: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """Whether nothing was found that the engine cannot serve."""
        return not self.problems


def check_servable(
    uri: str | os.PathLike[str],
    target: str = "vllm",
    max_lora_rank: int | None = None,
    *,
    root: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> ServableReport:
    """Check that ``target`` can serve the checkpoint's adapter (its files are read and verified first).

    Args:
        uri: a sampler or training checkpoint (any fsspec URI, local path or ``lora://``).
        target: the serving engine; only ``"vllm"``.
        max_lora_rank: the server's ``--max-lora-rank``; None skips the rank check.
        root: where ``lora://`` URIs resolve.
        storage_options: fsspec options of the checkpoint's filesystem.

    Returns:
        The report (``ok``), with notes on what could not be checked.

    Raises:
        NotServableError: (a ``ValueError``) the engine cannot serve it; the message lists every reason.
        ValueError: ``target`` is not a supported engine.
        CheckpointFormatError: the checkpoint is missing, damaged or malformed.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    return servable_report(open_checkpoint(uri, root, storage_options), max_lora_rank, raise_if_not=True)


def servable_report(opened: OpenedCheckpoint, max_lora_rank: int | None, *, raise_if_not: bool) -> ServableReport:
    """:func:`check_servable` on a checkpoint already opened.

    Args:
        opened: the verified checkpoint.
        max_lora_rank: the server's ``--max-lora-rank``; None skips the rank check.
        raise_if_not: raise :class:`NotServableError` instead of returning a report with problems.

    Returns:
        The report.

    Raises:
        NotServableError: ``raise_if_not`` and the engine cannot serve it.
    """
    config = opened.adapter_config
    problems: list[str] = []
    notes: list[str] = []
    if opened.manifest.full_parameter:
        problems.append(
            "it is a full-parameter checkpoint (a whole model, lora_rank 0), not a LoRA adapter: serve it as a model "
            "(download it and `vllm serve` the directory)"
        )
    try:
        check_servable_config(config, opened.uri)
    except ValueError as err:
        message = str(err).removeprefix(f"Checkpoint {opened.uri} ")
        problems.append(message.removesuffix("; it is not loaded, nothing was changed"))
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}; vLLM serves LoRA adapters only")
    problems += [why for key, is_set, why in _UNSUPPORTED if is_set(config.get(key))]
    ranks = [int(config.get("r") or 0), *(int(r) for r in (config.get("rank_pattern") or {}).values())]
    rank = max(ranks)
    if max_lora_rank is not None and rank > max_lora_rank:
        problems.append(
            f"its LoRA rank {rank} is above the server's --max-lora-rank {max_lora_rank}; start vLLM with "
            f"--max-lora-rank {rank} or more"
        )
    modules = sorted({m.group(1) for k in opened.adapter if (m := _MODULE_OF_KEY.match(k))})
    architecture = _architecture_problems(opened, modules, problems, notes)
    report = ServableReport(
        opened.uri,
        "vllm",
        architecture,
        rank,
        tuple(sorted({m.rsplit(".", 1)[-1] for m in modules})),
        tuple(problems),
        tuple(notes),
    )
    if raise_if_not and not report.ok:
        raise NotServableError(report)
    return report


def _architecture_problems(
    opened: OpenedCheckpoint, modules: list[str], problems: list[str], notes: list[str]
) -> str | None:
    base = opened.manifest.base_model.name_or_path
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(load_config(base))
    except (OSError, ValueError) as err:
        notes.append(
            f"the base {base!r} is not available here ({type(err).__name__}), so its architecture was not checked"
        )
        return None
    architecture = type(model).__name__
    support = _vllm_support()
    if architecture in support["no_lora"]:
        problems.append(f"vLLM {support['vllm']} serves {architecture} without LoRA support")
    elif architecture not in support["lora"]:
        notes.append(
            f"{architecture} is not among vLLM {support['vllm']}'s architectures; vLLM may serve it through "
            "its Transformers backend"
        )
    else:
        names = {id(module): name for name, module in model.named_modules()}
        embeddings = {
            names[id(m)] for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
        }
        allowed = set(support["lora"][architecture])
        refused = sorted({m for m in modules if m in embeddings and m.rsplit(".", 1)[-1] not in allowed})
        if refused:
            problems.append(
                f"it has LoRA on {', '.join(refused)}, but vLLM {support['vllm']}'s {architecture} has "
                f"{'only ' + ', '.join(sorted(allowed)) if allowed else 'no'} LoRA embedding modules; train without "
                "embedding/lm_head targets"
            )
    return architecture


@functools.cache
def _vllm_support() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(_SUPPORT_FILE.read_text())
    return data
