# The README's two commands: `make run` and `make test`. Both install what is missing.
# `make e2e`: the browser test (tests/e2e, Debian's chromium); CI runs it after `make test`.
# `make cluster-test`: only the deployment tests (nginx, Redis Sentinel); `make test` runs them too.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml | sha1sum | cut -c1-12)

.PHONY: run test e2e cluster-test lint typecheck rules pytest bench install clean

run: install
	@bash ops/bootstrap.sh
	$(BIN)/python run.py serve

test: install
	@bash ops/bootstrap.sh --all
	$(MAKE) --no-print-directory lint typecheck rules pytest

e2e: install
	@bash ops/bootstrap.sh --e2e
	$(BIN)/pytest -m e2e tests/e2e -p no:cacheprovider

cluster-test: install
	@bash ops/bootstrap.sh --all
	$(BIN)/pytest tests/test_nginx.py tests/test_sentinel.py

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
	PYTHONPATH=. $(BIN)/lint-imports --config setup.cfg

typecheck:
	$(BIN)/mypy

# Alert rules: syntax, then their unit tests (promtool from Debian's `prometheus` package).
rules:
	cd ops/prometheus && promtool check rules alerts.yml && promtool test rules alerts_test.yml
	promtool check config ops/prometheus/prometheus.yml

pytest:
	$(BIN)/pytest -m "not e2e"

bench: install
	@bash ops/bootstrap.sh --all
	$(BIN)/python bench/actors.py

clean:
	rm -rf $(VENV) build *.egg-info
