"""The search page in a real browser: headless Debian Chromium driven by Playwright, over
``cw-pipeline serve`` on the materialized demo (fixtures in conftest.py, browser helpers in
test_ui_browser.py).

A user picks a ground-truth query, drags a new box on it, searches, sees a positive first,
opens a result's CAM view, uploads an image file and gets results, then uploads a broken file
and reads the error. The two screenshots of the README (results, CAM view) go to
``$CW_ARTIFACTS`` (``make screenshots``: ``docs/img/``); a failed step also saves one there.
"""

from __future__ import annotations

import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from playwright.sync_api import Browser, Page

from cw_pipeline.compute.queries import load_groundtruth
from cw_pipeline.config import load_config
from cw_pipeline_tests.e2e.conftest import BIN, REPO
from cw_pipeline_tests.e2e.processes import free_port, stop_group
from cw_pipeline_tests.e2e.test_ui_browser import browser, new_page, screenshot, step

__all__ = ["browser"]  # the module-scoped Chromium fixture, shared with the UI test

DATASET = "demo-a"


@pytest.fixture(scope="module")
def search_server(demo_result: dict, demo_env: dict) -> Iterator[str]:
    """``cw-pipeline serve`` on 127.0.0.1 over the demo; yields its base URL."""
    yield from _serve(demo_env["env"], demo_env["root"] / "serve.log")


def _serve(env: dict, log: Path) -> Iterator[str]:
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "cw-pipeline"), "serve", "--port", str(port)],
            env=env,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/datasets", timeout=10):
                    break
            except OSError as exc:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"cw-pipeline serve not answering ({exc}); log:\n" + log.read_text()
                    ) from None
                time.sleep(0.3)
        yield url
    finally:
        stop_group(proc, grace=10)


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    pg = new_page(browser, {"width": 1500, "height": 950})
    try:
        yield pg
    finally:
        pg.context.close()


def drag(page: Page, start: tuple[float, float], end: tuple[float, float]) -> None:
    """Press the mouse at ``start`` on the query image (fractions of its size), move to
    ``end`` in steps, release."""
    img = page.locator("#query-img").bounding_box()
    assert img is not None

    def at(f: tuple[float, float]) -> tuple[float, float]:
        return img["x"] + f[0] * img["width"], img["y"] + f[1] * img["height"]

    page.mouse.move(*at(start))
    page.mouse.down()
    page.mouse.move(*at(end), steps=8)
    page.mouse.up()


def test_search_page_end_to_end(
    page: Page, search_server: str, demo_env: dict, record_property, tmp_path: Path
) -> None:
    config = load_config(demo_env["config"])
    ds = config.dataset(DATASET)
    ids = sorted(p.stem for p in ds.images.glob("*.jpg"))
    gt = load_groundtruth(ds, ids)
    query = gt.queries[0]

    with step(page, "open the page, pick a ground-truth query", "search-page", record_property):
        page.goto(search_server)
        page.locator("#target").select_option(f"dataset:{DATASET}")
        assert "images indexed" in page.locator("#freshness").inner_text()
        item = page.locator(".image-list li").first
        item.wait_for()
        assert f"★ {query.name}" in item.inner_text()  # ground-truth queries come first
        item.click()
        page.wait_for_function(
            "() => { const i = document.getElementById('query-img');"
            " return i.complete && i.naturalWidth > 0; }"
        )
        page.locator("#box").wait_for()  # the ground truth's box is drawn
        gt_box = page.locator("#box-text").inner_text()

    with step(page, "drag a box and search", "search-page", record_property):
        drag(page, (0.2, 0.05), (0.95, 0.8))
        box = page.locator("#box-text").inner_text()
        assert box.startswith("box ") and box != gt_box, (gt_box, box)
        page.locator("#search").click()
        page.locator(".tile").first.wait_for()
        page.locator("#ap").wait_for()
        first = page.locator(".tile").first
        assert first.get_attribute("data-label") == "positive"
        assert first.get_attribute("data-id") in query.positives  # the ground truth agrees
        assert "ranking" in page.locator("#timings").inner_text()
        page.wait_for_function(
            "() => [...document.querySelectorAll('.tile img')].every(i => i.complete"
            " && i.naturalWidth > 0)"
        )
        screenshot(page, "search-page-results", record_property)

    with step(page, "open a result's CAM view", "search-page-cam", record_property):
        page.locator(".tile").nth(1).click()
        page.wait_for_function("() => document.getElementById('detail-img').naturalWidth > 0")
        info = page.locator("#detail-info").inner_text()
        assert "CAM of the query's top classes" in info and "re-ranking box" in info
        href = page.locator("#dagster-link").get_attribute("href")
        assert href == f"http://127.0.0.1:3000/assets/{DATASET}/descriptors?view=lineage"
        screenshot(page, "search-page-cam", record_property)
        page.locator("#detail-close").click()

    with step(page, "upload an image file", "search-page-upload", record_property):
        photo = tmp_path / "my photo.jpg"
        photo.write_bytes((ds.images / f"{sorted(query.positives)[-1]}.jpg").read_bytes())
        page.locator("#upload").set_input_files(str(photo))
        page.wait_for_function(
            "() => document.getElementById('query-title').textContent.includes('my photo.jpg')"
        )
        page.locator("#search").click()
        page.wait_for_function(
            "() => document.querySelector('#summary')?.textContent.includes('of 56 images')"
            " && !document.querySelector('#ap')"
        )
        tiles = page.locator(".tile")
        assert tiles.count() == 20 and tiles.first.get_attribute("data-id") in query.positives

    with step(page, "upload a broken file", "search-page-error", record_property):
        broken = tmp_path / "broken.jpg"
        broken.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
        page.locator("#upload").set_input_files(str(broken))
        page.locator("#search").click()
        page.locator("#error").wait_for(state="visible")
        message = page.locator("#error").inner_text()
        assert "cannot read the uploaded file 'broken.jpg'" in message, message
        assert page.locator(".tile").count() == 0


@pytest.fixture(scope="module")
def server_with_broken_datasets(demo_result: dict, demo_env: dict) -> Iterator[str]:
    """``cw-pipeline serve`` over the demo plus a dataset whose folder is gone and an entry
    the configuration refuses."""
    data = yaml.safe_load(Path(demo_env["config"]).read_text(encoding="utf-8"))
    data["datasets"]["gone"] = {"layout": "folder", "images": str(demo_env["root"] / "gone")}
    data["datasets"]["typo"] = {"layout": "oxfrod", "images": "nowhere"}
    config = demo_env["root"] / "with_broken.yaml"
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    env = {**demo_env["env"], "CW_PIPELINE_CONFIG": str(config)}
    yield from _serve(env, demo_env["root"] / "serve-broken.log")


def test_the_picker_shows_a_broken_dataset_and_the_others_work(
    page: Page, server_with_broken_datasets: str, record_property
) -> None:
    with step(page, "a broken dataset in the picker", "search-page-broken", record_property):
        page.goto(server_with_broken_datasets)
        options = page.locator("#target option").all_inner_texts()
        assert "gone — error: cannot be searched" in options, options
        assert "typo — error: cannot be searched" in options, options
        page.locator("#target").select_option("dataset:gone")
        text = page.locator("#freshness").inner_text()
        assert text.startswith("cannot be searched: image folder not found"), text
        assert page.locator(".image-list li").count() == 0
        page.locator("#target").select_option("dataset:typo")
        assert "unknown layout 'oxfrod'" in page.locator("#freshness").inner_text()
    with step(page, "another dataset still works", "search-page-broken", record_property):
        page.locator("#target").select_option(f"dataset:{DATASET}")
        assert "images indexed" in page.locator("#freshness").inner_text()
        page.locator(".image-list li").first.wait_for()
        assert not page.locator("#error").is_visible()
