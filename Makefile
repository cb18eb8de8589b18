# dew-engine: `make demo` and `make test` are the two commands a newcomer needs.
# Everything else (setup, up, down) is what those two do on the way.

PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
DEW     := $(BIN)/dew
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=
# Two test processes (each with its own Redis, SoftHSM token and API server; a test
# file stays in one process, with its module fixtures and order); `make test
# PYTEST_JOBS=0` runs them in this one process.
PYTEST_JOBS ?= 2
# The store contract and end-to-end tests, run a second time with every store in
# PostgreSQL (a private cluster per test process, tests/pg_store.py).
PG_TESTS ?= tests/engine/test_store.py tests/engine/test_iam.py tests/schedules/test_firing.py \
	tests/engine/test_engine.py tests/engine/test_durability.py tests/engine/test_cancel_running.py \
	tests/kms/test_kms_lifecycle.py tests/kms/test_kms_usage.py tests/kms/test_kms_tags_grants.py \
	tests/kms/test_kms_rotation.py tests/kms/test_kms_trust.py tests/kms/test_kms_service.py \
	tests/csms/test_store.py tests/csms/test_rotation.py tests/csms/test_service.py \
	tests/kps/test_store.py tests/kps/test_accounts.py \
	tests/kms/test_kms_api_sdk.py tests/csms/test_csms_api_sdk.py tests/kps/test_kps_api_sdk.py

.PHONY: help setup system-packages venv bytecode init up down demo test lint bench clean

help:
	@echo "make demo    set up, start a private Redis and a worker, run the scenario, stop"
	@echo "make test    set up, then run the test suite (on SQLite; then the store and"
	@echo "             end-to-end tests again on PostgreSQL)"
	@echo "make up      start the private Redis, one worker and the HTTPS API (dew api) in the"
	@echo "             background (var/run/*.pid; the API's CA is var/tls/ca.pem)"
	@echo "make down    stop exactly what 'make up' started"
	@echo "make lint    ruff + mypy + the import contracts (lint-imports)"
	@echo "make bench   run the benchmarks in bench/"

setup: system-packages venv

# Debian/Ubuntu packages the engine and its tests use. As root they are installed
# with apt-get; otherwise the exact command is printed and setup stops.
system-packages:
	@sh .ci/system-packages

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)
	@$(MAKE) --no-print-directory bytecode

# Where PYTHONDONTWRITEBYTECODE is set, Python never caches the project's
# modules and every `dew` compiles them again (~0.2 s); compile them once here.
# A stale cache is only ignored (Python checks the source's mtime), never wrong.
bytecode:
	@$(BIN)/python -m compileall -q engine handlers schedules

init: setup
	$(DEW) init

up: setup
	$(DEW) stack up

down:
	@if [ -x $(DEW) ]; then $(DEW) stack down; else echo "nothing to stop"; fi

demo: setup
	$(BIN)/python -m engine.demo

test: setup bytecode
	@sh .ci/services
	$(BIN)/pytest -n $(PYTEST_JOBS) --dist loadfile $(PYTEST_ARGS)
	DEW_TEST_STORE=postgresql $(BIN)/pytest -n $(PYTEST_JOBS) --dist loadfile $(PYTEST_ARGS) $(PG_TESTS)

lint: venv
	$(BIN)/ruff check engine handlers schedules tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

bench: setup bytecode
	$(BIN)/python bench/cli_startup.py
	$(BIN)/python bench/queue_throughput.py
	$(BIN)/python bench/api_kms.py

clean: down
	rm -rf var
