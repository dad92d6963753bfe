# Two commands: `make demo` (whole DAG on the bundled sample, CPU, offline) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
# pip installs with --no-compile and Python compiles what a stage imports on first use, so bytecode
# writing stays on here even where the shell turned it off (figures: benchmarks/README.md)
unexport PYTHONDONTWRITEBYTECODE

.PHONY: install demo test lint format params sample clean-data check-vllm

# The demo needs the project and its CPU engine only; the tests add Ray, the test tools and clients.
# Each installs its lock (requirements/, `make lock`), every file checked against the lock's hashes,
# then the project itself without dependencies. torch is locked as the CPU build (2.13.0+cpu), which
# pip takes from /opt/wheels; where that folder is missing, add PyTorch's CPU wheel index to pip's
# (PIP_EXTRA_INDEX_URL).
$(VENV)/.demo-installed: pyproject.toml requirements/demo.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile --require-hashes -r requirements/demo.lock
	$(BIN)/python -m pip install --quiet --no-compile --no-deps -e .
	touch $@

# The demo lock pins the test lock's versions, so this only adds packages; the project is installed.
$(VENV)/.installed: $(VENV)/.demo-installed requirements/test.lock
	$(BIN)/python -m pip install --quiet --no-compile --require-hashes -r requirements/test.lock
	touch $@

install: $(VENV)/.installed

.PHONY: lock check-lock
# Both locks from pyproject.toml, for CPython 3.11 on x86_64 Linux, with hashes; needs the package
# index. Pins the change leaves valid are kept; `make lock LOCK_ARGS=--upgrade` takes the newest.
# The demo lock is constrained by the test lock (and takes its --find-links for the CPU torch).
LOCK := $(BIN)/uv pip compile --quiet pyproject.toml --python-version 3.11 --python-platform \
	x86_64-unknown-linux-gnu --generate-hashes --emit-find-links $(LOCK_ARGS)
lock:  ## regenerate requirements/*.lock from pyproject.toml (needs the package index)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet 'uv==0.13.9'
	$(LOCK) --find-links /opt/wheels --extra cpu --extra ray --extra test -o requirements/test.lock
	$(LOCK) -c requirements/test.lock --extra cpu -o requirements/demo.lock

check-lock: install  ## check that the locks satisfy pyproject.toml's requirements and pin nothing stale
	python -m pytest tests/test_lock.py -q

# The sample needs nothing from the Hub: fail fast instead of trying to reach it.
demo: export HF_HUB_OFFLINE := 1
# one torch thread per process: stage processes share few cores (figures: benchmarks/README.md)
demo: export OMP_NUM_THREADS := 1
demo: $(VENV)/.demo-installed  ## run the whole DAG for all three variants on the sample
	python -m stages.compose profile=sample
	dvc repro
	python -m stages.plots_page  # .dvc/plots/page.html: `dvc plots show/diff` pages that draw offline
	@echo "Release files: data/release/<variant>/; their charts: dvc plots show --open (offline)."
	@echo "params.yaml now holds the sample composition;"
	@echo "'make params' (or 'git checkout params.yaml') restores the production one."

# the lock check first: a lock that no longer matches pyproject.toml fails in seconds, naming the
# mismatch, instead of after the whole suite (which then need not run it again)
test: install check-lock lint  ## the lock check, ruff, then the test suite
	python -m pytest --ignore=tests/test_lock.py

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
