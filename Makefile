# The README's two commands: `make run` and `make test`. Both install what is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml | sha1sum | cut -c1-12)

.PHONY: run test lint typecheck pytest bench install clean

run: install
	@bash ops/bootstrap.sh
	$(BIN)/python run.py serve

test: install
	@bash ops/bootstrap.sh --all
	$(MAKE) --no-print-directory lint typecheck pytest

install: $(STAMP)

$(STAMP):
	@bash ops/bootstrap.sh --python
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

lint:
	$(BIN)/ruff check --config ops/ruff.toml .
	$(BIN)/ruff format --check --config ops/ruff.toml .

typecheck:
	$(BIN)/mypy

pytest:
	$(BIN)/pytest

bench: install
	@bash ops/bootstrap.sh --all
	$(BIN)/python bench/actors.py

clean:
	rm -rf $(VENV) build *.egg-info
