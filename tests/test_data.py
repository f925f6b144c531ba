"""JSONL records into weighted token batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_lora_ckpt import JSONLDataModule, load_tokenizer
from lightning_lora_ckpt.lightning.data import Collator, read_jsonl, tokenize_record

TOKENIZER = load_tokenizer("tiny-qwen3")
DEMO_TRAIN = Path(__file__).resolve().parents[1] / "examples" / "data" / "demo_train.jsonl"


def weighted_text(example: dict) -> str:
    return TOKENIZER.decode([t for t, w in zip(example["target_tokens"], example["weights"], strict=True) if w])


def test_chat_records_train_only_on_assistant_turns() -> None:
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2 plus 2?"},
            {"role": "assistant", "content": "2 plus 2 is 4."},
            {"role": "user", "content": "And 3 plus 3?"},
            {"role": "assistant", "content": "3 plus 3 is 6."},
        ]
    }
    example = tokenize_record(record, TOKENIZER, 256)
    assert weighted_text(example) == "2 plus 2 is 4.<|im_end|>\n3 plus 3 is 6.<|im_end|>\n"
    full = TOKENIZER.apply_chat_template(record["messages"], tokenize=False)
    assert TOKENIZER.decode([example["input_ids"][0], *example["target_tokens"]]) == full
    assert len(example["input_ids"]) == len(example["target_tokens"]) == len(example["weights"])


def test_text_records_train_on_every_token_and_truncate() -> None:
    example = tokenize_record({"text": "The capital of France is Paris."}, TOKENIZER, 256)
    assert all(w == 1.0 for w in example["weights"])
    assert TOKENIZER.decode(example["target_tokens"]).endswith("Paris.<|im_end|>")
    assert len(tokenize_record({"text": "word " * 100}, TOKENIZER, 8)["input_ids"]) == 8


def test_collator_pads_with_zero_weight() -> None:
    examples = [tokenize_record({"text": t}, TOKENIZER, 64) for t in ("a b c d e f", "a")]
    batch = Collator(TOKENIZER.pad_token_id)(examples)
    n0, n1 = len(examples[0]["input_ids"]), len(examples[1]["input_ids"])
    assert batch["input_ids"].shape == (2, n0) and batch["weights"][1, n1:].sum() == 0
    assert batch["attention_mask"][1].sum() == n1


def test_bad_records_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: expected a 'text' or a 'messages' field"):
        read_jsonl(str(path), TOKENIZER, 64)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="holds no records"):
        read_jsonl(str(tmp_path / "empty.jsonl"), TOKENIZER, 64)


def test_training_order_depends_only_on_seed_and_epoch() -> None:
    data = JSONLDataModule(str(DEMO_TRAIN), tokenizer="tiny-qwen3", batch_size=4)
    data.setup("fit")

    def first_batch(epoch: int) -> list[int]:
        loader = data.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return next(iter(loader))["input_ids"][0].tolist()

    assert first_batch(0) == first_batch(0) != first_batch(1)
