"""Tests for cw_pipeline.config: datasets.yaml -> validated ProjectConfig."""

from __future__ import annotations

import logging
import re
import textwrap
from pathlib import Path

import pytest

from cw_pipeline.config import (
    CONFIG_ENV,
    DEFAULT_METHODS,
    SELF_SPLIT,
    ConfigError,
    DatasetConfig,
    DatasetDefaults,
    ProjectConfig,
    UnknownNameError,
    default_config_path,
    load_config,
    project_root,
)
from cw_pipeline.core.datasets.layouts import LAYOUTS
from cw_pipeline.core.extract import ExtractionConfig, RuntimeConfig
from cw_pipeline.core.methods import Method
from cw_pipeline.core.search_settings import SearchParams

REPO = Path(__file__).resolve().parents[1]
REAL_CONFIG = REPO / "data" / "datasets.yaml"


def write(tmp_path: Path, text: str, *, folders: tuple[str, ...] = ()) -> Path:
    """Write ``datasets.yaml`` into ``tmp_path`` and create the given folders under it."""
    for folder in folders:
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    path = tmp_path / "datasets.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


PAIR = """
datasets:
  oxford5k:
    layout: oxford
    images: ox/jpg
    groundtruth: ox/gt
    pca_from: paris6k
  paris6k:
    layout: paris
    images: pa/jpg
    groundtruth: pa/gt
    pca_from: oxford5k
  flickr:
    layout: folder
    images: fl
"""
PAIR_FOLDERS = ("ox/jpg", "ox/gt", "pa/jpg", "pa/gt", "fl")


def load_pair(tmp_path: Path, extra: str = "", **replace: str) -> ProjectConfig:
    text = textwrap.dedent(PAIR) + textwrap.dedent(extra)
    for old, new in replace.items():
        text = text.replace(old.replace("__", " "), new)
    return load_config(write(tmp_path, text, folders=PAIR_FOLDERS))


def error_of(tmp_path: Path, text: str, folders: tuple[str, ...] = PAIR_FOLDERS) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text, folders=folders))
    message = str(info.value)
    assert message.startswith(str(tmp_path / "datasets.yaml") + ":"), message
    return message


# --------------------------------------------------------------------------------------------
# the project's own file
# --------------------------------------------------------------------------------------------


def test_real_config_loads_on_a_clean_checkout() -> None:
    config = load_config(REAL_CONFIG)
    assert config.source == REAL_CONFIG
    assert config.warehouse == str(REPO / "data" / "warehouse")
    assert config.reports == str(REPO / "data" / "reports")
    assert {"demo-a", "demo-b", "demo-distractors"} <= set(config.datasets)
    a, b = config.dataset("demo-a"), config.dataset("demo-b")
    assert (a.pca_from, b.pca_from) == ("demo-b", "demo-a")
    assert a.generate == "demo" and a.generate_root == REPO / "data" / "demo"
    assert a.groundtruth == REPO / "data" / "demo" / "demo-a" / "gt"
    assert config.dataset("demo-distractors").layout == "folder"
    ev = config.evaluation("demo-a-distractors")
    assert ev.dataset == "demo-a" and ev.distractors == ("demo-distractors",)
    assert ev.schedule == "0 3 * * *"
    assert config.evaluation("demo-b-distractors").distractors == ("demo-distractors",)
    assert config.evaluation("demo-a").implicit
    assert [m.name for m in config.methods] == list(DEFAULT_METHODS)


def _with_ukbench(text: str) -> str:
    """The real config with its commented-out ``ukbench`` entry enabled."""
    lines = text.splitlines()
    start = lines.index("#  ukbench:")
    end = start
    while end < len(lines) and lines[end].startswith("#  "):
        end += 1
    lines[start:end] = [line[1:] for line in lines[start:end]]
    return "\n".join(lines) + "\n"


def test_real_config_ukbench_entry_reads_the_real_folder(tmp_path: Path, shared_data: Path) -> None:
    text = _with_ukbench(REAL_CONFIG.read_text())
    ukbench = shared_data / "ukbench" / "jpg"
    here = tmp_path / "here" / "datasets.yaml"
    here.parent.mkdir()
    here.write_text(text.replace("../../shared/data/ukbench/jpg", str(ukbench)))
    config = load_config(here)
    ds = config.dataset("ukbench")
    assert ds.images == ukbench and ds.pca_from == SELF_SPLIT and ds.optional
    assert config.paired("ukbench") is ds
    assert config.evaluation("ukbench").implicit


def test_real_config_ukbench_is_optional(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    text = _with_ukbench(REAL_CONFIG.read_text())
    # A copy elsewhere cannot see the shared folder: ukbench is disabled with a warning.
    copy = tmp_path / "data" / "datasets.yaml"
    copy.parent.mkdir()
    copy.write_text(text)
    with caplog.at_level(logging.WARNING, logger="cw_pipeline.config"):
        moved = load_config(copy)
    assert "ukbench" not in moved.datasets and "ukbench" not in moved.evaluations
    assert "image folder not found" in moved.disabled_datasets["ukbench"]
    assert any("ukbench" in w for w in moved.warnings)
    assert "dataset 'ukbench' disabled" in caplog.text
    with pytest.raises(UnknownNameError, match="'ukbench' is disabled: image folder not found"):
        moved.dataset("ukbench")
    assert set(moved.evaluations) == {
        "demo-a",
        "demo-b",
        "demo-a-distractors",
        "demo-b-distractors",
    }


def test_commented_entries_are_valid_when_uncommented(tmp_path: Path) -> None:
    text = REAL_CONFIG.read_text(encoding="utf-8")
    uncommented = re.sub(r"(?m)^#(?=  )", "", text)
    assert uncommented.count("\n  oxford5k:") == 1 and "oxford105k:" in uncommented
    data = tmp_path / "data"
    for folder in (
        "oxford5k/jpg",
        "paris6k/jpg",
        "flickr100k/jpg",
        "groundtruth/oxford5k",
        "groundtruth/paris6k",
        "groundtruth/revisited",
    ):
        (data / folder).mkdir(parents=True)
    for pkl in ("gnd_roxford5k.pkl", "gnd_rparis6k.pkl"):
        (data / "groundtruth" / "revisited" / pkl).write_bytes(b"")
    path = data / "datasets.yaml"
    path.write_text(uncommented, encoding="utf-8")
    config = load_config(path)
    ox, pa = config.dataset("oxford5k"), config.dataset("paris6k")
    assert (ox.pca_from, pa.pca_from) == ("paris6k", "oxford5k")
    assert ox.query_protocol == pa.query_protocol == "paper"
    assert ox.extraction.resize == "paper:720:1024"
    assert pa.shard_by == "folder"
    assert config.dataset("flickr100k").shard_size == 1000
    assert config.dataset("roxford5k").query_protocol == "crop"
    assert config.evaluation("oxford105k").distractors == ("flickr100k",)
    assert config.evaluation("paris106k").dataset == "paris6k"
    assert [e.name for e in config.evaluations_for("flickr100k")] == ["oxford105k", "paris106k"]


def test_default_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    assert project_root() == REPO
    assert default_config_path() == REAL_CONFIG
    assert load_config().source == REAL_CONFIG
    other = write(tmp_path, "datasets: {}\n")
    monkeypatch.setenv(CONFIG_ENV, str(other))
    assert default_config_path() == other
    assert load_config().datasets == {}


# --------------------------------------------------------------------------------------------
# parsing and defaults
# --------------------------------------------------------------------------------------------


def test_minimal_config_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "datasets: {}\n"))
    assert config.warehouse == str(tmp_path / "warehouse")
    assert config.reports == str(tmp_path / "reports")
    assert config.defaults == DatasetDefaults()
    assert config.search == SearchParams(n_pca=1, pca_dims=None, aggregated_classes=64)
    assert [m.name for m in config.methods] == list(DEFAULT_METHODS)
    assert config.evaluations == {} and config.warnings == ()


def test_default_extraction_bounds_memory(tmp_path: Path) -> None:
    from cw_pipeline.core.extract import DEFAULT_BATCH_PIXELS, DEFAULT_RESIZE

    # The long side capped at the paper's 1024, and a pixel budget per forward pass: the
    # same defaults in the shipped YAML and the core.
    assert DatasetDefaults().extraction.resize == DEFAULT_RESIZE == "max:1024"
    assert DatasetDefaults().runtime.batch_pixels == DEFAULT_BATCH_PIXELS
    real = load_config(REAL_CONFIG)
    assert real.defaults.extraction.resize == "max:1024"
    assert real.defaults.runtime.batch_pixels == DEFAULT_BATCH_PIXELS
    assert real.dataset("demo-a").extraction.resize == "max:1024"
    config = load_pair(tmp_path, "defaults:\n  resize: native\n  batch_pixels: 2000000\n")
    ox = config.dataset("oxford5k")
    assert (ox.extraction.resize, ox.runtime.batch_pixels) == ("native", 2_000_000)


def test_pair_datasets_and_implicit_evaluations(tmp_path: Path) -> None:
    config = load_pair(tmp_path)
    ox = config.dataset("oxford5k")
    assert ox == DatasetConfig(
        name="oxford5k",
        layout="oxford",
        images=tmp_path / "ox" / "jpg",
        groundtruth=tmp_path / "ox" / "gt",
        pca_from="paris6k",
    )
    assert ox.shard_by == "batch" and ox.shard_size == 1000 and ox.query_protocol == "paper"
    assert config.dataset("flickr").groundtruth is None
    assert set(config.evaluations) == {"oxford5k", "paris6k"}  # not the folder
    ev = config.evaluation("oxford5k")
    assert ev.implicit and ev.dataset == "oxford5k" and ev.distractors == ()
    assert config.paired("oxford5k") == config.dataset("paris6k")
    assert config.paired("flickr") is None
    assert config.evaluations_for("flickr") == ()
    assert not ox.grouped and not ox.self_split


@pytest.mark.parametrize(
    ("layout", "groundtruth", "grouped"),
    [
        ("ukbench", None, True),
        ("holidays", None, True),
        ("oxford", Path("gt"), False),
        ("gnd", Path("gnd_x.pkl"), False),
        ("folder", None, False),
    ],
)
def test_grouped_layouts(layout: str, groundtruth: Path | None, grouped: bool) -> None:
    """``grouped``: the one property for "every image is a query of its object";
    ``self_split``: the one for "each half learns its PCA on the other"."""
    ds = DatasetConfig(name="d", layout=layout, images=Path("x"), groundtruth=groundtruth)  # type: ignore[arg-type]
    assert ds.grouped is grouped
    assert not ds.self_split
    split = DatasetConfig(
        name="d",
        layout=layout,  # type: ignore[arg-type]
        images=Path("x"),
        groundtruth=groundtruth,
        pca_from=SELF_SPLIT,
    )
    assert split.self_split and split.grouped is grouped


def test_extraction_defaults_and_overrides(tmp_path: Path) -> None:
    config = load_pair(
        tmp_path,
        """
        defaults:
          backbone: resnet50
          resize: paper
          stored_classes: 32
          batch_size: 4
          num_threads: 2
        search:
          aggregated_classes: 16
          n_pca: 2
          pca_dims: 128
          rerank:
            query_classes: 8
        """,
        **{"layout: paris": "layout: paris\n    resize: fixed:224x224\n    batch_size: 8"},
    )
    ox, pa = config.dataset("oxford5k"), config.dataset("paris6k")
    # The YAML's extraction keys are core's ExtractionConfig, its search block SearchParams.
    assert ox.extraction == ExtractionConfig(backbone="resnet50", resize="paper", stored_classes=32)
    assert ox.runtime == RuntimeConfig(batch_size=4, num_threads=2)
    assert pa.extraction.resize == "fixed:224x224" and pa.extraction.stored_classes == 32
    assert pa.runtime.batch_size == 8
    assert ox.extraction.resolved_layer == "layer4"
    assert ox.extraction.feature_space == ("resnet50", "layer4", None)
    assert config.search == SearchParams(
        aggregated_classes=16, n_pca=2, pca_dims=128, rerank={"query_classes": 8}
    )
    assert config.warnings == ()


def test_paths_urls_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    (home / "pics").mkdir(parents=True)
    (tmp_path / "abs").mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("CW_TEST_BUCKET", "my-bucket")
    monkeypatch.setenv("CW_TEST_ROOT", str(tmp_path / "abs"))
    monkeypatch.delenv("CW_TEST_UNSET", raising=False)
    config = load_config(
        write(
            tmp_path,
            """
            warehouse: s3://${CW_TEST_BUCKET}/features
            reports: ${CW_TEST_UNSET:-out}/../reports
            datasets:
              home:
                layout: folder
                images: ~/pics
              env:
                layout: folder
                images: ${CW_TEST_ROOT}
              url:
                layout: folder
                images: file://${CW_TEST_ROOT}
            """,
        )
    )
    assert config.warehouse == "s3://my-bucket/features"
    assert config.reports == str(tmp_path / "reports")
    assert config.dataset("home").images == home / "pics"
    assert config.dataset("env").images == tmp_path / "abs"
    assert config.dataset("url").images == tmp_path / "abs"
    file_url = load_config(write(tmp_path, f"warehouse: file://{tmp_path}/wh\n"))
    assert file_url.warehouse == str(tmp_path / "wh")
    memory = load_config(write(tmp_path, "warehouse: memory://store\n"))
    assert memory.warehouse == "memory://store"


def test_unset_environment_variable_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CW_TEST_UNSET", raising=False)
    message = error_of(tmp_path, "warehouse: ${CW_TEST_UNSET}/x\n")
    assert "warehouse" in message and "'CW_TEST_UNSET' is not set" in message


def test_weights_files_resolve_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "vgg.pth").write_bytes(b"")
    config = load_config(
        write(
            tmp_path,
            """
            defaults:
              backbone: vgg16_cam
              weights: w/vgg.pth
            datasets:
              rnd:
                layout: folder
                images: fl
                weights: random
            """,
            folders=("fl",),
        )
    )
    assert config.defaults.extraction.weights == str(tmp_path / "w" / "vgg.pth")
    assert config.dataset("rnd").extraction.weights == "random"
    message = error_of(tmp_path, "defaults:\n  weights: w/missing.pt\n")
    assert "defaults: weights file not found" in message


def test_explicit_evaluation_and_methods(tmp_path: Path) -> None:
    config = load_pair(
        tmp_path,
        """
        methods: [ofa, ona+qe5]
        evaluations:
          oxford105k:
            dataset: oxford5k
            distractors: [flickr]
            schedule: "@daily"
            methods: [raw+pca+r50, ofa+r100+qe10]
          paris6k:
            dataset: paris6k
            methods: [ofa]
        """,
    )
    ev = config.evaluation("oxford105k")
    assert not ev.implicit and ev.distractors == ("flickr",) and ev.schedule == "@daily"
    assert ev.methods == (Method("raw+pca", rerank=50), Method("ofa", 100, 10))
    assert [m.name for m in config.evaluation("oxford5k").methods] == ["ofa", "ona+qe5"]
    assert not config.evaluation("paris6k").implicit  # the explicit one replaces it
    assert [e.name for e in config.evaluations_for("oxford5k")] == ["oxford105k", "oxford5k"]
    assert [e.name for e in config.evaluations_for("flickr")] == ["oxford105k"]


def test_generated_demo_may_be_absent(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """
            datasets:
              a:
                layout: oxford
                images: demo/demo-a/jpg
                groundtruth: demo/demo-a/gt
                pca_from: b
                generate: demo
              b:
                layout: oxford
                images: demo/demo-b/jpg
                groundtruth: demo/demo-b/gt
                pca_from: a
                generate: demo
              d:
                layout: folder
                images: demo/demo-distractors/jpg
                generate: demo
            """,
        )
    )
    assert config.dataset("a").generate_root == tmp_path / "demo"
    assert config.dataset("d").generate == "demo"


def test_optional_datasets_cascade(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        config = load_pair(
            tmp_path,
            """
            evaluations:
              oxford-extra:
                dataset: oxford5k
                distractors: [gone]
            """,
            **{
                "flickr:": (
                    "gone:\n    layout: folder\n    images: nowhere\n    optional: true\n  flickr:"
                ),
                "images: pa/jpg": "images: pa/missing\n    optional: true",
            },
        )
    assert set(config.disabled_datasets) == {"gone", "paris6k", "oxford5k"}
    assert "its PCA source 'paris6k' is disabled" in config.disabled_datasets["oxford5k"]
    assert set(config.datasets) == {"flickr"}
    assert config.evaluations == {}
    assert (
        "uses disabled dataset(s) 'oxford5k', 'gone'"
        in (config.disabled_evaluations["oxford-extra"])
    )
    with pytest.raises(UnknownNameError, match="evaluation 'oxford-extra' is disabled"):
        config.evaluation("oxford-extra")
    assert len(config.warnings) == 4 and "disabled" in caplog.text


def test_unknown_names_are_key_errors_listing_known_ones(tmp_path: Path) -> None:
    config = load_pair(tmp_path)
    with pytest.raises(KeyError) as info:
        config.dataset("oxfrod5k")
    err = info.value
    assert isinstance(err, ConfigError) and isinstance(err, ValueError)
    assert str(err) == (
        f"{tmp_path / 'datasets.yaml'}: unknown dataset 'oxfrod5k' "
        "(known: flickr, oxford5k, paris6k)"
    )
    with pytest.raises(UnknownNameError, match="unknown evaluation 'x'"):
        config.evaluation("x")
    with pytest.raises(UnknownNameError):
        config.evaluations_for("x")


# --------------------------------------------------------------------------------------------
# Method
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("raw", Method("raw")),
        ("raw+pca", Method("raw+pca")),
        ("ofa", Method("ofa")),
        ("ona+qe10", Method("ona", qe=10)),
        ("ofa+r100", Method("ofa", rerank=100)),
        ("ofa+r100+qe10", Method("ofa", rerank=100, qe=10)),
        ("raw+pca+r5+qe1", Method("raw+pca", rerank=5, qe=1)),
    ],
)
def test_method_spec_round_trips(text: str, spec: Method) -> None:
    assert Method.parse(text) == spec
    assert spec.name == text == str(spec)
    assert spec.uses_pca == (spec.aggregation != "raw")


@pytest.mark.parametrize(
    "text",
    ["", "ofx", "ofa+qe", "ofa+qe0", "ofa+r0", "ofa+qe010", "ofa+qe10+r100", "pca", "OFA",
     "ofa+", "ofa+qe10+qe5", "raw+pca+pca", "ofa+crop"],
)  # fmt: skip
def test_method_spec_rejects_unknown_tokens(tmp_path: Path, text: str) -> None:
    """The YAML must spell methods canonically (the CLI's parser is lenient about case/order)."""
    import json

    message = error_of(tmp_path, f"methods: [{json.dumps(text)}]\n")
    assert repr(text) in message


def test_method_spec_validates_fields() -> None:
    with pytest.raises(ValueError, match="unknown aggregation"):
        Method("max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="qe must be >= 0"):
        Method("ofa", qe=-1)


# --------------------------------------------------------------------------------------------
# validation errors: each names the file and the entry
# --------------------------------------------------------------------------------------------


def test_unknown_layout_message_format(tmp_path: Path) -> None:
    message = error_of(tmp_path, "datasets:\n  oxford5k:\n    layout: oxfrod\n    images: ox/jpg\n")
    assert message == (
        f"{tmp_path / 'datasets.yaml'}:3: dataset 'oxford5k': unknown layout 'oxfrod' "
        "(expected one of oxford, paris, gnd, revisited, ukbench, holidays, folder)"
    )


DS = "datasets:\n  {name}:\n    layout: {layout}\n    images: {images}\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("colour: red\n", "unknown key 'colour'"),
        ("datasets:\n  fl:\n    layout: folder\n    images: fl\n    resise: paper\n",
         "dataset 'fl': unknown key 'resise'; did you mean 'resize'?"),
        ("defaults:\n  backbon: resnet50\n", "defaults: unknown key 'backbon'"),
        ("search:\n  npca: 2\n", "search: unknown key 'npca'"),
        ("evaluations:\n  e:\n    dataset: oxford5k\n    distractor: [fl]\n",
         "evaluation 'e': unknown key 'distractor'"),
        ("datasets: [a, b]\n", "datasets: expected a mapping, got list"),
        (DS.format(name="Oxford", layout="folder", images="fl"),
         "dataset 'Oxford': invalid name"),
        (DS.format(name="-x", layout="folder", images="fl"), "dataset '-x': invalid name"),
        (DS.format(name="a.b", layout="folder", images="fl"), "dataset 'a.b': invalid name"),
        (DS.format(name="fl", layout="folder", images="nowhere"),
         "dataset 'fl': image folder not found: "),
        ("datasets:\n  fl:\n    layout: folder\n", "dataset 'fl': missing 'images'"),
        ("datasets:\n  fl:\n    images: fl\n", "dataset 'fl': missing 'layout'"),
        (DS.format(name="ox", layout="oxford", images="ox/jpg"),
         "dataset 'ox': layout 'oxford' needs 'groundtruth' (a folder)"),
        (DS.format(name="rox", layout="revisited", images="ox/jpg"),
         "needs 'groundtruth' (a gnd_*.pkl file)"),
        (DS.format(name="ox", layout="oxford", images="ox/jpg") + "    groundtruth: nogt\n",
         "dataset 'ox': ground-truth folder not found: "),
        (DS.format(name="ox", layout="gnd", images="ox/jpg") + "    groundtruth: ox/gt\n",
         "dataset 'ox': ground-truth file not found: "),
        (DS.format(name="uk", layout="ukbench", images="fl") + "    groundtruth: ox/gt\n",
         "dataset 'uk': layout 'ukbench' takes no 'groundtruth'"),
        (DS.format(name="fl", layout="folder", images="fl") + "    groundtruth: ox/gt\n",
         "layout 'folder' takes no 'groundtruth'"),
        (DS.format(name="uk", layout="ukbench", images="fl"),
         "dataset 'uk': pca_from is required for a dataset with ground truth (the dataset "
         "whose features train its PCA or 'self-split')"),
        (DS.format(name="ox", layout="oxford", images="ox/jpg")
         + "    groundtruth: ox/gt\n    pca_from: self-split\n",
         "dataset 'ox': pca_from: self-split needs a layout that groups images"),
        (DS.format(name="uk", layout="ukbench", images="fl") + "    pca_from: uk\n",
         "dataset 'uk': pca_from names the dataset itself"),
        (DS.format(name="uk", layout="ukbench", images="fl") + "    pca_from: paris\n",
         "dataset 'uk': pca_from: unknown dataset 'paris' (known: uk)"),
        (DS.format(name="fl", layout="folder", images="fl") + "    shard_by: shards\n",
         "dataset 'fl': unknown shard_by 'shards' (expected one of folder, batch)"),
        (DS.format(name="fl", layout="folder", images="fl") + "    shard_size: 0\n",
         "dataset 'fl': shard_size must be >= 1, got 0"),
        (DS.format(name="fl", layout="folder", images="fl") + "    shard_size: '10'\n",
         "shard_size must be an integer"),
        (DS.format(name="fl", layout="folder", images="fl")
         + "    shard_by: folder\n    shard_size: 10\n",
         "dataset 'fl': shard_size only applies to shard_by: batch"),
        (DS.format(name="fl", layout="folder", images="fl") + "    query_protocol: box\n",
         "dataset 'fl': unknown query_protocol 'box' (expected one of paper, crop)"),
        (DS.format(name="fl", layout="folder", images="fl") + "    optional: yes please\n",
         "optional must be true or false"),
        (DS.format(name="fl", layout="folder", images="fl") + "    generate: magic\n",
         "dataset 'fl': unknown generator 'magic' (expected one of demo)"),
        (DS.format(name="fl", layout="folder", images="demo/other/jpg") + "    generate: demo\n",
         "dataset 'fl': generate: demo needs images '<root>/<part>/jpg'"),
        (DS.format(name="fl", layout="oxford", images="demo/demo-distractors/jpg")
         + "    groundtruth: demo/demo-distractors/gt\n    pca_from: fl2\n    generate: demo\n",
         "dataset 'fl': the demo part 'demo-distractors' has layout 'folder'"),
        (DS.format(name="fl", layout="folder", images="http://example.com/jpg"),
         "dataset 'fl': images must be a local path, got URL"),
        (DS.format(name="fl", layout="folder", images="fl") + "    backbone: alexnet\n",
         "dataset 'fl': unknown backbone 'alexnet' (expected one of"),
        (DS.format(name="fl", layout="folder", images="fl") + "    layer: block99\n",
         "dataset 'fl': backbone 'efficientnet_lite0' has no layer 'block99'"),
        (DS.format(name="fl", layout="folder", images="fl") + "    resize: huge\n",
         "dataset 'fl': invalid resize policy 'huge'"),
        (DS.format(name="fl", layout="folder", images="fl") + "    device: gpu0\n",
         "dataset 'fl': invalid device 'gpu0'"),
        (DS.format(name="fl", layout="folder", images="fl") + "    stored_classes: 0\n",
         "dataset 'fl': stored_classes must be in 1..1000, got 0"),
        (DS.format(name="fl", layout="folder", images="fl") + "    stored_classes: '8'\n",
         "dataset 'fl': stored_classes must be an integer, got '8'"),
        (DS.format(name="fl", layout="folder", images="fl") + "    box_classes: 9\n"
         + "    stored_classes: 8\n", "box_classes must be in 1..stored_classes (8), got 9"),
        ("search:\n  rerank:\n    query_classes: 0\n",
         "search: query_classes must be in 1..1000, got 0"),
        ("search:\n  rerank:\n    top_r: 10\n", "search: unknown key 'top_r'"),
        ("search:\n  rerank: 6\n", "search: expected a mapping, got int"),
        (DS.format(name="fl", layout="folder", images="fl") + "    batch_size: true\n",
         "batch_size must be an integer, got True"),
        ("defaults:\n  num_threads: 0\n", "defaults: num_threads must be >= 1, got 0"),
        ("defaults:\n  batch_pixels: 0\n", "defaults: batch_pixels must be >= 1, got 0"),
        (DS.format(name="fl", layout="folder", images="fl") + "    batch_pixels: 1000000.5\n",
         "dataset 'fl': batch_pixels must be an integer, got 1000000.5"),
        ("search:\n  n_pca: 0\n", "search: n_pca must be >= 1, got 0"),
        ("search:\n  pca_dims: -3\n", "search: pca_dims must be >= 1, got -3"),
        ("methods: [ofa, ofa+qe]\n", "methods: invalid method 'ofa+qe'"),
        ("methods: [ofa, ofa]\n", "methods: method 'ofa' is listed twice"),
        ("methods: []\n", "methods: methods must be a non-empty list"),
        ("methods: ofa\n", "methods must be a non-empty list, got 'ofa'"),
        ("warehouse: ''\n", "warehouse: warehouse must be a non-empty string"),
        ("datasets:\n  fl:\n    layout: folder\n    images: fl\n  fl:\n    layout: folder\n",
         "invalid YAML: while constructing a mapping"),
        ("datasets: [\n", "invalid YAML"),
        ("", "the file is empty"),
    ],
)  # fmt: skip
def test_invalid_configs(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in error_of(tmp_path, text)


def test_duplicate_yaml_key_names_the_key(tmp_path: Path) -> None:
    message = error_of(tmp_path, "warehouse: a\nwarehouse: b\n")
    assert "found duplicate key 'warehouse'" in message and "line 2" in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


EVAL = PAIR + "evaluations:\n  {name}:\n{body}"


@pytest.mark.parametrize(
    ("name", "body", "expected"),
    [
        ("e", "    dataset: nope\n",
         "evaluation 'e': unknown dataset 'nope' (known: flickr, oxford5k, paris6k)"),
        ("e", "    distractors: [flickr]\n", "evaluation 'e': dataset must be a non-empty"),
        ("e", "    dataset: flickr\n",
         "evaluation 'e': dataset 'flickr' has layout 'folder' and no ground truth"),
        ("e", "    dataset: oxford5k\n    distractors: [paris6k]\n",
         "evaluation 'e': distractor set 'paris6k' must have layout 'folder', not 'paris'"),
        ("e", "    dataset: oxford5k\n    distractors: [nope]\n",
         "evaluation 'e': unknown distractor set 'nope'"),
        ("e", "    dataset: oxford5k\n    distractors: flickr\n",
         "evaluation 'e': distractors must be a list of names"),
        ("e", "    dataset: oxford5k\n    distractors: [flickr, flickr]\n",
         "distractors lists a set twice"),
        ("e", "    dataset: oxford5k\n    schedule: every night\n",
         "evaluation 'e': invalid schedule 'every night'"),
        ("e", "    dataset: oxford5k\n    schedule: '0 3 * *'\n", "invalid schedule '0 3 * *'"),
        ("e", "    dataset: oxford5k\n    methods: [ofa+qe10+r5]\n",
         "evaluation 'e': invalid method 'ofa+qe10+r5'"),
        ("paris6k", "    dataset: oxford5k\n",
         "evaluation 'paris6k': the name is taken by dataset 'paris6k'"),
        ("E", "    dataset: oxford5k\n", "evaluation 'E': invalid name"),
        ("oxford5k_x", "    dataset: oxford5k\n  oxford5k-x:\n    dataset: oxford5k\n",
         "evaluation 'oxford5k-x': name clashes with evaluation 'oxford5k_x'"),
        ("oxford5k+x", "    dataset: oxford5k\n", "evaluation 'oxford5k+x': invalid name"),
    ],
)  # fmt: skip
def test_invalid_evaluations(tmp_path: Path, name: str, body: str, expected: str) -> None:
    assert expected in error_of(tmp_path, textwrap.dedent(EVAL).format(name=name, body=body))


def test_pca_source_must_have_compatible_features(tmp_path: Path) -> None:
    text = textwrap.dedent(PAIR).replace(
        "layout: paris", "layout: paris\n    backbone: efficientnet_lite2"
    )
    message = error_of(tmp_path, text)
    assert "dataset 'oxford5k': pca_from 'paris6k' has incompatible features" in message
    same_layer = textwrap.dedent(PAIR).replace("layout: paris", "layout: paris\n    layer: head")
    assert load_config(write(tmp_path, same_layer)).dataset("paris6k").extraction.layer == "head"
    other_layer = textwrap.dedent(PAIR).replace(
        "layout: paris", "layout: paris\n    layer: block15"
    )
    assert "incompatible features" in error_of(tmp_path, other_layer)


def test_distractors_must_have_compatible_features(tmp_path: Path) -> None:
    text = textwrap.dedent(PAIR).replace("images: fl", "images: fl\n    backbone: resnet50")
    text += "evaluations:\n  e:\n    dataset: oxford5k\n    distractors: [flickr]\n"
    assert "distractor set 'flickr' has incompatible features" in error_of(tmp_path, text)


def test_search_classes_must_be_stored(tmp_path: Path) -> None:
    stored = textwrap.dedent(PAIR) + "defaults:\n  stored_classes: 8\n"
    message = error_of(tmp_path, stored + "search:\n  aggregated_classes: 16\n")
    assert (
        "evaluation 'oxford5k': search.aggregated_classes = 16 exceeds the 8 classes stored "
        "per image (stored_classes) for dataset 'oxford5k'"
    ) in message
    text = stored + "search:\n  aggregated_classes: 8\n  n_pca: 9\n"
    assert "search.n_pca = 9 exceeds the 8 classes" in error_of(tmp_path, text)
    assert "for PCA source 'paris6k'" in error_of(tmp_path, text)


def test_rerank_query_classes_must_be_stored_when_a_method_reranks(tmp_path: Path) -> None:
    """The re-ranking's query classes are checked once, here, and only where a method
    re-ranks (no silent cap by the stored classes at search time)."""
    text = textwrap.dedent(PAIR) + "defaults:\n  stored_classes: 4\nsearch:\n"
    text += "  aggregated_classes: 4\n  n_pca: 2\n"
    assert load_pair(tmp_path, text[len(textwrap.dedent(PAIR)) :] + "methods: [ofa, ona+qe5]\n")
    message = error_of(tmp_path, text + "methods: [ofa, ofa+r10]\n")
    assert "search.rerank.query_classes = 6 exceeds the 4 classes stored per image" in message


def test_old_n_classes_keys_still_load_with_a_warning(tmp_path: Path) -> None:
    """The three ``n_classes`` knobs got names saying which number they are; the old YAML
    keys load (with a warning naming the new key), and both at once are an error."""
    config = load_pair(
        tmp_path, "defaults:\n  n_classes: 32\nsearch:\n  n_classes: 16\n  n_pca: 2\n"
    )
    assert config.dataset("oxford5k").extraction.stored_classes == 32
    assert config.search.aggregated_classes == 16
    assert any("'n_classes' is now called stored_classes" in w for w in config.warnings)
    assert any("'n_classes' is now called aggregated_classes" in w for w in config.warnings)
    message = error_of(tmp_path, "search:\n  n_classes: 16\n  aggregated_classes: 16\n")
    assert message.endswith(
        "search: 'n_classes' is the old name of 'aggregated_classes': set only 'aggregated_classes'"
    ), message


def test_dataset_name_clash_after_normalisation(tmp_path: Path) -> None:
    text = DS.format(name="a-b", layout="folder", images="fl") + "  a_b:\n"
    text += "    layout: folder\n    images: fl\n"
    assert "dataset 'a_b': name clashes with dataset 'a-b'" in error_of(tmp_path, text)


def test_config_error_parts() -> None:
    err = ConfigError("bad", source="x.yaml", entry="dataset 'a'")
    assert (err.source, err.entry, err.reason) == ("x.yaml", "dataset 'a'", "bad")
    assert str(err) == "x.yaml: dataset 'a': bad"
    assert str(ConfigError("bad")) == "bad"
    assert isinstance(UnknownNameError("x"), KeyError)
    assert LAYOUTS == ("oxford", "paris", "gnd", "revisited", "ukbench", "holidays", "folder")


def test_relative_config_path_gives_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, "datasets:\n  fl:\n    layout: folder\n    images: fl\n", folders=("fl",))
    monkeypatch.chdir(tmp_path)
    config = load_config("datasets.yaml")
    assert config.dataset("fl").images == tmp_path / "fl"
    assert config.warehouse == str(tmp_path / "warehouse")
    with pytest.raises(ConfigError, match=r"^datasets\.yaml:3: dataset 'fl': unknown key"):
        load_config(write(tmp_path, "datasets:\n  fl:\n    layot: folder\n").name)


@pytest.mark.parametrize(
    ("prefix", "line", "column"),
    [("", 1, 1), ("datasets:\n  fl:\n    layout: folder\n", 4, 16)],
)
def test_a_config_that_is_not_utf8_names_the_file_and_line(
    tmp_path: Path, prefix: str, line: int, column: int
) -> None:
    path = tmp_path / "datasets.yaml"
    body = "\u00e9" if not prefix else "    images: caf\u00e9\n"
    path.write_bytes(prefix.encode() + body.encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(
        f"{path}:{line}: not UTF-8 text: byte 0xe9 at column {column}"
    ), str(info.value)
    assert info.value.line == line


@pytest.mark.parametrize("layout", ["ukbench", "holidays"])
def test_a_self_split_dataset_cannot_be_evaluated_with_distractors(
    tmp_path: Path, layout: str
) -> None:
    text = (
        "datasets:\n"
        f"  uk:\n    layout: {layout}\n    images: uk\n    pca_from: self-split\n"
        "  fl:\n    layout: folder\n    images: fl\n"
        "evaluations:\n"
        "  uk-dist:\n    dataset: uk\n    distractors: [fl]\n"
    )
    message = error_of(tmp_path, text, folders=("uk", "fl"))
    assert message.startswith(f"{tmp_path / 'datasets.yaml'}:12: evaluation 'uk-dist': "), message
    assert "self-split" in message and "distractor" in message
    # Without distractors the same dataset loads (its implicit evaluation too).
    load_config(write(tmp_path, text.replace("    distractors: [fl]\n", ""), folders=()))
