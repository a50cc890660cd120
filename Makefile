# The two commands a new user needs: `make up` and `make test`. Both run as root on a
# Debian/Ubuntu machine and install what is missing (scripts/env.sh).
SHELL := /bin/bash
.DEFAULT_GOAL := help

RUN_DIR ?= /run/orchestrator-dev
VENV    ?= .venv
PY      := $(VENV)/bin/python
WITH_ENV := set -a; . $(RUN_DIR)/env; set +a;

.PHONY: help up down test test-fast test-docker env images graphical-image venv web-assets lock lint fmt unit bench

help:
	@echo "make up           bring the stack up and run one real session to dockerd.ready"
	@echo "make down         stop the compose stack and the project's dockerd and Redis"
	@echo "make test         the whole suite: lint, unit, and integration on a real dockerd and Redis"
	@echo "make test-fast    the tests that need no Docker Engine and are no soak (unit and Redis-only; under 3 minutes)"
	@echo "make test-docker  the tests on the project's Docker Engine (marker docker, soaks included)"
	@echo "make unit         the unit tests only"
	@echo "make lint         ruff check, ruff format --check, mypy --strict"
	@echo "make fmt          ruff format and ruff check --fix"
	@echo "make venv         $(VENV) from the lock (requirements/test.txt), the project editable"
	@echo "make web-assets   the dashboard's xterm.js from the npm registry (pinned, checked)"
	@echo "make lock         pyproject's ranges into requirements/*.txt (uv; UPGRADE=1 for the newest)"
	@echo "make env          start the project's dockerd and Redis (scripts/env.sh)"
	@echo "make images       build the desktop, sandbox and test images"
	@echo "make bench        the benchmarks (SCENARIOS=... to pick)"

# The lock (requirements/*.txt, from `make lock`) fixes every version; the project itself comes
# on top without its dependencies, so nothing is resolved anew here.
$(VENV)/.installed: pyproject.toml requirements/test.txt
	@python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python >= 3.11 is needed"; exit 1; }
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements/test.txt
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

# The dashboard's vendored xterm.js (gitignored, package data of the wheel): the editable install
# serves it from the checkout, so every venv gets it; idempotent, a no-op when present and current.
web-assets:
	bash scripts/fetch-web-assets.sh

venv: $(VENV)/.installed web-assets

env:
	bash scripts/env.sh up

images: env
	$(WITH_ENV) bash scripts/build-images.sh --test

# The graphical desktop flavor (docs/graphical.md): about 1.1 GB more and 100 s from a warm
# minimal image; built for the suite, not for make up.
graphical-image: images
	$(WITH_ENV) bash scripts/build-images.sh --graphical

up: venv images
	bash scripts/up.sh

down:
	bash scripts/up.sh down
	bash scripts/env.sh down

# One universal resolution (every Python >= 3.11, every platform: markers are kept, e.g. redis's
# async-timeout below CPython 3.11.3, which the sandbox image has). The test lock is constrained
# to the runtime one, so both carry the same runtime versions. scripts/build-images.sh reads
# requirements/runtime.txt for the sandbox image. Versions already locked stay where pyproject
# still allows them; `make lock UPGRADE=1` takes the newest of everything.
UV_COMPILE = $(VENV)/bin/uv pip compile pyproject.toml --universal --python-version 3.11 \
	--custom-compile-command "make lock" -q $(if $(UPGRADE),--upgrade)
lock: venv
	$(UV_COMPILE) -o requirements/runtime.txt
	$(UV_COMPILE) --extra test -c requirements/runtime.txt -o requirements/test.txt

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

fmt: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

unit: venv
	$(VENV)/bin/pytest -q tests/unit

# Only a Redis server is needed (the tests start their own): install it if it is missing.
test-fast: venv
	@command -v redis-server >/dev/null || bash scripts/env.sh up --test >/dev/null
	$(VENV)/bin/pytest -q -m "not docker and not slow" tests

test-docker: venv images
	bash scripts/env.sh up --test >/dev/null
	$(WITH_ENV) ORCH_REQUIRE_DOCKER=1 $(VENV)/bin/pytest -ra -m docker tests

test: venv images graphical-image lint
	bash scripts/env.sh up --test >/dev/null
	$(WITH_ENV) ORCH_REQUIRE_DOCKER=1 $(VENV)/bin/pytest -ra --durations=15 tests

bench: venv images
	$(WITH_ENV) $(PY) -m bench $(SCENARIOS)
