"""Regenerate lightning_lora_ckpt/modeling/vllm_lora_support.json from the installed vLLM (run in the vLLM venv).

    .venv-vllm/bin/python scripts/vllm_lora_support.py

For each text-generation architecture vLLM registers: whether it serves LoRA adapters and which embedding
modules (``embed_tokens``, ``lm_head``) its adapters may target. ``check_servable`` reads the file, so the check
needs no vLLM install.
"""

from __future__ import annotations

import json
from pathlib import Path

import vllm
from vllm.model_executor.models.registry import _TEXT_GENERATION_MODELS, ModelRegistry

OUT = Path(__file__).parent.parent / "lightning_lora_ckpt" / "modeling" / "vllm_lora_support.json"


def main() -> None:
    lora: dict[str, list[str]] = {}
    no_lora: list[str] = []
    for arch in sorted(_TEXT_GENERATION_MODELS):
        try:
            cls = ModelRegistry._try_load_model_cls(arch)
        except Exception:  # an architecture whose code needs what this install lacks (e.g. torchvision)
            cls = None
        if cls is None:
            continue
        if getattr(cls, "supports_lora", False):
            lora[arch] = sorted(getattr(cls, "embedding_modules", None) or {})
        else:
            no_lora.append(arch)
    data = {"vllm": vllm.__version__, "lora": lora, "no_lora": no_lora}
    OUT.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"{OUT}: vLLM {vllm.__version__}, {len(lora)} architectures with LoRA, {len(no_lora)} without")


if __name__ == "__main__":
    main()
