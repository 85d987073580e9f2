# p2pchat — the verbs people type. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTO_SRC := $(wildcard proto/p2pchat/v1/*.proto)
PYTEST_ARGS ?=
# `make test` measures line coverage of services/ (see [tool.coverage.*] in pyproject.toml) and
# fails under 90 %; `make test COV_ARGS=` runs without it.
COV_ARGS ?= --cov --cov-report=term-missing:skip-covered --cov-fail-under=90
BENCH_STAMP := $(VENV)/.bench-installed
BENCH_ARGS ?=
# Containers: `docker compose` (v2) when present, else Debian's `docker-compose` (v1.29).
COMPOSE ?= $(shell if docker compose version >/dev/null 2>&1; then echo 'docker compose'; else echo docker-compose; fi)
OFFLINE ?=
# SCALE=1: the `scale` profile of docker-compose.yml (PostgreSQL, two directory replicas behind
# one name, the agents dave and erin) for `images`, `up` and `logs`; `down` removes it always.
SCALE ?=
UP_TIMEOUT ?= 180

.PHONY: help install proto check-proto lint format test test-unit test-integration check clean up down \
	images logs bench

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

test: $(STAMP) ## Run every test with line coverage of services/, fail under 90 % (installs first if needed)
	$(BIN)/pytest $(COV_ARGS) $(PYTEST_ARGS)

test-unit: $(STAMP) ## Unit tests only (fast)
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

test-integration: $(STAMP) ## Process-level integration tests only (real servers on loopback)
	$(BIN)/pytest tests/integration $(PYTEST_ARGS)

check: check-proto lint test ## Everything CI checks: generated code, lint, tests

images: $(if $(filter 1,$(OFFLINE)),$(STAMP)) ## Build the images; OFFLINE=1: local Debian base + host wheels, no registry; SCALE=1: + PostgreSQL
	OFFLINE=$(or $(OFFLINE),auto) FORCE=$(FORCE) SCALE=$(SCALE) scripts/images.sh

up: images ## Start directory + alice, bob, carol (builds images if needed), wait until healthy; SCALE=1: the replicas
	COMPOSE="$(COMPOSE)" SCALE=$(SCALE) scripts/compose-up.sh $(UP_TIMEOUT)

down: ## Stop and remove the containers and networks, `scale` profile too (data volumes kept; PURGE=1 removes them)
	$(COMPOSE) --profile scale down --remove-orphans $(if $(filter 1,$(PURGE)),--volumes)

logs: ## Follow the containers' logs (SERVICE=alice for one; SCALE=1 for the `scale` profile's)
	$(COMPOSE) $(if $(filter 1,$(SCALE)),--profile scale) logs --follow --tail=100 $(SERVICE)

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP) ## Benchmarks (real processes, about 10-15 min): table + bench/results/; QUICK=1 smoke run
	$(BIN)/python -m bench $(if $(filter 1,$(QUICK)),--quick) $(BENCH_ARGS)

clean: ## Remove the venv, caches and coverage data
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .coverage .coverage.*
