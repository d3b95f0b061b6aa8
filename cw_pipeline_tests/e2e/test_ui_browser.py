"""The Dagster UI in a real browser: headless Debian Chromium, driven by Playwright, over the
webserver on the materialized demo instance (fixtures in conftest.py).

It checks what a user sees: the global lineage graph with every asset key shown as materialized,
one group's graph with materialization details, and the ``map_report`` asset page with its latest
materialization, its metadata and the report's embedded figures rendered. Screenshots go to
``$CW_ARTIFACTS`` (default ``<repo>/test-artifacts/``; ``make screenshots`` writes the README's to
``docs/img/``) and are listed in the test report.

Chromium comes from Debian (``apt-get install chromium``, done by ``make test``; ``$CW_CHROMIUM``
overrides the path) — Playwright never downloads a browser here. The selectors are the markup
of dagster-webserver 1.13 (pinned in pyproject.toml): asset nodes are ``foreignObject``s holding
an ``AssetNode_assetNodeContainer`` element, groups are ``foreignObject.group``, and a node's
status uses the ``--color-background-green`` token exactly when it is materialized (all
partitions, for partitioned assets).
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from playwright.sync_api import Error as PlaywrightError

from cw_pipeline.cli import demo
from cw_pipeline_tests.e2e.conftest import REPO, graphql

CHROMIUM = Path(os.environ.get("CW_CHROMIUM", "/usr/bin/chromium"))
# Headless, and nothing that phones home: the machine has no network, and Chromium stalls on
# refused background connections without these.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 60_000  # generous: two cores shared with other work
VIEWPORT = {"width": 1600, "height": 1000}
MAX_HEIGHT = 6000  # cap for screenshots stretched to the page's scrolled content
EVALUATION = "demo-a"  # whose map_report page is checked
BRIEF_KEYS = {
    f"{EVALUATION}/manifest",
    f"{EVALUATION}/cam_features",
    f"{EVALUATION}/descriptors",
    f"{EVALUATION}/rankings",
    f"{EVALUATION}/map_report",
}

# Every rendered asset node of the graph: short name, enclosing group (by SVG coordinates),
# materialized status colour, text.
NODES_JS = """() => {
  const groups = [...document.querySelectorAll('foreignObject.group')].map(g => ({
    name: g.querySelector('[data-tooltip]')?.getAttribute('data-tooltip') ?? null,
    x: +g.getAttribute('x'), y: +g.getAttribute('y'),
    w: +g.getAttribute('width'), h: +g.getAttribute('height')}));
  return [...document.querySelectorAll('foreignObject')]
    .filter(f => f.querySelector('[class*="AssetNode_assetNodeContainer"]'))
    .map(f => {
      const box = f.querySelector('[class*="AssetNode_assetNodeContainer"]');
      const x = +f.getAttribute('x'), y = +f.getAttribute('y');
      const g = groups.find(g => x >= g.x && x < g.x + g.w && y >= g.y && y < g.y + g.h);
      return {
        name: f.querySelector('[class*="AssetNode_assetName"]')?.innerText?.trim() ?? null,
        group: g ? g.name : null,
        green: !!f.querySelector('[style*="--color-background-green"]'),
        text: box.innerText || ''};
    });
}"""

# True once at least `n` nodes are rendered, all with their status loaded and materialized.
NODES_READY_JS = f"""(n) => {{
  const nodes = ({NODES_JS})();
  return nodes.length >= n && nodes.every(x => x.green && !x.text.includes('Loading'));
}}"""

# How far the graph's SVG reaches below the window (px); negative when it fits.
GRAPH_OVERFLOW_JS = """() => {
  const svg = document.querySelector('foreignObject')?.ownerSVGElement;
  if (!svg) return 0;
  const r = svg.getBoundingClientRect();
  return Math.max(r.bottom - window.innerHeight, -r.top);
}"""

# The extra height the page's scrolled content needs (Dagster scrolls inner panes, not body).
SCROLL_EXTRA_JS = """() => {
  let extra = 0;
  for (const el of document.querySelectorAll('*')) {
    const oy = getComputedStyle(el).overflowY;
    if ((oy === 'auto' || oy === 'scroll') && el.clientHeight > 0)
      extra = Math.max(extra, el.scrollHeight - el.clientHeight);
  }
  return extra;
}"""

FIGURES_JS = """() => [...document.querySelectorAll('img[alt^="cw-figure"]')].map(i => ({
  alt: i.alt, complete: i.complete, width: i.naturalWidth, height: i.naturalHeight,
  shown: i.getBoundingClientRect().width}))"""


def artifacts_dir() -> Path:
    """``$CW_ARTIFACTS`` or ``<repo>/test-artifacts``, created."""
    path = Path(os.environ.get("CW_ARTIFACTS") or REPO / "test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def screenshot(page: Page, name: str, record_property, full_page: bool = True) -> Path:
    """A screenshot ``<artifacts>/<name>.png`` (the full page, or what the viewport shows),
    recorded in the test report."""
    path = artifacts_dir() / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    record_property(f"screenshot {name}", str(path))
    return path


@contextmanager
def step(page: Page, what: str, name: str, record_property) -> Iterator[None]:
    """Turn a failed wait or assertion into one message naming the URL and a screenshot."""
    try:
        yield
    except (AssertionError, PlaywrightError) as exc:
        try:
            shot = str(screenshot(page, f"{name}-FAILED", record_property))
        except PlaywrightError as shot_exc:
            shot = f"(screenshot failed: {shot_exc})"
        raise AssertionError(f"{what} at {page.url}: {exc}\nscreenshot: {shot}") from exc


def stretch_to_content(page: Page) -> None:
    """Grow the window to the height of the page's scrolled content (capped at MAX_HEIGHT)."""
    size = page.viewport_size or VIEWPORT
    extra = page.evaluate(SCROLL_EXTRA_JS)
    if extra > 0:
        height = min(MAX_HEIGHT, size["height"] + math.ceil(extra) + 8)
        page.set_viewport_size({"width": size["width"], "height": height})
        page.wait_for_function(
            f"() => window.innerHeight === {height}", timeout=TIMEOUT_MS, polling=100
        )


def short_name(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def shown_as(shown: str, full: str) -> bool:
    """Whether a node label (possibly middle-truncated with "…") stands for ``full``."""
    if shown == full:
        return True
    if "…" in shown:
        head, _, tail = shown.partition("…")
        return full.startswith(head) and full.endswith(tail) and len(full) > len(shown) - 1
    return False


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless Debian Chromium for this module. Not for the session: Playwright's sync API
    keeps an asyncio loop running in the main thread until it stops, and later tests that call
    ``asyncio.run`` (Dagster's automation evaluation does) would fail."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: install Debian's package "
            "(`apt-get install chromium`, as make test does) or set CW_CHROMIUM",
            pytrace=False,
        )
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=TIMEOUT_MS
        )
        try:
            yield chromium
        finally:
            chromium.close()


def new_page(browser: Browser, viewport: dict[str, int] = VIEWPORT, **options) -> Page:
    """A fresh context: UTC, en-US, the community pop-up already dismissed (``options``:
    more context options, e.g. ``has_touch=True, is_mobile=True`` for a phone)."""
    context = browser.new_context(viewport=viewport, timezone_id="UTC", locale="en-US", **options)
    context.set_default_timeout(TIMEOUT_MS)
    context.add_init_script("window.localStorage.setItem('communityNux', JSON.stringify('1'))")
    return context.new_page()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    pg = new_page(browser)
    try:
        yield pg
    finally:
        pg.context.close()


@pytest.fixture(scope="session")
def asset_nodes(webserver_port: int) -> list[dict[str, Any]]:
    """The webserver's asset definitions: key, group, partitioned, code location path."""
    data = graphql(
        webserver_port,
        "{ assetNodes { assetKey { path } groupName isPartitioned "
        "repository { name location { name } } } }",
    )
    nodes = [
        {
            "key": "/".join(n["assetKey"]["path"]),
            "group": n["groupName"],
            "partitioned": n["isPartitioned"],
            "repo": n["repository"]["name"],
            "location": n["repository"]["location"]["name"],
        }
        for n in data["assetNodes"]
    ]
    keys = {n["key"] for n in nodes}
    assert BRIEF_KEYS <= keys, f"missing asset definitions: {sorted(BRIEF_KEYS - keys)}"
    return nodes


def graph_nodes(page: Page, expected: int, what: str, name: str, record_property) -> list[dict]:
    """Wait until ``expected`` asset nodes are rendered and materialized; return them."""
    with step(page, what, name, record_property):
        page.wait_for_selector('[class*="AssetNode_assetNodeContainer"]')
        try:
            page.wait_for_function(NODES_READY_JS, arg=expected, polling=250)
        except PlaywrightError:
            nodes = page.evaluate(NODES_JS)
            pending = [
                f"{n['group']}/{n['name']}: {' | '.join(n['text'].split(chr(10)))[:120]}"
                for n in nodes
                if not n["green"] or "Loading" in n["text"]
            ]
            raise AssertionError(
                f"{len(nodes)} asset nodes rendered, {expected} expected; not (yet) shown as "
                f"materialized: {pending}"
            ) from None
    return page.evaluate(NODES_JS)


def open_graph(page: Page, url: str, height: int, what: str, name: str, record_property) -> None:
    """Open a lineage graph in a window ``height`` px tall, taller if the whole graph needs it
    (nodes outside the window are not rendered): then it reloads once at the needed height."""
    with step(page, what, name, record_property):
        page.set_viewport_size({"width": VIEWPORT["width"], "height": height})
        page.goto(url)
        page.wait_for_selector('[class*="AssetNode_assetNodeContainer"]')
        overflow = page.evaluate(GRAPH_OVERFLOW_JS)
        if overflow > 0:
            size = page.viewport_size or VIEWPORT
            height = min(MAX_HEIGHT, size["height"] + 2 * math.ceil(overflow) + 40)
            page.set_viewport_size({"width": size["width"], "height": height})
            page.goto(url)


def test_lineage_graph_shows_every_asset_key_materialized(
    page: Page, webserver: str, asset_nodes: list[dict], record_property
) -> None:
    groups = sorted({n["group"] for n in asset_nodes})
    what = "global asset lineage graph"
    # Opened plainly, the page shows each group as one collapsed box, no asset node.
    with step(page, what, "ui-lineage-collapsed", record_property):
        page.set_viewport_size(VIEWPORT)
        page.goto(f"{webserver}/asset-groups")
        for g in groups:
            page.get_by_text(g, exact=True).first.wait_for()
        assert page.locator('[class*="AssetNode_assetNodeContainer"]').count() == 0
    screenshot(page, "ui-lineage-collapsed", record_property)
    # The address `make demo` prints expands every group.
    url = demo.lineage_url(webserver, groups)
    open_graph(page, url, 1600, what, "ui-lineage", record_property)
    shown = graph_nodes(page, len(asset_nodes), what, "ui-lineage", record_property)
    path = screenshot(page, "ui-lineage", record_property)

    with step(page, what, "ui-lineage", record_property):
        for g in groups:  # group boxes are labelled
            assert page.locator(f'foreignObject.group [data-tooltip="{g}"]').count() == 1, g
        unmatched = Counter((n["group"], n["name"]) for n in shown)
        missing = []
        for n in asset_nodes:
            hit = next(
                (
                    k
                    for k in unmatched
                    if unmatched[k] and k[0] == n["group"] and shown_as(k[1], short_name(n["key"]))
                ),
                None,
            )
            if hit is None:
                missing.append(n["key"])
            else:
                unmatched[hit] -= 1
        assert missing == [], f"asset keys not in the graph (screenshot {path}): {missing}"
        assert +unmatched == Counter(), f"unexpected nodes: {dict(+unmatched)}"
        not_green = [f"{n['group']}/{n['name']}" for n in shown if not n["green"]]
        assert not_green == [], f"not shown as materialized: {not_green}"


def test_group_graph_shows_materialization_details(
    page: Page, webserver: str, asset_nodes: list[dict], record_property
) -> None:
    members = [n for n in asset_nodes if n["key"].startswith(f"{EVALUATION}/")]
    group = members[0]["group"]
    members = [n for n in asset_nodes if n["group"] == group]
    repo, location = members[0]["repo"], members[0]["location"]
    address = location if repo == "__repository__" else f"{repo}@{location}"
    url = f"{webserver}/locations/{address}/asset-groups/{group}"
    what = f"lineage graph of group {group}"
    name = f"ui-lineage-{group}"
    open_graph(page, url, 1000, what, name, record_property)
    shown = graph_nodes(page, len(members), what, name, record_property)
    screenshot(page, name, record_property)

    with step(page, what, name, record_property):
        by_name = {n["name"]: n for n in shown}
        for n in members:
            node = by_name.get(short_name(n["key"]))
            assert node is not None, f"{n['key']} not in the graph: {sorted(by_name)}"
            text = node["text"]
            assert "Latest event" in text and " ago" in text, f"{n['key']}: {text!r}"
            if n["partitioned"]:
                assert "100% filled" in text, f"{n['key']} not all partitions: {text!r}"
            else:
                assert re.search(r"Materialized\s*\n?\s*\w{3} \d{1,2}", text), (
                    f"{n['key']} shows no materialization time: {text!r}"
                )
            for bad in ("Never materialized", "Failed", "missing", "Overdue"):
                assert bad not in text, f"{n['key']}: {bad!r} in {text!r}"


@pytest.fixture(scope="module")
def report_materialization(webserver_port: int) -> dict[str, Any]:
    """The latest materialization of ``<EVALUATION>/map_report``: timestamp and metadata."""
    data = graphql(
        webserver_port,
        "query Latest($path: [String!]!) { assetOrError(assetKey: {path: $path}) { "
        "... on Asset { assetMaterializations(limit: 1) { timestamp runId "
        "metadataEntries { label ... on MarkdownMetadataEntry { mdStr } } } } } }",
        {"path": [EVALUATION, "map_report"]},
    )
    events = data["assetOrError"]["assetMaterializations"]
    assert events, f"{EVALUATION}/map_report has no materialization"
    return events[0]


@pytest.fixture(scope="module")
def report_page(browser: Browser, webserver: str) -> Iterator[Page]:
    """The ``map_report`` asset page, loaded once for the tests below."""
    pg = new_page(browser)
    url = f"{webserver}/assets/{EVALUATION}/map_report"
    try:
        try:
            pg.goto(url)
            pg.get_by_text("Latest materialization").first.wait_for()
            pg.get_by_role("cell", name="report", exact=True).first.wait_for()
        except PlaywrightError as exc:
            path = artifacts_dir() / "ui-asset-map-report-FAILED.png"
            pg.screenshot(path=str(path), full_page=True)
            raise AssertionError(f"asset page {url}: {exc}\nscreenshot: {path}") from exc
        yield pg
    finally:
        pg.context.close()


def metadata_row(page: Page, label: str):
    """The row of the asset page's metadata table whose key is ``label``."""
    cell = page.get_by_role("cell", name=label, exact=True).first
    cell.wait_for()
    return cell.locator("xpath=ancestor::tr[1]")


def shown_number(value: float) -> str:
    """A 4-decimal float as the UI prints it (JavaScript's shortest form: 1, 0.8692)."""
    return f"{value:.4f}".rstrip("0").rstrip(".")


def test_asset_page_shows_latest_materialization_and_metadata(
    report_page: Page, report_materialization: dict, demo_result: dict, record_property
) -> None:
    page = report_page
    what = f"asset page of {EVALUATION}/map_report"
    with step(page, what, "ui-asset-map-report", record_property):
        # The status panel: the latest materialization, as a relative time.
        latest = page.get_by_text("Latest materialization").first
        latest.wait_for()
        panel = latest.locator("xpath=..")
        # the label is drawn first, the time once the asset's events have loaded
        expect(panel).to_contain_text(" ago", timeout=30_000)
        # The metadata table: every entry of the latest event, stamped with its time (UTC).
        when = dt.datetime.fromtimestamp(int(report_materialization["timestamp"]) / 1000, tz=dt.UTC)
        stamp = f"{when:%b} {when.day}, {when.hour % 12 or 12}:{when:%M %p}"
        for entry in report_materialization["metadataEntries"]:
            row = metadata_row(page, entry["label"])
            assert stamp in row.inner_text(), (
                f"metadata {entry['label']!r} not stamped {stamp}: {row.inner_text()[:200]!r}"
            )
        # Values: the mAP of every method, and the report (inline, or behind its button).
        for r in demo_result["reports"][EVALUATION]:
            row = metadata_row(page, f"map/{r['method']}")
            assert shown_number(r["map"]) in row.inner_text(), (r, row.inner_text())
        report = metadata_row(page, "report").inner_text()
        assert "[Show Markdown]" in report or EVALUATION in report, report[:300]
        assert "Never materialized" not in page.locator("body").inner_text()
    stretch_to_content(page)
    screenshot(page, "ui-asset-map-report", record_property)


def test_report_markdown_and_figures_render(
    report_page: Page, report_materialization: dict, demo_result: dict, record_property
) -> None:
    page = report_page
    md = "\n".join(e.get("mdStr") or "" for e in report_materialization["metadataEntries"])
    expected = re.findall(r"!\[(cw-figure[^\]]*)\]\(data:image/png;base64,", md)
    assert expected, "the map_report metadata embeds no cw-figure image"
    what = f"report markdown of {EVALUATION}/map_report"
    name = "ui-asset-map-report-figures"
    with step(page, what, name, record_property):
        # Long markdown opens in a dialog ("[Show Markdown]"); short markdown is inline.
        row = metadata_row(page, "report")
        button = row.get_by_text("[Show Markdown]")
        if button.count():
            button.click()
            scope = page.get_by_role("dialog")
        else:
            scope = row
        scope.get_by_role("heading", name=EVALUATION, exact=True).wait_for()
        ofa = next(r for r in demo_result["reports"][EVALUATION] if r["method"] == "ofa")
        assert f"{ofa['map']:.4f}" in scope.inner_text(), scope.inner_text()[:500]
        page.wait_for_function(
            "(n) => { const imgs = [...document.querySelectorAll('img[alt^=\"cw-figure\"]')];"
            " return imgs.length >= n && imgs.every(i => i.complete); }",
            arg=len(expected),
            polling=250,
        )
        figures = page.evaluate(FIGURES_JS)
        assert sorted(f["alt"] for f in figures) == sorted(expected)
        broken = [f for f in figures if not (f["width"] > 0 and f["height"] > 0)]
        assert broken == [], f"images that did not decode: {broken}"
        hidden = [f["alt"] for f in figures if f["shown"] <= 0]
        assert hidden == [], f"images laid out with no width: {hidden}"
    stretch_to_content(page)
    screenshot(page, name, record_property)
    page.keyboard.press("Escape")


def test_results_sheet_of_the_demo_is_saved_for_the_readme(
    demo_env: dict, demo_result: dict
) -> None:
    """The demo's map_report wrote one results sheet per query; the first of demo-a is kept as
    an artifact (``make screenshots`` puts it in docs/img/ for the README)."""
    from PIL import Image

    from cw_pipeline.core.demo import demo_instances

    assert EVALUATION in demo_result["reports"]
    sheets = sorted((demo_env["root"] / "reports" / EVALUATION / "queries").glob("*.png"))
    assert len(sheets) == len(demo_instances()[EVALUATION])  # one per query
    with Image.open(sheets[0]) as im:
        im.load()
        assert im.format == "PNG" and im.width > 3 * im.height  # query + a row of results
        im.save(artifacts_dir() / "results-sheet-demo-a.png")
