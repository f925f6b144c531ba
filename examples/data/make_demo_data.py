"""Regenerate the demo dataset and the built-in tokenizer, deterministically.

    python examples/data/make_demo_data.py

Writes ``demo_train.jsonl`` / ``demo_val.jsonl`` next to this file (chat records, a fifth plain text)
and trains the byte-level BPE tokenizer shipped in ``lightning_lora_ckpt/assets/tokenizer``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

HERE = Path(__file__).parent
TOKENIZER_DIR = HERE.parents[1] / "lightning_lora_ckpt" / "assets" / "tokenizer"
VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "New Delhi",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Canada": "Ottawa",
    "Mexico": "Mexico City",
    "Brazil": "Brasilia",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Austria": "Vienna",
    "Ireland": "Dublin",
    "Hungary": "Budapest",
    "Turkey": "Ankara",
    "Russia": "Moscow",
    "Australia": "Canberra",
    "Argentina": "Buenos Aires",
    "Cuba": "Havana",
    "Iran": "Tehran",
    "Iraq": "Baghdad",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "Nigeria": "Abuja",
    "Ghana": "Accra",
    "Morocco": "Rabat",
    "Denmark": "Copenhagen",
    "Belgium": "Brussels",
    "Netherlands": "Amsterdam",
    "Switzerland": "Bern",
    "Colombia": "Bogota",
}
OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "up": "down",
    "light": "dark",
    "happy": "sad",
    "old": "young",
    "early": "late",
    "full": "empty",
    "open": "closed",
    "hard": "soft",
    "high": "low",
    "rich": "poor",
    "strong": "weak",
    "wet": "dry",
    "loud": "quiet",
}
COLOURS = {
    "grass": "green",
    "the sky": "blue",
    "snow": "white",
    "coal": "black",
    "a banana": "yellow",
    "a tomato": "red",
    "an orange": "orange",
    "a plum": "purple",
    "chocolate": "brown",
    "milk": "white",
}
SYSTEM = ["You are a helpful assistant.", "Answer in one short sentence.", "You answer simple questions."]


def qa(rng: random.Random) -> tuple[str, str, str]:
    """One (question, answer, plain sentence) triple from a random template."""
    kind = rng.choice(["capital", "capital", "sum", "opposite", "colour"])
    if kind == "capital":
        country = rng.choice(sorted(CAPITALS))
        q = rng.choice(["What is the capital of {c}?", "Name the capital of {c}.", "Which city is the capital of {c}?"])
        fact = f"The capital of {country} is {CAPITALS[country]}."
        return q.format(c=country), fact, fact
    if kind == "sum":
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        q = rng.choice(["What is {a} plus {b}?", "Add {a} and {b}.", "How much is {a} plus {b}?"])
        fact = f"{a} plus {b} is {a + b}."
        return q.format(a=a, b=b), fact, fact
    if kind == "opposite":
        word = rng.choice(sorted(OPPOSITES))
        q = rng.choice(["What is the opposite of {w}?", "Give the opposite of {w}."])
        fact = f"The opposite of {word} is {OPPOSITES[word]}."
        return q.format(w=word), fact, fact
    thing = rng.choice(sorted(COLOURS))
    q = rng.choice(["What colour is {t}?", "Which colour does {t} have?"])
    fact = f"The colour of {thing} is {COLOURS[thing]}."
    return q.format(t=thing), fact, fact


def records(rng: random.Random, n: int) -> Iterator[dict[str, object]]:
    for _ in range(n):
        if rng.random() < 0.2:
            yield {"text": " ".join(qa(rng)[2] for _ in range(rng.randint(2, 4)))}
            continue
        messages: list[dict[str, str]] = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": rng.choice(SYSTEM)})
        for _ in range(2 if rng.random() < 0.15 else 1):
            question, answer, _ = qa(rng)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        yield {"messages": messages}


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def texts(rows: list[dict[str, object]]) -> Iterator[str]:
    for row in rows:
        if "text" in row:
            yield str(row["text"])
        else:
            yield from (m["content"] for m in row["messages"])  # type: ignore[union-attr]


def build_tokenizer(corpus: list[str], out_dir: Path) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (every byte is a token, so any text round-trips) and save it for AutoTokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        model_max_length=2048,
        chat_template=CHAT_TEMPLATE,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast


def main() -> None:
    rng = random.Random(0)
    train, val = list(records(rng, 600)), list(records(rng, 60))
    write_jsonl(HERE / "demo_train.jsonl", train)
    write_jsonl(HERE / "demo_val.jsonl", val)
    tokenizer = build_tokenizer(list(texts(train)), TOKENIZER_DIR)
    print(f"{len(train)} train / {len(val)} val records; tokenizer of {len(tokenizer)} tokens in {TOKENIZER_DIR}")


if __name__ == "__main__":
    main()
