"""JSONL data: ``{"text": ...}`` and chat ``{"messages": [...]}`` records into weighted token batches.

Each example becomes Tinker-style ``input_ids`` / ``target_tokens`` (shifted by one) / ``weights``:
text records are trained on every token; chat records only on the assistant turns (their content and
end-of-turn token, not the role header), found by rendering the chat template one message at a time.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, cast

import fsspec
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, DistributedSampler
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from typing_extensions import override

from ..modeling.base import load_tokenizer

if TYPE_CHECKING:
    from lightning.fabric.utilities.data import AttributeDict

Example = dict[str, list[int] | list[float]]


def tokenize_record(record: dict[str, Any], tokenizer: PreTrainedTokenizerBase, max_length: int) -> Example:
    """Turn one JSONL record into ``input_ids``, ``target_tokens`` and ``weights`` of equal length."""
    if "messages" in record:
        tokens, weights = _render_chat(record["messages"], tokenizer)
    elif "text" in record:
        tokens = [*_encode(tokenizer, record["text"]), tokenizer.eos_token_id]
        if tokenizer.bos_token_id is not None:
            tokens.insert(0, tokenizer.bos_token_id)
        weights = [1.0] * len(tokens)
    else:
        raise ValueError(f"expected a 'text' or a 'messages' field, got keys {sorted(record)}")
    tokens, weights = tokens[: max_length + 1], weights[: max_length + 1]
    if len(tokens) < 2:
        raise ValueError("the record has fewer than two tokens")
    return {"input_ids": tokens[:-1], "target_tokens": tokens[1:], "weights": weights[1:]}


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _render_chat(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[float]]:
    tokens: list[int] = []
    weights: list[float] = []
    rendered = ""

    def extend(text: str, weight: float) -> None:
        ids = _encode(tokenizer, text)
        tokens.extend(ids)
        weights.extend([weight] * len(ids))

    for i, message in enumerate(messages):
        if message.get("role") == "assistant":
            header = cast(str, tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
            extend(_suffix(header, rendered), 0.0)
            rendered = header
        full = cast(str, tokenizer.apply_chat_template(messages[: i + 1], tokenize=False))  # tokenize=False: a str
        extend(_suffix(full, rendered), 1.0 if message.get("role") == "assistant" else 0.0)
        rendered = full
    return tokens, weights


def _suffix(text: str, prefix: str) -> str:
    if not text.startswith(prefix):
        raise ValueError(
            "the tokenizer's chat template does not render a conversation as a prefix of its continuation; "
            "use 'text' records for this tokenizer"
        )
    return text[len(prefix) :]


class Collator:
    """Right-pads a list of examples into a batch; padding has weight 0."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        length = max(len(e["input_ids"]) for e in examples)

        def pad(key: str, value: float, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor([list(e[key]) + [value] * (length - len(e[key])) for e in examples], dtype=dtype)

        return {
            "input_ids": pad("input_ids", self.pad_token_id, torch.long),
            "target_tokens": pad("target_tokens", self.pad_token_id, torch.long),
            "weights": pad("weights", 0.0, torch.float32),
            "attention_mask": torch.tensor(
                [[1] * len(e["input_ids"]) + [0] * (length - len(e["input_ids"])) for e in examples]
            ),
        }


def read_jsonl(path: str, tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[Example]:
    """Tokenize every record of a local or fsspec JSONL file; errors name the file and line."""
    examples = []
    with fsspec.open(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                examples.append(tokenize_record(json.loads(line), tokenizer, max_length))
            except (ValueError, TypeError, KeyError) as err:
                raise ValueError(f"{path}:{lineno}: {err}") from err
    if not examples:
        raise ValueError(f"{path} holds no records")
    return examples


def _loader_classes(stateful: bool) -> tuple[type[DataLoader], type[DistributedSampler]]:
    if not stateful:
        return DataLoader, DistributedSampler
    try:
        from torchdata.stateful_dataloader import StatefulDataLoader
        from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
    except ImportError as err:
        raise ImportError("stateful=True needs torchdata: pip install torchdata") from err
    return StatefulDataLoader, StatefulDistributedSampler


class JSONLDataModule(LightningDataModule):
    """Training (and optional validation) data from JSONL files, tokenized with the model's tokenizer.

    Args:
        train_file, val_file: local paths or fsspec URIs of JSONL files.
        tokenizer: tokenizer name or path; by default the LightningModule's ``get_tokenizer()``.
        max_length: examples are truncated to this many input tokens.
        shuffle, seed: the training order is a function of (seed, epoch), so it is the same after a resume.
        stateful: use torchdata's ``StatefulDataLoader``, whose position travels in the checkpoint, so a
            resume continues mid-epoch at the next batch; a plain DataLoader replays the epoch from its start.
    """

    # Lightning types hparams as AttributeDict | MutableMapping; save_hyperparameters always makes an AttributeDict.
    if TYPE_CHECKING:

        @property
        def hparams(self) -> AttributeDict: ...

    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        tokenizer: str | None = None,
        max_length: int = 256,
        batch_size: int = 8,
        num_workers: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        stateful: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train_examples: list[Example] = []
        self.val_examples: list[Example] = []
        self.collator: Collator | None = None

    def _tokenizer(self) -> PreTrainedTokenizerBase:
        if self.hparams.tokenizer:
            return load_tokenizer(self.hparams.tokenizer)
        if self.trainer is None or not hasattr(self.trainer.lightning_module, "get_tokenizer"):
            raise ValueError("JSONLDataModule needs tokenizer=... unless its LightningModule has get_tokenizer()")
        return cast(Any, self.trainer.lightning_module).get_tokenizer()  # checked by hasattr above

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.collator is not None:
            return
        tokenizer = self._tokenizer()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.collator = Collator(pad)
        self.train_examples = read_jsonl(self.hparams.train_file, tokenizer, self.hparams.max_length)
        if self.hparams.val_file:
            self.val_examples = read_jsonl(self.hparams.val_file, tokenizer, self.hparams.max_length)

    def _loader(self, examples: list[Example], shuffle: bool) -> DataLoader:
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        loader_class, sampler_class = _loader_classes(self.hparams.stateful)
        return loader_class(
            examples,  # type: ignore[arg-type]
            batch_size=self.hparams.batch_size,
            sampler=sampler_class(examples, num_replicas=world, rank=rank, shuffle=shuffle, seed=self.hparams.seed),  # type: ignore[arg-type]
            collate_fn=self.collator,
            num_workers=self.hparams.num_workers,
            # A generator of its own keeps iterator creation from drawing on the global RNG (dropout's), so
            # a resumed run draws the same random numbers as an uninterrupted one.
            generator=torch.Generator().manual_seed(self.hparams.seed),
        )

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_examples, self.hparams.shuffle)

    @override
    def val_dataloader(self) -> DataLoader | list[Any]:
        return self._loader(self.val_examples, False) if self.val_examples else []
