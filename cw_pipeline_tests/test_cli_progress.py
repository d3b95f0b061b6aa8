"""Progress bars of the command line (:mod:`cw_pipeline.cli.progress`), and the listener hook that
feeds them from the assets' progress reports. The ``index`` bar is tested in
``test_cli_datasets.py``."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from cw_pipeline.cli import main
from cw_pipeline.cli.progress import ImageBar, bars_enabled
from cw_pipeline.compute.features import progress_listener, progress_logger
from cw_pipeline_tests.cli_project import CliProject


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_only_on_a_terminal_and_not_quiet() -> None:
    assert bars_enabled(stream=_Terminal())
    assert not bars_enabled(quiet=True, stream=_Terminal())
    assert not bars_enabled(stream=io.StringIO())
    closed = io.StringIO()
    closed.close()  # isatty() raises ValueError
    assert not bars_enabled(stream=closed)


def test_one_bar_sums_the_jobs_it_is_told_about() -> None:
    stream = _Terminal()
    with ImageBar("demo features", stream=stream) as bar:
        bar.listener("demo/b000", 1, 2)
        bar.listener("demo/b000", 2, 2)
        bar.listener("demo/b001", 1, 3)
        assert (bar._bar.n, bar._bar.total) == (3, 5)
    text = stream.getvalue()
    assert "demo features" in text and "3/5" in text and "img/s" in text
    assert "demo/b001" in text  # the job in progress


def test_a_disabled_bar_writes_nothing() -> None:
    stream = _Terminal()
    with ImageBar("x", enabled=False, stream=stream) as bar:
        bar(1, 2)
        bar.listener("s", 2, 2)
    assert stream.getvalue() == ""


def test_listeners_see_every_report_of_every_progress_logger(caplog) -> None:
    seen: list[tuple[str, int, int]] = []
    log = logging.getLogger("cw_pipeline.test")
    report = progress_logger(log, "ds/shard", every_images=10)
    with caplog.at_level(logging.INFO, logger="cw_pipeline.test"):
        with progress_listener(lambda *a: seen.append(a)):
            for n in range(1, 4):
                report(n, 3)
        report(3, 3)  # after the context: logged, not heard
    assert seen == [("ds/shard", 1, 3), ("ds/shard", 2, 3), ("ds/shard", 3, 3)]
    assert len([r for r in caplog.records if "ds/shard: 3/3 images" in r.getMessage()]) == 2


@pytest.mark.parametrize("quiet", [False, True])
def test_evaluate_draws_a_feature_bar_on_a_terminal(
    capsys, monkeypatch, cli_project: CliProject, quiet: bool
) -> None:
    images = cli_project.config.dataset("ukb").images
    argv = ["evaluate", "--layout", "ukbench", "--images", str(images), "--method", "raw"]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main([*argv, "--json", "--threads", "1", *(["--quiet"] if quiet else [])]) == 0
    out, err = capsys.readouterr()
    assert '"images": 16' in out
    if quiet:
        assert err == ""
    else:
        assert "features" in err and "16/16" in err and "img/s" in err
