# Two entry points that work on a fresh machine: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUNTIME := $(VENV)/.installed-runtime

.PHONY: run test install install-runtime lint typecheck pytest pytest-shared bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# `make run` installs what the server needs; `make test` adds the dev extras (linters, test
# tools, moto). Either stamp is redone when pyproject.toml changes.
$(RUNTIME): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $(RUNTIME)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP) $(RUNTIME)

install-runtime: $(RUNTIME)

install: $(STAMP)

run: install-runtime
	$(BIN)/pigeon serve --host 127.0.0.1 --port 8080 --data-dir ./var

lint: install
	$(BIN)/ruff check src tests $(wildcard examples)
	$(BIN)/ruff format --check src tests $(wildcard examples)

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/pytest

# The end-to-end suite once more, with the test servers on PostgreSQL + Redis (as in a cluster).
pytest-shared: install
	PIGEON_TEST_STACK=shared $(BIN)/pytest -q tests/e2e

test: lint typecheck pytest pytest-shared

bench: install
	$(BIN)/pigeon bench all

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
