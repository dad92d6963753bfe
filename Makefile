# Two commands: `make demo` (whole DAG on the bundled sample, CPU, offline) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
# pip installs without compiling every module of every package up front (half of a 100 s install
# on 2 cores, mostly torch modules no stage imports); Python compiles what a stage imports on first
# use and keeps it, so bytecode writing stays on here even where the shell turned it off
unexport PYTHONDONTWRITEBYTECODE

.PHONY: install demo test lint format params sample clean-data check-vllm

# The demo needs the project and its CPU engine only; the tests add Ray, the test tools and clients.
$(VENV)/.demo-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile -e '.[cpu]'
	touch $@

$(VENV)/.installed: $(VENV)/.demo-installed
	$(BIN)/python -m pip install --quiet --no-compile -e '.[cpu,ray,test]'
	touch $@

install: $(VENV)/.installed

# The sample needs nothing from the Hub: fail fast instead of trying to reach it.
demo: export HF_HUB_OFFLINE := 1
# one torch thread per process: on 2 busy cores two threads are several times slower, not faster
demo: export OMP_NUM_THREADS := 1
demo: $(VENV)/.demo-installed  ## run the whole DAG for all three variants on the sample
	python -m stages.compose profile=sample
	dvc repro
	@echo "Release files: data/release/<variant>/. params.yaml now holds the sample composition;"
	@echo "'make params' (or 'git checkout params.yaml') restores the production one."

test: install lint  ## ruff, then the test suite
	python -m pytest

lint: install
	ruff check .
	ruff format --check .

# Not part of `make test`: vllm is a large CUDA install. Needs no GPU; loads no model.
check-vllm:  ## check the vllm engine against the vllm that pip installs (own venv, .venv-vllm), deprecations as errors
	test -x .venv-vllm/bin/python || $(PYTHON) -m venv .venv-vllm
	.venv-vllm/bin/python -m pip install --quiet -e '.[vllm]' 'pytest>=8'
	.venv-vllm/bin/python -W error::DeprecationWarning -c "import vllm; print('check-vllm: testing vllm', vllm.__version__)"
	.venv-vllm/bin/python -m pytest tests/test_vllm_api.py -q -W error::DeprecationWarning

format: install
	ruff check --fix .
	ruff format .

# The way back to production after `make demo` (or an experiment): drops, and names, the overrides
# params.yaml records; the project and hydra are all it needs, not the test tools.
params: $(VENV)/.demo-installed  ## write the production params.yaml
	python -m stages.compose --drop-overrides

sample: install  ## rebuild the bundled sample data and tiny model (seeded)
	python scripts/make_sample.py
	python -m scripts.make_tiny_model

clean-data:  ## remove DVC outputs and checkpoints (keeps data/sample)
	find data -mindepth 1 -maxdepth 1 ! -name sample -exec rm -rf {} +
