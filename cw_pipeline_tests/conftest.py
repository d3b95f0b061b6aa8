"""Shared pytest fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cw_pipeline.runtime.instance import keep_terminable
from cw_pipeline_tests import real_data
from cw_pipeline_tests.file_server import FileServer, serving

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _own_dagster_home(tmp_path_factory, monkeypatch) -> None:
    """Each test's commands use a Dagster home of their own (a test may set another): never
    the developer's ``$DAGSTER_HOME`` nor the repository's ``.dagster/``, which the CLI takes
    when the variable is unset, and never another test's runs and refresh cursor."""
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path_factory.mktemp("dagster_home")))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real test data (UKBench images, Oxford/Paris ground truth): see
    :mod:`cw_pipeline_tests.real_data` for where it is looked for. Skips the test when it is
    nowhere, fails when ``$CW_SHARED_DATA`` is wrong or ``$CW_REQUIRE_TEST_DATA`` is set."""
    located = real_data.locate()
    if located.error:
        pytest.fail(located.error, pytrace=False)
    if located.path is None:
        if located.required:
            pytest.fail(real_data.required_reason(), pytrace=False)
        pytest.skip(real_data.skip_reason())
    return located.path


E2E = Path(__file__).resolve().parent / "e2e"
#: The test files sharing the materialized end-to-end demo (the session fixture ``demo_env``):
#: under ``-n`` they are one scheduling unit, so the demo is built once per run, not once per
#: worker. Every other file is a unit of its own (its module fixtures are built once).
SHARED_DEMO_FILES = (
    "cw_pipeline_tests/e2e/test_demo_ui.py",
    "cw_pipeline_tests/e2e/test_search_page.py",
    "cw_pipeline_tests/e2e/test_ui_browser.py",
)


def scheduling_unit(nodeid: str) -> str:
    """The unit of work a test is sent to a pytest-xdist worker in: its file, or the shared
    end-to-end demo."""
    path = nodeid.split("::", 1)[0]
    return "e2e-demo" if path in SHARED_DEMO_FILES else path


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``-n`` with the default distribution: units of :func:`scheduling_unit`, handed out in
    collection order (the end-to-end ones first: see below). pytest-xdist's own
    ``--dist loadgroup`` cannot be used: it marks groups in a node id attribute that pytest 9
    no longer reads."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Units(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scheduling_unit(nodeid)

    return Units(config, log)


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist with a worker per core, each worker (and the commands it starts)
    computes on one thread: two workers with two OpenMP threads each on two cores spin-wait
    on each other. A test or command that asks for threads explicitly still gets them.

    A suite started in the background (SIGINT ignored) keeps SIGTERM deliverable, as the
    CLI does (:func:`cw_pipeline.runtime.instance.keep_terminable`): otherwise every Dagster run a
    test starts in a thread waits 30 s per step for compute-log processes that ignore it."""
    keep_terminable()
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers and int(workers) >= (os.cpu_count() or 1):
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ.setdefault(var, "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Markers: ``real_data`` for the tests reading the real data, ``e2e`` for the end-to-end
    tests of real processes (``e2e/``: browser, daemon, Celery, PostgreSQL, S3; ``make
    test-fast`` leaves them out). The end-to-end tests go first, so that under ``-n`` the
    longest units do not start last."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "shared_data" in names:
            item.add_marker(pytest.mark.real_data)
        if E2E in Path(item.path).parents:
            item.add_marker(pytest.mark.e2e)
        if "demo_env" in names and scheduling_unit(item.nodeid) != "e2e-demo":
            raise pytest.UsageError(
                f"{item.nodeid} uses the shared end-to-end demo: add its file to "
                "SHARED_DEMO_FILES in cw_pipeline_tests/conftest.py"
            )
    items.sort(key=lambda item: item.get_closest_marker("e2e") is None)  # stable: e2e first


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """One line for the tests skipped for want of real data, one per other skip reason."""
    reasons: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reason = reason.removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    real = sum(n for r, n in reasons.items() if r.startswith(real_data.SKIP_TAG))
    if real:
        terminalreporter.write_line(
            f"{real} real-data test(s) skipped: {real_data.SKIP_TAG} ({real_data.WHERE}); "
            "run `make test-data` to enable them",
            yellow=True,
        )
    for reason, n in sorted(reasons.items()):
        if not reason.startswith(real_data.SKIP_TAG):
            terminalreporter.write_line(f"{n} test(s) skipped: {reason}")


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FileServer]:
    """A local HTTP file server for download tests (:mod:`cw_pipeline_tests.file_server`),
    with no proxy, mirror variable or retry wait from the environment."""
    from cw_pipeline import download
    from cw_pipeline.download import transfer

    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv(download.MIRROR_ENV, raising=False)
    monkeypatch.setattr(transfer, "DEFAULT_RETRY_WAIT", 0.0)
    with serving() as state:
        yield state


@pytest.fixture(scope="session")
def cli_project(tmp_path_factory):
    """A small project indexed through Dagster, for the ``search`` and ``datasets`` tests
    (see :mod:`cw_pipeline_tests.cli_project`)."""
    from cw_pipeline_tests.cli_project import build_cli_project

    return build_cli_project(tmp_path_factory.mktemp("cli"))
