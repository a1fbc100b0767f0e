# Set-up and entry points. Every target creates (once) and reuses .venv in the repo root.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: install demo demo-long test lint bench gpu-check

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install -q -e ".[test]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

## The main job end to end on the bundled sample data, tiny preset, CPU.
demo: $(STAMP)
	$(PY) scripts/demo.py

## The same with more shapes images and training steps.
demo-long: $(STAMP)
	$(PY) scripts/demo.py --long

## Install and run the whole test suite (what CI runs).
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -n 2 --dist worksteal --durations=15

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: $(STAMP)
	$(PY) benchmarks/moe_layer.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/pretrain.py
	$(PY) benchmarks/align.py
	$(PY) benchmarks/instruct.py
	$(PY) benchmarks/generate.py

## Every GPU path (training, QLoRA, generation, benchmarks) offline on a CUDA machine; `--device cpu` is the dry run.
gpu-check: $(STAMP)
	$(PY) scripts/gpu_check.py
