"""Modeling layer: base models and PEFT adapters (Hugging Face + PEFT, no Lightning): see docs/architecture.md."""
