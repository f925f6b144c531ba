# `make demo` and `make test` set up everything themselves (a .venv with the CPU build of torch).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch==2.13.0 resolves to a CPU build on this project's machines; elsewhere pick your own build first.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-stress lint bench clean

setup: $(STAMP)

# torch is named again with the package: pip 26 otherwise swaps the CPU build for the newest (CUDA) release.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]" "$(TORCH_SPEC)"
	touch $(STAMP)

# The main job: fine-tune, resume from the last training checkpoint, list what was written.
demo: $(STAMP)
	rm -rf checkpoints/demo lightning_logs/demo
	$(BIN)/lightning-lora-ckpt fit -c examples/demo.yaml
	$(BIN)/lightning-lora-ckpt fit -c examples/demo.yaml --trainer.max_steps 130 --ckpt_path lora://demo/weights/final
	$(BIN)/lightning-lora-ckpt list --root checkpoints demo
	$(BIN)/python examples/loss_summary.py lightning_logs/demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(BIN)/pytest -q -m "not stress"

# Real processes racing, killed (SIGKILL) and signalled (SIGTERM) many times: a separate step of .ci/run.
test-stress: $(STAMP)
	$(BIN)/pytest -q -m stress

# Every checkpoint path side by side on a Qwen3-0.6B-shaped model; rewrites docs/benchmarks.{md,json}.
bench: $(STAMP)
	$(BIN)/python benchmarks/suite.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf checkpoints lightning_logs .pytest_cache
