"""The warehouse layout: the one place that names where each artefact lives in the store.

Paths are relative POSIX paths; names (datasets, shards, evaluations, methods ...) are
percent-encoded into path-safe components. Shards follow the hive-style layout
``<kind>/dataset=<dataset>/shard=<shard>.parquet`` (:func:`shard_path`); every other
artefact, and every folder a reader lists or watches, has its named function below. No other
module builds a warehouse path.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


_ENCODED_RE = re.compile(r"(?:[A-Za-z0-9._-]|%[0-9A-Fa-f]{2})+")


_KIND_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


_SHARD_FILE_RE = re.compile(r"shard=([^/]+)\.parquet")


_DATASET_DIR_RE = re.compile(r"dataset=([^/]+)")


def encode_component(name: str) -> str:
    """Make ``name`` a safe path component: ``[A-Za-z0-9._-]`` kept, other UTF-8 bytes as
    ``%XX``, a leading ``.`` as ``%2E`` (no hidden files, no ``.``/``..``). Reversible with
    :func:`decode_component`."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a shard or dataset name must be a non-empty string, got {name!r}")
    out = []
    for i, ch in enumerate(name):
        if ch in _SAFE and not (i == 0 and ch == "."):
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8"))
    return "".join(out)


def bounded_component(name: str, limit: int = 200) -> str:
    """:func:`encode_component` of ``name`` when at most ``limit`` characters, else its first
    48 encoded characters, ``~`` and 16 hex digits of the SHA-1 of ``name`` (not reversible).

    For file names made from free text (image ids in report file names): at most ``limit``
    characters, and distinct for distinct names (an encoded name never holds a raw ``~``).
    """
    encoded = encode_component(name)
    if len(encoded) <= limit:
        return encoded
    cut = 48
    pct = encoded.rfind("%", 0, cut)
    if pct > cut - 3:  # do not split a %XX escape
        cut = pct
    digest = hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return f"{encoded[:cut]}~{digest}"


def decode_component(text: str) -> str:
    """Inverse of :func:`encode_component`; ValueError on text it cannot have produced."""
    if not _ENCODED_RE.fullmatch(text):
        raise ValueError(f"not an encoded name: {text!r}")
    raw = bytearray()
    i = 0
    while i < len(text):
        if text[i] == "%":
            raw.append(int(text[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.extend(text[i].encode("ascii"))
            i += 1
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not an encoded name: {text!r} ({exc})") from None


def shard_name_from_path(path: str) -> str:
    """The shard name of a ``.../shard=<encoded>.parquet`` path (relative, absolute or URL)."""
    m = _SHARD_FILE_RE.fullmatch(path.rstrip("/").rsplit("/", 1)[-1])
    if m is None:
        raise ValueError(f"not a shard path (…/shard=<name>.parquet): {path!r}")
    return decode_component(m[1])


def parse_shard_path(path: str) -> tuple[str, str, str]:
    """``(kind, dataset, shard)`` of a ``<kind>/dataset=<ds>/shard=<shard>.parquet`` path."""
    parts = path.rstrip("/").split("/")
    m = _DATASET_DIR_RE.fullmatch(parts[-2]) if len(parts) >= 3 else None
    if m is None or not _KIND_RE.fullmatch(parts[-3]):
        raise ValueError(f"not a shard path (<kind>/dataset=<ds>/shard=<name>.parquet): {path!r}")
    return parts[-3], decode_component(m[1]), shard_name_from_path(path)


#: The longest percent-encoded shard name whose files fit in 255 bytes: the temporary
#: ``.shard=<name>.parquet.<32 hex>.tmp`` of an atomic write.
MAX_SHARD_COMPONENT = 255 - len(".shard=.parquet..tmp") - 32


def relative_path(parts: Sequence[str], *, allow_root: bool = False) -> str:
    """``parts`` joined into a relative store path, refused (ValueError naming it) when it has
    empty, ``.`` or ``..`` parts or a backslash; empty only with ``allow_root``."""
    pieces = [p for part in parts for p in str(part).split("/")]
    text = "/".join(pieces)
    if not text and allow_root:
        return ""
    if not text or any(p in ("", ".", "..") for p in pieces) or "\\" in text:
        raise ValueError(
            f"invalid store path {text!r}: use a relative 'a/b/c' path without '.', '..' "
            "or empty parts"
        )
    return text


def shard_path(kind: str, dataset: str, shard: str) -> str:
    """``<kind>/dataset=<dataset>/shard=<shard>.parquet`` with names made path-safe."""
    if not isinstance(kind, str) or not _KIND_RE.fullmatch(kind):
        raise ValueError(f"invalid kind {kind!r}: use [A-Za-z0-9_.-], not starting with '.'")
    encoded = encode_component(shard)
    if len(encoded) > MAX_SHARD_COMPONENT:
        raise ValueError(
            f"shard name {shard!r} is {len(encoded)} characters once percent-encoded, over "
            f"the {MAX_SHARD_COMPONENT} a store file name can hold (shard keys "
            "from cw_pipeline.compute.shards.shard_key are always short enough)"
        )
    return f"{kind}/dataset={encode_component(dataset)}/shard={encoded}.parquet"


# --------------------------------------------------------------------------------------------
# the warehouse layout: one named path per artefact (relative to the store's root)
# --------------------------------------------------------------------------------------------

#: Kinds of per-shard tables: ``<kind>/dataset=<ds>/shard=<shard>.parquet``.
MANIFEST = "manifest"
FEATURES = "cam_features"
REJECTED = "rejected"
SHARD_KINDS = (MANIFEST, FEATURES, REJECTED)
#: Top-level folder of the per-batch checkpoints (outside every reader's prefix).
CHECKPOINTS = "_checkpoints"


def _ds(dataset: str) -> str:
    return f"dataset={encode_component(dataset)}"


def _ev(evaluation: str) -> str:
    return f"evaluation={encode_component(evaluation)}"


def manifest_path(dataset: str, shard: str) -> str:
    """``manifest/dataset=<ds>/shard=<shard>.parquet``: the files of one shard."""
    return shard_path(MANIFEST, dataset, shard)


def features_path(dataset: str, shard: str) -> str:
    """``cam_features/dataset=<ds>/shard=<shard>.parquet``: the CAM features of one shard."""
    return shard_path(FEATURES, dataset, shard)


def rejected_path(dataset: str, shard: str) -> str:
    """``rejected/dataset=<ds>/shard=<shard>.parquet``: a shard's unreadable images."""
    return shard_path(REJECTED, dataset, shard)


def shard_folder(kind: str, dataset: str) -> str:
    """``<kind>/dataset=<ds>``: the folder of a dataset's shards of one kind (for listing)."""
    if kind not in SHARD_KINDS:
        raise ValueError(f"unknown shard kind {kind!r} (known: {', '.join(SHARD_KINDS)})")
    return f"{kind}/{_ds(dataset)}"


def plan_path(dataset: str) -> str:
    """``plans/<ds>.json``: the bucket count of a ``shard_by: batch`` dataset."""
    return f"plans/{encode_component(dataset)}.json"


def checkpoint_folder(kind: str, dataset: str, shard: str) -> str:
    """``_checkpoints/<kind>/dataset=<ds>/shard=<shard>``: the per-batch checkpoints of a
    shard being built (validates the names like :meth:`FeatureStore.shard_path`)."""
    shard_path(kind, dataset, shard)
    return f"{CHECKPOINTS}/{kind}/{_ds(dataset)}/shard={encode_component(shard)}"


def query_features_path(dataset: str) -> str:
    """``query_features/dataset=<ds>/queries.parquet``: the features of a dataset's queries."""
    return f"query_features/{_ds(dataset)}/queries.parquet"


def pca_folder(dataset: str) -> str:
    """``pca/dataset=<ds>``: the folder of a dataset's PCA models (for listing)."""
    return f"pca/{_ds(dataset)}"


def pca_path(
    dataset: str, space: str, half: int | None = None, generation: str | None = None
) -> str:
    """``pca/dataset=<ds>/generation=<g>/<space>[-half<k>]``: a PCA model, without suffix
    (the store holds ``.npz`` + ``.json``; see :meth:`FeatureStore.write_pca`). ``half``: 1 or
    2 for the two models of a self-split dataset. Without ``generation``, the path of stores
    written before commit points (read when a dataset has no ``pca`` pointer)."""
    if half not in (None, 1, 2):
        raise ValueError(f"a PCA half is 1 or 2, got {half!r}")
    suffix = "" if half is None else f"-half{half}"
    return f"{_in(pca_folder(dataset), generation)}/{encode_component(space)}{suffix}"


def descriptors_folder(dataset: str) -> str:
    """``descriptors/dataset=<ds>``: the folder of a dataset's offline descriptors."""
    return f"descriptors/{_ds(dataset)}"


def descriptors_path(dataset: str, aggregation: str, generation: str | None = None) -> str:
    """``descriptors/dataset=<ds>/generation=<g>/<aggregation>.parquet``: a dataset's offline
    descriptors (without ``generation``: where stores before commit points kept them)."""
    folder = _in(descriptors_folder(dataset), generation)
    return f"{folder}/{encode_component(aggregation)}.parquet"


def distractor_descriptors_folder(
    evaluation: str, distractors: str | None = None, aggregation: str | None = None
) -> str:
    """``distractor_descriptors/evaluation=<ev>[/set=<d>[/agg=<a>]]``: the distractor
    descriptors of one evaluation, of one of its sets, or of one set's aggregation (for
    listing)."""
    folder = f"distractor_descriptors/{_ev(evaluation)}"
    if distractors is None:
        if aggregation is not None:
            raise ValueError(f"aggregation {aggregation!r} given without a distractor set")
        return folder
    folder = f"{folder}/set={encode_component(distractors)}"
    return folder if aggregation is None else f"{folder}/agg={encode_component(aggregation)}"


def distractor_descriptors_path(
    evaluation: str, distractors: str, aggregation: str, shard: str
) -> str:
    """``distractor_descriptors/evaluation=<ev>/set=<d>/agg=<a>/shard=<s>.parquet``: the
    descriptors of one distractor shard under one evaluation's PCA."""
    folder = distractor_descriptors_folder(evaluation, distractors, aggregation)
    return f"{folder}/shard={encode_component(shard)}.parquet"


def rankings_folder(evaluation: str) -> str:
    """``rankings/evaluation=<ev>``: the folder of an evaluation's rankings."""
    return f"rankings/{_ev(evaluation)}"


def rankings_path(evaluation: str, method: str, generation: str | None = None) -> str:
    """``rankings/evaluation=<ev>/generation=<g>/method=<m>.parquet``: one method's rankings
    (without ``generation``: where stores before commit points kept them)."""
    folder = _in(rankings_folder(evaluation), generation)
    return f"{folder}/method={encode_component(method)}.parquet"


def ranked_database_path(evaluation: str, generation: str) -> str:
    """``rankings/evaluation=<ev>/generation=<g>/database.parquet``: the database a generation
    of rankings ranked (image ids in order, and the dataset of each)."""
    return f"{_in(rankings_folder(evaluation), generation)}/database.parquet"


# ---- commit points (see cw_pipeline.store.commits) ------------------------------------------

#: What is published as one unit: a dataset's PCA models, its descriptors (its ``index``),
#: an evaluation's rankings.
COMMIT_UNITS = ("pca", "index", "rankings")
_UNIT_FOLDERS = {
    ("pca", "dataset"): pca_folder,
    ("index", "dataset"): descriptors_folder,
    ("rankings", "evaluation"): rankings_folder,
}
_GENERATION_RE = re.compile(r"[0-9A-Za-z._-]+")


def _in(folder: str, generation: str | None) -> str:
    if generation is None:
        return folder
    if not _GENERATION_RE.fullmatch(generation) or generation in (".", ".."):
        raise ValueError(f"invalid generation name {generation!r}")
    return f"{folder}/generation={generation}"


def commit_path(owner_kind: str, owner: str, unit: str) -> str:
    """``commits/<dataset|evaluation>=<name>/<unit>.json``: the pointer to the current
    generation of ``unit`` (see :mod:`cw_pipeline.store.commits`)."""
    if owner_kind not in ("dataset", "evaluation") or unit not in COMMIT_UNITS:
        raise ValueError(f"no commit unit {unit!r} for a {owner_kind!r}")
    return f"commits/{owner_kind}={encode_component(owner)}/{unit}.json"


def commits_folder(owner_kind: str, owner: str) -> str:
    """``commits/<dataset|evaluation>=<name>``: an owner's pointers (watched by readers)."""
    if owner_kind not in ("dataset", "evaluation"):
        raise ValueError(f"commits belong to a dataset or an evaluation, not {owner_kind!r}")
    return f"commits/{owner_kind}={encode_component(owner)}"


def generations_folder(unit: str, owner_kind: str, owner: str) -> str | None:
    """The folder holding the generations of ``unit`` of ``owner`` (None: it has none)."""
    folder = _UNIT_FOLDERS.get((unit, owner_kind))
    return None if folder is None else folder(owner)


def generation_folder(unit: str, owner_kind: str, owner: str, generation: str) -> str:
    """``<unit folder>/generation=<g>``: the files of one generation."""
    folder = generations_folder(unit, owner_kind, owner)
    if folder is None:
        raise ValueError(f"no commit unit {unit!r} for a {owner_kind!r}")
    return _in(folder, generation)


#: Top-level folder of the kept feature maps (content-addressed: by extraction and image sha1).
FEATURE_MAPS = "feature_maps"
_SHA1_RE = re.compile(r"[0-9a-f]{40}")


def feature_maps_folder(extraction: str | None = None) -> str:
    """``feature_maps[/extraction=<code version>]``: the kept feature maps (for listing)."""
    if extraction is None:
        return FEATURE_MAPS
    return f"{FEATURE_MAPS}/extraction={encode_component(extraction)}"


def feature_maps_path(extraction: str, sha1: str) -> str:
    """``feature_maps/extraction=<v>/<sha1[:2]>/<sha1>.npz``: the float16 feature maps (X, and
    A when it differs) of one image content under one extraction's settings, kept for online
    aggregation and re-ranking so that no image gets a second forward pass."""
    if not _SHA1_RE.fullmatch(sha1):
        raise ValueError(f"not a sha1 hex digest: {sha1!r}")
    return f"{feature_maps_folder(extraction)}/{sha1[:2]}/{sha1}.npz"


def pair_cache_path(evaluation: str, kind: str) -> str:
    """``pair_cache/evaluation=<ev>/<kind>.parquet``: values of (query, image) pairs kept by an
    evaluation's rankings (``region_scores``: best CAM-box region score; ``ona``: the OnA
    descriptor), so that a refresh computes only pairs it has not seen."""
    if not _KIND_RE.fullmatch(kind):
        raise ValueError(f"invalid pair cache kind {kind!r}")
    return f"pair_cache/{_ev(evaluation)}/{kind}.parquet"


#: The files of a report folder that other commands read (beside its figures).
REPORT_MARKDOWN = "report.md"
REPORT_JSON = "report.json"
REPORT_PER_QUERY = "per_query_ap.csv"


def report_folder(evaluation: str) -> str:
    """``<ev>``: an evaluation's report folder, relative to the *reports* root."""
    return encode_component(evaluation)


def report_path(evaluation: str, *parts: str) -> str:
    """``<ev>/<parts...>``: a file of an evaluation's report folder (:data:`REPORT_MARKDOWN`,
    :data:`REPORT_JSON`, :data:`REPORT_PER_QUERY`, the figures ``queries/<q>.png`` ...),
    relative to the reports root."""
    return relative_path([report_folder(evaluation), *parts])
