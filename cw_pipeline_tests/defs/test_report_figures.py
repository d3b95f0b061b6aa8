"""map_report draws the evaluation's pictures and embeds a few in its materialization."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import dagster as dg
import pyarrow as pa
from PIL import Image

from cw_pipeline.cli import main
from cw_pipeline.compute import report_figures
from cw_pipeline.compute.features import dataset_extractor
from cw_pipeline.compute.queries import load_groundtruth
from cw_pipeline.compute.report_figures import EMBED_BUDGET, FigureOptions, report_with_figures
from cw_pipeline.compute.reports import evaluation_image_ids
from cw_pipeline.defs.partitions import current_shards
from cw_pipeline.figures import FRAME_COLOURS, sheet_tile_box
from cw_pipeline_tests.defs.project import METHODS, materialize
from cw_pipeline_tests.published import rankings_rel

EMBEDDED = re.compile(r"!\[(cw-figure[^\]]*)\]\((data:image/png;base64,[A-Za-z0-9+/=]+)\)")


def _latest_metadata(project, key: str) -> dict:
    flt = dg.AssetRecordsFilter(asset_key=dg.AssetKey.from_user_string(key))
    records = project.instance.fetch_materializations(flt, limit=1).records
    assert records, f"{key} was not materialized"
    return records[0].asset_materialization.metadata


def _png(path: Path) -> Image.Image:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.convert("RGB")


def test_map_report_writes_and_embeds_figures(indexed_project, capsys):
    project = indexed_project
    ev = project.config.evaluation("alpha")
    ds = project.config.dataset("alpha")
    folder = Path(project.config.reports) / "alpha"
    shards = {"alpha": current_shards(project.instance, "alpha")}
    gt = load_groundtruth(ds, evaluation_image_ids(project.config, project.store, ev, shards))
    meta = _latest_metadata(project, "alpha/map_report")

    # One results sheet per query, CAM samples, both charts, linked from report.md.
    sheets = sorted((folder / "queries").glob("*.png"))
    assert {p.stem for p in sheets} == {q.image_id for q in gt.queries}
    cams = sorted((folder / "cams").glob("*.png"))
    assert 1 <= len(cams) <= FigureOptions().cam_samples
    for name in ("pr_curves.png", "ap_per_query.png"):
        assert _png(folder / name).size[1] >= 100
    report_md = (folder / "report.md").read_text()
    assert "](pr_curves.png)" in report_md and "](cams/" in report_md

    # The sheet's first result is framed by its ground-truth label.
    method = meta["figures_method"].value
    table = project.store.read_table(rankings_rel(project.store, "alpha", method))
    qid, ranked = table.column("query_id")[0].as_py(), table.column("ranked_ids")[0].as_py()
    query = next(q for q in gt.queries if q.image_id == qid)
    label = (
        "junk"
        if ranked[0] in query.junk
        else ("positive" if ranked[0] in query.positives else "negative")
    )
    sheet = _png(folder / "queries" / f"{qid}.png")
    x1, y1, _, _ = sheet_tile_box(1, thumb=160, columns=11, title="a report sheet's title")
    assert sheet.getpixel((x1 + 1, y1 + 1)) == FRAME_COLOURS[label]

    # Materialization metadata: markdown with small embedded PNGs, and the folder's path.
    md = meta["report"].value
    found = EMBEDDED.findall(md)
    alts = [alt for alt, _ in found]
    assert "cw-figure pr-curves" in alts and "cw-figure ap-per-query" in alts
    assert any(a.startswith("cw-figure query ") for a in alts)
    assert any(a.startswith("cw-figure cam ") for a in alts)
    assert sum(len(uri) for _, uri in found) <= EMBED_BUDGET
    for _, uri in found:
        with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as img:
            assert img.format == "PNG" and img.width <= 960
    assert meta["figures"].value == str(folder)
    assert meta["figures_queries"].value == len(sheets)

    # Redrawn elsewhere with other options (what ``cw-pipeline report-figures`` runs).
    ev = project.config.evaluation("beta-gamma")
    shards = {name: current_shards(project.instance, name) for name in ("beta", "gamma")}
    stale = Path(project.config.reports) / "beta-gamma" / "queries" / "gone.png"
    stale.write_bytes(b"old")
    report, figs, folder = report_with_figures(
        project.config,
        project.store,
        ev,
        shards,
        str(project.root / "elsewhere"),
        options=FigureOptions(max_queries=2, method="raw", cam_samples=0),
    )
    assert figs.method == "raw" and len(figs.queries) == 2 and figs.cams == []
    assert folder == project.root / "elsewhere" / "beta-gamma"
    assert sorted(p.name for p in (folder / "queries").iterdir()) == sorted(
        Path(p).name for p in figs.queries
    )
    # Materializing again over the project's folder removes the stale sheet.
    assert materialize(project, ["beta-gamma/map_report"]).success
    assert not stale.exists()
    assert report["evaluation"] == "beta-gamma"

    # The command line redraws from the warehouse alone.
    folder = Path(project.config.reports) / "beta"
    (folder / "pr_curves.png").unlink()
    config = str(project.root / "datasets.yaml")
    argv = ["report-figures", "beta", "--config", config, "--queries", "3", "--cams", "0"]
    assert main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["evaluations"][0]
    assert out["evaluation"] == "beta" and out["queries"] == 3 and out["cams"] == 0
    assert out["folder"] == str(folder) and (folder / "pr_curves.png").is_file()
    assert len(list((folder / "queries").glob("*.png"))) == 3
    assert set(out["map"]) == set(METHODS)


def test_report_figures_command_errors(fresh_project, capsys):
    config = str(fresh_project.root / "datasets.yaml")
    assert main(["report-figures", "nope", "--config", config]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]
    assert main(["report-figures", "alpha", "--config", config]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not indexed" in err[0] and "cw-pipeline index" in err[0]
    assert main(["report-figures", "alpha", "--config", config, "--top", "0"]) == 2
    assert "--top must be >= 1" in capsys.readouterr().err


def test_figures_are_redrawn_only_when_their_inputs_change(indexed_project, monkeypatch):
    """A report drawn again from the same rankings redraws nothing (same files, same embedded
    images); a changed ranking redraws that query's sheet (and what depends on it), keeps the
    other sheets; a lost file, a damaged index or a new drawing version redraws."""
    project = indexed_project
    ev = project.config.evaluation("alpha")
    shards = {"alpha": current_shards(project.instance, "alpha")}
    out = str(project.root / "again")
    cnn = dataset_extractor(project.config.dataset("alpha"))
    options = FigureOptions(method="raw")

    def draw():
        return report_with_figures(project.config, project.store, ev, shards, out, cnn, options)

    def files(folder: Path) -> dict[str, tuple[int, bytes]]:
        return {
            str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in folder.rglob("*.png")
        }

    _, first, folder = draw()
    assert first.kept == 0 and first.redrawn == len(first.files) > 3
    before = files(folder)
    _, again, _ = draw()
    assert (again.redrawn, again.kept) == (0, len(first.files))
    assert again.embedded == first.embedded and again.files == first.files
    assert files(folder) == before

    # Swap the first two results of one query: its sheet is redrawn, the others are kept.
    rel = rankings_rel(project.store, "alpha", "raw")
    table = project.store.read_table(rel)
    rows = table.to_pylist()
    q0 = rows[0]
    q0["ranked_ids"][:2] = q0["ranked_ids"][1::-1]
    q0["scores"][:2] = q0["scores"][1::-1]
    project.store.write_table(rel, pa.Table.from_pylist(rows, schema=table.schema))
    _, changed, _ = draw()
    now = files(folder)
    redrawn = {k for k in now if now[k] != before[k]}
    sheet = f"queries/{q0['query_id']}.png"
    assert sheet in redrawn
    others = {k for k in before if k.startswith("queries/") and k != sheet}
    assert others and not (others & redrawn)
    assert changed.redrawn == len(redrawn) and changed.kept == len(changed.files) - len(redrawn)

    # A lost file is drawn again; a damaged index or another drawing version redraws all.
    (folder / sheet).unlink()
    assert draw()[1].redrawn == 1
    (folder / "figures.json").write_text("{not json")
    assert draw()[1].redrawn == len(changed.files)
    monkeypatch.setattr(report_figures, "FIGURES_VERSION", "test")
    assert draw()[1].redrawn == len(changed.files)
    assert draw()[1].redrawn == 0
