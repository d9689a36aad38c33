# The two quick-start commands are `make demo` and `make test`; everything else serves them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

AUDIT := .audit
PIP_AUDIT_VERSION := 2.10.1

.PHONY: demo test bench lint typecheck format system clean audit bytecode

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e ".[demo,test]"
	$(MAKE) --no-print-directory bytecode
	touch $(STAMP)

## bytecode: compile the product's modules as a wheel install does (an editable one does not, and
# with PYTHONDONTWRITEBYTECODE set every command would compile them again: ~40 ms a start)
bytecode:
	$(BIN)/python -m compileall -q -j 0 mailpipe worker actors metrics web cli broker_config.py middleware.py

## demo: the whole system on embedded defaults (built-in IMAP server, SQLite, web on :8000);
# (the demo package runs from this checkout: it is not installed)
demo: $(STAMP)
	$(BIN)/python -m demo

## test: install system packages and services the tests need, then lint, type-check and run the whole suite
test: $(STAMP) system
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest

## bench: the benchmarks (not part of `make test`): sync, round trips, orchestration, metrics overhead, crashes
bench: $(STAMP) system bytecode
	$(BIN)/python -m bench.startup
	$(BIN)/python -m bench.sync
	$(BIN)/python -m bench.resync
	$(BIN)/python -m bench.roundtrips
	$(BIN)/python -m bench.pipeline
	$(BIN)/python -m bench.metrics
	$(BIN)/python -m bench.login
	$(BIN)/python -m bench.logs
	$(BIN)/python -m bench.push
	$(BIN)/python -m bench.names
	$(BIN)/python -m bench.watcher
	$(BIN)/python -m bench.scale --accounts 1000 --users 100
	bash bench/peers.sh

system:
	bash scripts/ensure-system.sh

## audit: known vulnerabilities of the pinned requirements (needs the PyPI/OSV advisory service;
# not part of `make test`, which must pass offline). pip-audit lives in a venv of its own.
audit:
	$(PYTHON) -m venv $(AUDIT)
	$(AUDIT)/bin/pip install --quiet --disable-pip-version-check pip-audit==$(PIP_AUDIT_VERSION)
	$(AUDIT)/bin/pip-audit --strict --requirement requirements.lock --no-deps --disable-pip --progress-spinner off

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

## typecheck: mypy over the product code as [tool.mypy] in pyproject.toml lists it (strict on the core)
typecheck: $(STAMP)
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) $(AUDIT) data build *.egg-info
