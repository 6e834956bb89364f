# Two entry points that work on a fresh machine: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUNTIME := $(VENV)/.installed-runtime

.PHONY: run test install install-runtime lint typecheck pytest pytest-shared pytest-dynamodb bench clean

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
	$(BIN)/pytest -m "not dynamodb_pass"

# The end-to-end suite once more, with the test servers on PostgreSQL + Redis (as in a cluster).
pytest-shared: install
	PIGEON_TEST_STACK=shared $(BIN)/pytest -q tests/e2e

# The end-to-end files whose behaviour depends most on the store, with the test servers on
# DynamoDB (moto, in a process of its own) + Redis. The whole suite passes there too
# (`PIGEON_TEST_STACK=dynamodb .venv/bin/pytest tests/e2e`, ~9 min: over CI's budget); the
# other files are the same on every stack (CLI, TLS, logs, schemas, benches) or test what sits
# above the store (connections, authorization, presence, keys, media: the contract suite
# covers the store's part of them on DynamoDB).
# With them, the fault tests under load on DynamoDB (kill -9, throttling). Not part of `make
# test`: with it the suite would pass CI's 15 minutes on the 2-core machine (~5 min more).
DYNAMODB_E2E := messaging receipts retention push registration e2e_messages dynamodb_smoke
pytest-dynamodb: install
	$(BIN)/pytest -q -m dynamodb_pass tests/chaos
	PIGEON_TEST_STACK=dynamodb $(BIN)/pytest -q $(DYNAMODB_E2E:%=tests/e2e/test_%.py)

test: lint typecheck pytest pytest-shared

bench: install
	$(BIN)/pigeon bench all

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
