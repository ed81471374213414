# relaygen-sgl: everything a newcomer runs. `make demo`, `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
RELAYGEN := $(VENV)/bin/relaygen
STAMP := $(VENV)/.setup-done
SGLANG_VERSION := 0.5.23
DEMO_QUESTION ?= Tom has 3 apples and buys 5 more. Then he gives 2 away. How many apples does he have? Explain step by step.
DEMO_MAX_TOKENS ?= 256

.PHONY: setup system-deps models demo test test-fast test-unit test-integration lint clean

setup: $(STAMP)

# sglang goes in with --no-deps: its metadata pulls CUDA-only wheels that cannot start
# on a CPU machine; requirements/cpu-server.txt holds the rest of its runtime.
$(STAMP): requirements/cpu-server.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements/cpu-server.txt
	$(PY) -m pip install --quiet --no-deps sglang==$(SGLANG_VERSION)
	$(PY) -m pip install --quiet -e '.[dev,convert]'
	touch $(STAMP)

# Headless Chromium renders `relaygen show --html` pages in the tests (Debian package).
system-deps:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

models: setup
	$(RELAYGEN) models fetch --preset cpu-tiny

demo: models
	$(RELAYGEN) up --preset cpu-tiny
	$(RELAYGEN) run "$(DEMO_QUESTION)" --preset cpu-tiny --max-tokens $(DEMO_MAX_TOKENS) --seed 0; \
	  rc=$$?; $(RELAYGEN) down; exit $$rc

# Unit tests on both cores (pytest-xdist), then the integration tests in one process (they share
# one pair of real servers); each prints its 25 slowest steps (docs/testing.md keeps the table).
UNIT := -m "not integration" -n 2 --durations=25
INTEGRATION := -m integration --durations=25

test: models system-deps lint
	$(PY) -m pytest -q $(UNIT)
	$(PY) -m pytest -q $(INTEGRATION)

test-fast: models system-deps lint
	$(PY) -m pytest -q $(UNIT) -m "not integration and not slow"
	$(PY) -m pytest -q $(INTEGRATION) -m "integration and not slow"

test-unit: setup system-deps
	$(PY) -m pytest -q $(UNIT)

test-integration: models
	$(PY) -m pytest -q $(INTEGRATION)

lint: setup
	$(VENV)/bin/ruff check relaygen_sgl programs tests

clean:
	rm -rf $(VENV) .pytest_cache
