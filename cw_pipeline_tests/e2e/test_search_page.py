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
from playwright.sync_api import Error as PlaywrightError

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
        page.locator("#error").wait_for(state="visible")  # at once, before any search
        message = page.locator("#error").inner_text()
        assert "cannot read the uploaded file 'broken.jpg'" in message, message
        assert page.locator("#search").is_disabled()
        assert page.locator("#canvas").is_hidden()
        assert "my photo.jpg" not in page.locator("#query-title").inner_text()
        assert page.locator(".tile").count() == 0  # no results under another query


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
        # The listing the page asks for on load (the first working target) is held back
        # until the broken target is picked: its late answer must not fill the list.
        held: list = []
        page.route("**/api/images?*", lambda route: held.append(route))
        page.goto(server_with_broken_datasets)
        while not held:
            page.wait_for_timeout(20)
        options = page.locator("#target option").all_inner_texts()
        assert "gone — error: cannot be searched" in options, options
        assert "typo — error: cannot be searched" in options, options
        page.locator("#target").select_option("dataset:gone")
        for route in held:
            route.continue_()
        page.unroute("**/api/images?*")
        page.wait_for_load_state("networkidle")
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


PHONE = {"width": 390, "height": 844}


def touch_drag(page: Page, start: tuple[float, float], end: tuple[float, float]) -> None:
    """A finger on the query image at ``start``, moved to ``end`` (fractions of its size) in
    steps, lifted: touch events through the browser's input pipeline (pointerType touch)."""
    box = page.locator("#query-img").bounding_box()
    assert box is not None
    cdp = page.context.new_cdp_session(page)

    def at(fx: float, fy: float) -> list[dict]:
        return [{"x": box["x"] + fx * box["width"], "y": box["y"] + fy * box["height"]}]

    cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": at(*start)})
    for k in range(1, 9):
        f = k / 8
        x = start[0] + f * (end[0] - start[0])
        y = start[1] + f * (end[1] - start[1])
        cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": at(x, y)})
    cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    cdp.detach()


def fits(page: Page, selector: str, width: int) -> None:
    box = page.locator(selector).bounding_box()
    assert box is not None, selector
    assert box["x"] >= -0.5 and box["x"] + box["width"] <= width + 0.5, (selector, box)


def test_search_page_on_a_phone(browser: Browser, search_server: str, record_property) -> None:
    """At 390×844 with touch: nothing is wider than the screen; pick a query, draw and move
    the box with a finger, search, scroll the results, open and close the CAM view."""
    page = new_page(browser, PHONE, has_touch=True, is_mobile=True)
    try:
        with step(page, "open the page on a phone", "search-page-phone", record_property):
            page.goto(search_server)
            page.locator("#target").select_option(f"dataset:{DATASET}")
            item = page.locator(".image-list li").first
            item.wait_for()
            # The page's own first listing and the one the selection asked for are both in:
            # under load a late one re-lays the page out while a finger taps.
            page.wait_for_load_state("networkidle")
            assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
            for selector in ("header", "#images", "#controls", "#results-panel"):
                fits(page, selector, PHONE["width"])
            item.tap()
            page.wait_for_function(
                "() => { const i = document.getElementById('query-img');"
                " return i.complete && i.naturalWidth > 0; }"
            )
            page.locator("#box").wait_for()
            gt_box = page.locator("#box-text").inner_text()
        with step(page, "draw and move the box by touch", "search-page-phone", record_property):
            touch_drag(page, (0.15, 0.1), (0.85, 0.75))
            drawn = page.locator("#box-text").inner_text()
            assert drawn.startswith("box ") and drawn != gt_box, (gt_box, drawn)
            x1, y1, x2, y2 = (float(v) for v in drawn.removeprefix("box ").split(", "))
            touch_drag(page, (0.5, 0.42), (0.45, 0.37))  # a finger inside the box moves it
            moved = [float(v) for v in page.locator("#box-text").inner_text()[4:].split(", ")]
            assert moved != [x1, y1, x2, y2]
            assert abs((moved[2] - moved[0]) - (x2 - x1)) <= 1  # same size, moved
        with step(page, "search and scroll the results", "search-page-phone", record_property):
            page.locator("#search").tap()
            page.locator(".tile").first.wait_for()
            assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
            last = page.locator(".tile").last
            last.scroll_into_view_if_needed()
            fits(page, ".tile >> nth=-1", PHONE["width"])
            assert page.evaluate("window.scrollY") > 0
            page.locator("#box-text").scroll_into_view_if_needed()  # the box, then results
            page.evaluate("window.scrollBy(0, document.getElementById('box-text')"
                          ".getBoundingClientRect().top - 380)")  # fmt: skip
            screenshot(page, "search-page-phone", record_property, full_page=False)
        with step(
            page, "open and close the CAM view by touch", "search-page-phone", record_property
        ):
            tile = page.locator(".tile").nth(1)
            tile.scroll_into_view_if_needed()
            tile.tap()
            page.wait_for_function("() => document.getElementById('detail-img').naturalWidth > 0")
            fits(page, ".detail-card", PHONE["width"])
            fits(page, "#detail-img", PHONE["width"])
            screenshot(page, "search-page-phone-cam", record_property, full_page=False)
            page.locator("#detail-close").tap()
            page.locator("#detail").wait_for(state="hidden")
    finally:
        page.context.close()


def test_the_screen_always_shows_the_current_state(
    page: Page, search_server: str, demo_env: dict, record_property
) -> None:
    """Invalid numbers are reported next to their field; an error goes with the next action;
    a search replaced by a newer action never shows its answer; a progress indicator runs
    meanwhile; switching target resets query, box and results; more results page up; results
    without ground truth look unlabelled; PCA is named only for methods using it; the query
    list and the results work with the keyboard."""
    with step(page, "invalid numbers", "search-page-state", record_property):
        page.goto(search_server)
        page.locator("#target").select_option(f"dataset:{DATASET}")
        page.locator(".image-list li").first.click()
        page.locator("#box").wait_for()
        page.locator("#top").fill("9999")
        assert "from 1 to 500" in page.locator("#top-error").inner_text()
        assert page.locator("#search").is_disabled()
        page.locator("#top").fill("20")
        assert (
            page.locator("#top-error").inner_text() == "" and page.locator("#search").is_enabled()
        )
    with step(page, "an error goes with the next action", "search-page-state", record_property):
        page.locator("#qe").fill("999")  # valid here; the server refuses it for 48 images
        page.locator("#search").click()
        page.locator("#error").wait_for(state="visible")
        assert "more than the" in page.locator("#error").inner_text()
        page.locator("#qe").fill("0")
        page.locator(".image-list li").nth(1).click()
        assert page.locator("#error").is_hidden()
    with step(page, "a replaced search shows nothing", "search-page-state", record_property):
        held: list = []
        page.route("**/api/search?*", lambda route: held.append(route))
        page.locator("#search").click()
        page.locator("#progress").wait_for(state="visible")
        assert page.locator("#search").inner_text() == "Searching…"
        for _ in range(100):
            if held:
                break
            page.wait_for_timeout(50)
        assert held, "the search request was never sent"
        page.locator(".image-list li").nth(2).click()  # another query meanwhile
        assert page.locator("#progress").is_hidden()
        assert page.locator("#search").inner_text() == "Search"
        page.unroute("**/api/search?*")
        try:
            held[0].continue_()  # its answer arrives late, or the request was aborted
        except PlaywrightError:
            pass
        page.wait_for_timeout(1500)
        assert page.locator(".tile").count() == 0
    with step(page, "more results, labels, PCA", "search-page-state", record_property):
        page.locator("#search").click()
        page.locator(".tile").first.wait_for()
        assert "PCA learned on" in page.locator("#summary").inner_text()
        assert page.locator(".tile").count() == 20
        page.locator("#more-results").click()
        page.wait_for_function("() => document.querySelectorAll('.tile').length === 40")
        page.locator("#method").select_option("raw")
        page.locator("#search").click()
        page.wait_for_function(
            "() => document.querySelector('#summary')?.textContent.includes('method raw')"
        )
        assert "PCA" not in page.locator("#summary").inner_text()
        non_query = page.locator(".image-list li", has_not=page.locator(".q")).first
        non_query.click()
        page.locator("#search").click()
        page.locator(".tile").first.wait_for()
        labels = {t.get_attribute("class") for t in page.locator(".tile").all()}
        assert labels == {"tile unlabelled"}, labels
        assert "not labelled" in page.locator(".legend").inner_text()
    with step(page, "the keyboard", "search-page-state", record_property):
        first = page.locator(".image-list li").first
        first.focus()
        page.keyboard.press("ArrowDown")
        page.keyboard.press("Enter")
        assert page.locator(".image-list li").nth(1).get_attribute("aria-selected") == "true"
        page.locator("#search").click()
        tile = page.locator(".tile").first
        tile.wait_for()
        tile.focus()
        page.keyboard.press("Enter")
        page.locator("#detail").wait_for(state="visible")
        page.keyboard.press("Escape")
        page.locator("#detail").wait_for(state="hidden")
        assert page.evaluate("document.activeElement.classList.contains('tile')")
    with step(page, "switching target resets the screen", "search-page-state", record_property):
        page.locator("#target").select_option("dataset:demo-b")
        assert page.locator(".tile").count() == 0
        assert page.locator("#canvas").is_hidden() and page.locator("#search").is_disabled()
        assert page.locator("#summary").inner_text() == ""
        assert "pick a query" in page.locator("#query-title").inner_text()
