# cw_pipeline — common tasks. `make demo` and `make test` are the two commands a fresh machine needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The Dagster UI has no authentication: it binds to loopback unless UI_HOST says otherwise
# (`make ui UI_HOST=0.0.0.0` exposes it to the network; prefer an SSH tunnel, see README).
UI_HOST ?= 127.0.0.1
UI_PORT ?= 3000
# The search page (`cw-pipeline serve`), on loopback too unless SERVE_HOST says otherwise.
SERVE_HOST ?= 127.0.0.1
SERVE_PORT ?= 3001
export DAGSTER_HOME ?= $(CURDIR)/.dagster
# The instance settings (run limits, the cnn pool, run monitoring), copied into $DAGSTER_HOME.
# Not at the top level: `dg dev` / `dagster dev` warn about a dagster.yaml in the folder they
# run in that is not $DAGSTER_HOME's.
INSTANCE_YAML := deploy/dagster.yaml

.PHONY: install test test-fast test-data test-deps lint format demo demo-headless ui serve figures screenshots bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@echo "installing the project into $(VENV)/ (PyTorch, Dagster: a few minutes, once)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

$(DAGSTER_HOME)/dagster.yaml: $(INSTANCE_YAML)
	mkdir -p $(DAGSTER_HOME)
	cp $(INSTANCE_YAML) $@

# System packages the tests use (Chromium, redis-server, PostgreSQL), with apt-get when missing;
# silent when they are there.
test-deps:
	@.ci/test-deps

# The whole suite on every core (pytest-xdist; TEST_WORKERS=1 runs it in one process). Tests
# that read the real data (UKBench, the Oxford/Paris ground truth) find it in $CW_SHARED_DATA,
# ../shared/data or data/test-data/ (`make test-data`), and are skipped, counted in one line,
# where it is in none of them (a failure under CI: .ci/run sets CW_REQUIRE_TEST_DATA).
TEST_WORKERS ?= auto
test: install test-deps
	$(BIN)/ruff check cw_pipeline cw_pipeline_tests benchmarks
	$(BIN)/ruff format --check cw_pipeline cw_pipeline_tests benchmarks
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

# The inner loop: everything but the end-to-end tests of real processes (browser, daemon,
# Celery, PostgreSQL, S3: the `e2e` marker); docs/development.md has its time.
test-fast: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "not e2e"

# The real test data for a clone without ../shared/data, from its public sources into
# data/test-data/ (resumable, checksummed; cw_pipeline/download/test_data.py).
test-data: install
	$(BIN)/cw-pipeline download test-data

lint: install
	$(BIN)/ruff check cw_pipeline cw_pipeline_tests benchmarks

format: install
	$(BIN)/ruff format cw_pipeline cw_pipeline_tests benchmarks

demo: install $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/cw-pipeline demo --host $(UI_HOST) --port $(UI_PORT)

demo-headless: install $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/cw-pipeline demo --no-ui

# `dg dev` (the code location from [tool.dg] in pyproject.toml, the same one workspace.yaml
# names, so `dagster dev -w workspace.yaml` shares its state).
ui: install $(DAGSTER_HOME)/dagster.yaml
	VIRTUAL_ENV=$(abspath $(VENV)) PATH=$(abspath $(BIN)):$$PATH $(BIN)/dg dev -h $(UI_HOST) -p $(UI_PORT)

# The search page over the materialized index (after `make demo` or `cw-pipeline index`).
serve: install
	$(BIN)/cw-pipeline serve --host $(SERVE_HOST) --port $(SERVE_PORT) \
		--dagster-url http://$(UI_HOST):$(UI_PORT)

# Redraw data/reports/<evaluation>/ (sheets, CAM overlays, PR curves, AP bars) from the
# materialized rankings; EVAL=name for one evaluation (default: every one).
figures: install
	$(BIN)/cw-pipeline report-figures $(EVAL)

# Redraw the README's screenshots (docs/img/ui-*.png, search-page-*.png): the browser tests
# over a fresh demo, headless Debian Chromium (`apt-get install chromium`; `make test-deps`
# installs it).
screenshots: install test-deps
	CW_ARTIFACTS=docs/img $(BIN)/python -m pytest -q cw_pipeline_tests/e2e/test_ui_browser.py \
		cw_pipeline_tests/e2e/test_search_page.py

bench: install
	for f in benchmarks/*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

clean:
	rm -rf data/warehouse data/reports data/demo .dagster
