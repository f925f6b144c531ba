"""``python -m lightning_lora_ckpt``: the ``lightning-lora-ckpt`` command."""

import sys

from .tools.cli import main

sys.exit(main())
