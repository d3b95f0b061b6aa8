"""The module layout that docs/architecture.md describes is the code's: every import follows
the page's "may import" table, no modules import each other in a cycle, only ``defs/`` and
``runtime/`` import Dagster, and every module is placed on the page."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from cw_pipeline_tests.conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "cw_pipeline"
ARCHITECTURE = REPO_ROOT / "docs" / "architecture.md"
#: The packages whose modules may import Dagster (the page says so too).
DAGSTER_PACKAGES = ("defs", "runtime")

_TICKED = re.compile(r"`([^`]+)`")


@dataclass(frozen=True)
class Row:
    """A row of the page's table: the modules it covers and the rows they may import."""

    name: str  # the first cell as written
    packages: tuple[str, ...]  # "core", "runtime" ...: every module under them
    modules: tuple[str, ...]  # "runtime.runs", "definitions": these modules exactly
    may_import: frozenset[str] | None  # names of packages; None: everything


def _section(doc: str, heading: str) -> str:
    start = doc.index(heading)
    end = doc.find("\n## ", start + len(heading))
    return doc[start : end if end >= 0 else len(doc)]


def table_rows(doc: str) -> list[Row]:
    """The rows of the table under "Where does X live"."""
    rows = []
    for line in _section(doc, "## Where does X live").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        packages, modules = [], []
        for name in _TICKED.findall(cells[0]):
            if name.endswith("/"):
                packages.append(name.rstrip("/").replace("/", "."))
            else:
                modules.append(name.removesuffix(".py").replace("/", "."))
        may = None if cells[2] == "everything" else frozenset(_TICKED.findall(cells[2]))
        rows.append(Row(cells[0], tuple(packages), tuple(modules), may))
    return rows


def module_lists(doc: str) -> dict[str, set[str]]:
    """Package folder ("core/", "core/datasets/", "" for the top level) → the names its
    bullet under "Module by module" mentions."""
    lists: dict[str, set[str]] = {}
    current: str | None = None
    for line in _section(doc, "## Module by module").splitlines():
        m = re.match(r"- \*\*(?:`([^`]+)`|top level)\*\*", line)
        if m:
            current = m.group(1) or ""
            lists[current] = set()
        elif not line.startswith("  "):
            current = None
        if current is not None:
            lists[current].update(_TICKED.findall(line))
    return lists


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted name (relative to the package: "core.ranking", "defs" ...) → file."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            found[".".join(parts)] = path
    return found


def imports_of(path: Path, known: Iterable[str]) -> set[str]:
    """The project modules ``path`` imports (lazy imports and TYPE_CHECKING ones included),
    dotted relative to the package; ``"dagster"`` when it imports Dagster."""
    known = set(known)

    def resolve(name: str) -> str | None:
        rel = name.removeprefix("cw_pipeline").lstrip(".")
        while rel and rel not in known:
            rel = rel.rpartition(".")[0]
        return rel or None

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name == "dagster" or name.startswith("dagster."):
                found.add("dagster")
            elif name.startswith("cw_pipeline."):
                target = resolve(name)
                if target:
                    found.add(target)
    return found


def row_of(module: str, rows: list[Row]) -> Row:
    for row in rows:
        if module in row.modules:
            return row
    for row in rows:
        if any(module == p or module.startswith(p + ".") for p in row.packages):
            return row
    raise LookupError(f"cw_pipeline/{module.replace('.', '/')}: in no row of the table")


def layer_violations(rows: list[Row], graph: Mapping[str, set[str]]) -> list[str]:
    """Every import of ``graph`` (module → the modules it imports) that its row does not
    allow; a row's "may import" names the rows of those packages, and a row covering single
    modules is named by no other row."""
    by_package = {p: row for row in rows for p in row.packages}
    problems = []
    for source, targets in sorted(graph.items()):
        row = row_of(source, rows)
        for target in sorted(targets - {"dagster", source}):
            other = row_of(target, rows)
            if other == row or row.may_import is None:
                continue
            allowed = {by_package[p] for p in row.may_import if p in by_package}
            if other not in allowed:
                problems.append(f"{source} imports {target} ({row.name} may not import it)")
    return problems


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def doc() -> str:
    return ARCHITECTURE.read_text()


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(path, found) for name, path in found.items()}


def test_every_import_follows_the_architecture_table(doc, graph):
    rows = table_rows(doc)
    assert len(rows) >= 10
    project = {name: targets - {"dagster"} for name, targets in graph.items()}
    assert layer_violations(rows, project) == []


def test_no_modules_import_each_other_in_a_cycle(graph):
    project = {name: targets - {"dagster"} for name, targets in graph.items()}
    # package __init__ files count as modules: importing "store" runs store/__init__.py
    assert cycles(project) == []


def test_only_the_dagster_layers_import_dagster(graph):
    importers = {m for m, targets in graph.items() if "dagster" in targets}
    assert importers  # the check sees Dagster imports at all
    assert {m for m in importers if m.split(".")[0] not in DAGSTER_PACKAGES} == set()


def test_every_module_is_placed_on_the_architecture_page(doc):
    lists = module_lists(doc)
    missing = []
    for path in modules().values():
        rel = path.relative_to(PACKAGE)
        if rel.name in ("__init__.py", "__main__.py"):
            if rel.name == "__init__.py" and len(rel.parts) > 2:  # a sub-package
                parent = "/".join(rel.parts[:-2]) + "/"
                if f"{rel.parts[-2]}/" not in lists.get(parent, set()):
                    missing.append(f"{rel.parent}/ (in the list of {parent})")
            continue
        folder = "/".join(rel.parts[:-1]) + "/" if len(rel.parts) > 1 else ""
        if rel.name not in lists.get(folder, set()):
            missing.append(f"{rel} (in the list of {folder or 'the top level'})")
    assert missing == []


def test_the_checks_catch_what_they_are_for(doc):
    """Broken on purpose: an upward import, a cycle, an unplaced module are reported."""
    rows = table_rows(doc)
    assert layer_violations(rows, {"core.ranking": {"store.layout"}}) == [
        "core.ranking imports store.layout (`core/` may not import it)"
    ]
    # defs may import runtime's leaves, not the runtime modules that read the graph
    assert layer_violations(rows, {"defs.jobs": {"runtime.run_tags"}}) == []
    assert layer_violations(rows, {"defs.jobs": {"runtime.runs"}})
    assert layer_violations(rows, {"runtime.runs": {"defs.jobs"}, "cli.index": {"web"}}) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    with pytest.raises(LookupError, match="cw_pipeline/nowhere/new"):
        row_of("nowhere.new", rows)
    lists = module_lists(doc)
    assert "ranking.py" in lists["core/"] and "graph.py" in lists["defs/"]
    assert "definitions.py" in lists[""]
