# p2pchat — the verbs people type. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTO_SRC := $(wildcard proto/p2pchat/v1/*.proto)
PYTEST_ARGS ?=

.PHONY: help install proto check-proto lint format test test-unit test-integration check clean up down

help: ## Show this help
	@echo "p2pchat make targets:"
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  make %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## Create .venv with p2pchat and the dev tools (editable)

proto: $(STAMP) ## Regenerate proto/gen from proto/p2pchat/v1/*.proto
	PATH="$(CURDIR)/$(BIN):$$PATH" scripts/gen-proto.sh proto/gen

check-proto: $(STAMP) ## Fail when proto/gen is not what `make proto` makes
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	PATH="$(CURDIR)/$(BIN):$$PATH" scripts/gen-proto.sh "$$tmp" && \
	diff -r -x __pycache__ "$$tmp" proto/gen && echo "proto/gen is up to date"

lint: $(STAMP) ## ruff (lint + format check) and mypy --strict
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP) ## Apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: $(STAMP) ## Run every test (installs first if needed)
	$(BIN)/pytest $(PYTEST_ARGS)

test-unit: $(STAMP) ## Unit tests only (fast)
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

check: check-proto lint test ## Everything CI checks: generated code, lint, tests

up: $(STAMP) ## Run the system (directory on localhost:50051, data in ./data)
	$(BIN)/p2pchat-directory --data-dir ./data/directory

clean: ## Remove the venv and caches
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
