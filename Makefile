# raftkv — common tasks. `make test` works on a fresh machine with only Python:
# it creates .venv and installs the project with its dev extra first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SEEDS  ?= 1000
PYTEST_ARGS ?=

.PHONY: help venv test lint typecheck unit sim run cluster clean-venv

help:
	@echo "make run        start a 3-node cluster (docker if available, else local processes)"
	@echo "make test       lint, type-check and run the test suite"
	@echo "make sim SEEDS=N   run N simulator seeds (RAFTKV_SIM_SEED=s replays one)"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .

typecheck: $(STAMP)
	$(PY) -m mypy --strict raftkv storage snapshots

unit: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test: lint typecheck
	RAFTKV_SIM_SEEDS=$(SEEDS) $(PY) -m pytest -q $(PYTEST_ARGS)

run: cluster

cluster: $(STAMP)
	$(PY) -m raftkv cluster --nodes 3

sim: $(STAMP)
	RAFTKV_SIM_SEEDS=$(SEEDS) $(PY) -m pytest -q -m sim tests/sim $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
