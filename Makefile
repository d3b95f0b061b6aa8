# cw_pipeline — common tasks. `make demo` and `make test` are the two commands a fresh machine needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export DAGSTER_HOME ?= $(CURDIR)/.dagster

.PHONY: install test lint format demo demo-headless ui bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $@

test: install
	$(BIN)/ruff check cw_pipeline cw_pipeline_tests benchmarks
	$(BIN)/ruff format --check cw_pipeline cw_pipeline_tests benchmarks
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check cw_pipeline cw_pipeline_tests benchmarks

format: install
	$(BIN)/ruff format cw_pipeline cw_pipeline_tests benchmarks

demo: install $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/cw-pipeline demo

demo-headless: install $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/cw-pipeline demo --no-ui

ui: install $(DAGSTER_HOME)/dagster.yaml
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

bench: install
	for f in benchmarks/*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

clean:
	rm -rf data/warehouse data/reports data/demo .dagster
