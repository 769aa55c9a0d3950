# Two commands do everything on a fresh machine:
#   make analyze   set up .venv and run the main job on the default model (SmolLM2, offline)
#   make test      set up .venv and run the test suite
# TORCH_SPEC pins the CPU build that these machines have on disk; elsewhere override it,
# e.g. `make test TORCH_SPEC=torch` (any torch >= 2.1 works). TL_SPEC picks TransformerLens.
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
TL_SPEC    ?= transformer-lens
PROMPT     ?= The bridge out of Marin is the
PYTEST_ARGS ?=
BIN        := $(VENV)/bin

.PHONY: install analyze test lint bench gpu-check clean

$(BIN)/lens-linear: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q "$(TL_SPEC)" -e ".[test]"
	touch $@

install: $(BIN)/lens-linear

analyze: install
	$(BIN)/lens-linear analyze "$(PROMPT)"

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

bench: install
	$(BIN)/python benchmarks/jacobian.py
	cd benchmarks && ../$(BIN)/python layers.py && ../$(BIN)/python run.py
	$(BIN)/python benchmarks/patching.py
	$(BIN)/python benchmarks/jlens.py
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/faithfulness.py

# on a CUDA machine: the device tests on the GPU, then the benchmarks' ratios measured there
gpu-check: install
	LENS_LINEAR_TEST_DEVICE=cuda $(BIN)/python -m pytest -q tests/test_device.py
	$(BIN)/python benchmarks/gpu_check.py

clean:
	rm -rf .venv .venv-* *.egg-info
