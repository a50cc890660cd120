# The two commands a new user needs: `make up` and `make test`. Both run as root on a
# Debian/Ubuntu machine and install what is missing (scripts/env.sh).
SHELL := /bin/bash
.DEFAULT_GOAL := help

RUN_DIR ?= /run/orchestrator-dev
VENV    ?= .venv
PY      := $(VENV)/bin/python
WITH_ENV := set -a; . $(RUN_DIR)/env; set +a;

.PHONY: help up down test env images venv lint unit bench

help:
	@echo "make up      bring the stack up and run one real session to dockerd.ready"
	@echo "make down    stop the compose stack and the project's dockerd and Redis"
	@echo "make test    the whole suite: lint, unit, and integration on a real dockerd and Redis"

$(VENV)/.installed: pyproject.toml
	@python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python >= 3.11 is needed"; exit 1; }
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

env:
	bash scripts/env.sh up

images: env
	$(WITH_ENV) bash scripts/build-images.sh --test

up: venv images
	bash scripts/up.sh

down:
	bash scripts/up.sh down
	bash scripts/env.sh down

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

unit: venv
	$(VENV)/bin/pytest -q tests/unit

test: venv images lint
	bash scripts/env.sh up --test >/dev/null
	$(WITH_ENV) ORCH_REQUIRE_DOCKER=1 $(VENV)/bin/pytest -ra tests

bench: venv images
	$(WITH_ENV) $(PY) -m bench $(SCENARIOS)
