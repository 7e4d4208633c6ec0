# importwaves — one Makefile for a fresh machine.
#   make demo   the main import on the embedded default (PostgreSQL + Redis started for you)
#   make test   lint, types and every test tier, with the services the tests need
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

# Extra prerequisites of `make test`, appended by mk/*.mk (e.g. the Kubernetes test binaries).
TEST_PREREQS :=
-include mk/*.mk

.PHONY: help venv demo test lint typecheck unit integration e2e clean

help:
	@echo "make demo       run the reference import locally (embedded PostgreSQL, local workers)"
	@echo "make test       lint + mypy + all tests (starts PostgreSQL, Redis, Kubernetes itself)"
	@echo "make unit|integration|e2e   one test tier"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

venv: $(STAMP)

demo: venv
	$(BIN)/importwaves demo $(DEMO_ARGS)

lint: venv
	$(BIN)/ruff check operator tests model bench
	$(BIN)/ruff format --check operator tests model bench
	@! grep -rnE --exclude-dir='.venv*' --exclude-dir=.git --exclude-dir=__pycache__ \
		'^(<<<<<<<|>>>>>>>) |^=======$$' operator tests model bench charts crds examples hack mk \
		README.md Makefile Dockerfile pyproject.toml \
		|| { echo "lint: merge-conflict markers left in the files above" >&2; exit 1; }

typecheck: venv
	$(BIN)/mypy
	$(BIN)/mypy --strict model/check.py

unit: venv
	$(BIN)/pytest tests/unit -q

integration: venv
	$(BIN)/pytest tests/integration -q

e2e: venv $(TEST_PREREQS)
	$(BIN)/pytest tests/e2e -q

test: venv lint typecheck $(TEST_PREREQS)
	$(BIN)/pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .run .demo
