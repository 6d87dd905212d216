# jobworker — developer entry points. Every target bootstraps the venv it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST := $(PY) -m pytest

.PHONY: venv run run-fleet stop-fleet test test-unit test-integration test-kernel stress lint coverage example concurrent bench proto proto-check clean

venv: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

## The two README commands
run: venv
	$(PY) scripts/demo.py

## A fleet on one machine: etcd (Debian's etcd-server) and three workerd hosts (docs/fleet.md)
run-fleet: venv
	$(PY) scripts/fleet_demo.py

stop-fleet: venv
	$(PY) scripts/fleet_demo.py stop

test: venv
	$(PYTEST) -q

test-unit: venv
	$(PYTEST) -q tests/unit

test-integration: venv
	$(PYTEST) -q tests/integration

## Pure cgroup v2 kernel tier, in a throw-away QEMU VM
test-kernel: venv
	scripts/kernel-vm.sh -- $(abspath $(PY)) -m pytest -q -p no:cacheprovider -m kernel tests/kernel

## Full-size load tests (marked stress; make test runs them at CI size), then the integration
## tier again under asyncio debug mode
stress: venv
	$(PYTEST) -q -m stress tests/integration
	PYTHONASYNCIODEBUG=1 $(PYTEST) -q -W error::RuntimeWarning tests/integration

lint: venv
	$(VENV)/bin/ruff check src tests examples scripts bench
	$(VENV)/bin/ruff format --check src tests examples scripts bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

coverage: venv
	$(PY) -m coverage run --source=jobworker --omit='*/api/v1/*' -m pytest -q
	$(PY) -m coverage report --skip-covered --sort=cover

example: venv
	$(PY) examples/tail.py sh -c 'for i in 1 2 3; do echo "line $$i"; done'

concurrent: venv
	$(PY) examples/concurrent.py 100 sh -c 'for i in $$(seq 1 200); do echo "tick $$i"; done'

BENCH_STAMP := $(VENV)/.bench-stamp
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) -m bench

proto: venv
	scripts/gen-proto.sh

proto-check: venv
	scripts/gen-proto.sh --check

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
