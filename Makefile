# `make demo` and `make test` are the only two commands a newcomer needs: both build .venv when it is
# missing or older than pyproject.toml, then do their work.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: help install demo test lint typecheck unit integration bench bench-alibi up down status clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' Makefile | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml
	@$(PYTHON) scripts/check_python.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing conveyor[all,dev] into $(VENV) (first time: a few minutes; torch is the CPU build)"
	$(BIN)/pip install --disable-pip-version-check -q -e '.[all,dev]'
	@touch $(STAMP)

install: $(STAMP)  ## create or refresh .venv

demo: $(STAMP)  ## start the embedded stack and run the whole loop on scikit-learn's digits
	$(BIN)/conveyor demo

test: $(STAMP) lint typecheck  ## lint, type-check and run every test against real servers
	$(BIN)/pytest

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)  ## mypy
	$(BIN)/mypy

unit: $(STAMP)  ## only the tests that need no server
	$(BIN)/pytest -m "unit or not (integration or e2e)" tests/unit tests/contract

bench: $(STAMP)  ## print the benchmark figures (one JSON line each)
	$(BIN)/python bench/up.py
	$(BIN)/python bench/bus.py
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/preprocess.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/serve.py
	$(BIN)/python bench/transport.py
	$(BIN)/python bench/monitor.py

# alibi-detect (heavy: transformers, opencv, numba) lives in a venv of its own, used only as the MMD reference.
.venv-alibi/bin/python:
	$(PYTHON) -m venv .venv-alibi
	.venv-alibi/bin/pip install --disable-pip-version-check -q alibi-detect==0.13.0 torch==2.13.0 'numpy<2'

bench-alibi: $(STAMP) .venv-alibi/bin/python  ## bench/monitor.py with alibi-detect's MMDDrift as the MMD reference
	$(BIN)/python bench/monitor.py --alibi-python .venv-alibi/bin/python

up: $(STAMP)  ## start the embedded stack
	$(BIN)/conveyor up
down: $(STAMP)  ## stop the embedded stack
	$(BIN)/conveyor down
status: $(STAMP)  ## show the embedded stack's health
	$(BIN)/conveyor status

clean:  ## remove .venv and caches (keeps .conveyor/ state)
	rm -rf $(VENV) .venv-alibi .pytest_cache .mypy_cache .ruff_cache *.egg-info
