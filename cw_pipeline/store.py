"""The feature store: Parquet shards and small files under one root, over fsspec (no Dagster).

The root is a local folder or any fsspec URL (``s3://bucket/prefix``, ``memory://name``,
``file:///abs/path``). Paths inside the store are relative POSIX paths; shards follow the
hive-style layout ``<kind>/dataset=<dataset>/shard=<shard>.parquet`` (:meth:`shard_path`).

This module owns the warehouse layout: every artefact of the pipeline has a named path here
(:func:`manifest_path`, :func:`features_path`, :func:`rejected_path`, :func:`plan_path`,
:func:`checkpoint_folder`, :func:`query_features_path`, :func:`pca_path`,
:func:`descriptors_path`, :func:`distractor_descriptors_path`, :func:`rankings_path`, and
:func:`report_path` under the reports root), and every folder a reader lists or watches has
one too (:func:`shard_folder`, :func:`pca_folder`, :func:`descriptors_folder`,
:func:`distractor_descriptors_folder`); no other module builds a warehouse path. PCA models
are stored one way, by :meth:`FeatureStore.write_pca` / :meth:`FeatureStore.read_pca`.

Writes are atomic, so readers never see a partial file and concurrent writers of one path
leave one complete file (the last rename wins):

* local files are written to ``.<name>.<uuid>.tmp`` in the target folder, fsynced, then
  moved into place with :func:`os.replace`;
* other filesystems (object stores, ``memory://``) get the final key in a single put, which
  is atomic there: an S3 object appears complete or not at all (a multipart upload, used
  above 100 MiB, is aborted on failure and never visible). The data is built in memory first,
  so a writer that fails leaves nothing behind, and there are no temporary keys.

On S3-compatible stores (``s3://bucket/prefix``, through s3fs) endpoint and credentials come
from the standard variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``, ``AWS_PROFILE``) or
``storage_options``; directory listings are not cached, so files written by other processes
are seen at once.

Temporary files start with ``.`` and never end in ``.parquet``; :meth:`FeatureStore.list`
and :meth:`FeatureStore.dataset` skip every name starting with ``.``. Parquet files are
zstd-compressed and carry page checksums, verified on read: a truncated or damaged file
raises :class:`CorruptShardError` naming it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

import fsspec
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from cw_pipeline.core.aggregation import PCAWhitening

__all__ = [
    "FEATURES",
    "MANIFEST",
    "REJECTED",
    "REPORT_JSON",
    "REPORT_MARKDOWN",
    "REPORT_PER_QUERY",
    "SHARD_KINDS",
    "CorruptFileError",
    "CorruptShardError",
    "FeatureStore",
    "bounded_component",
    "checkpoint_folder",
    "decode_component",
    "descriptors_folder",
    "descriptors_path",
    "distractor_descriptors_folder",
    "distractor_descriptors_path",
    "encode_component",
    "features_path",
    "manifest_path",
    "parse_shard_path",
    "pca_folder",
    "pca_path",
    "plan_path",
    "query_features_path",
    "rankings_path",
    "rejected_path",
    "report_folder",
    "report_path",
    "shard_folder",
    "shard_name_from_path",
]

_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
_ENCODED_RE = re.compile(r"(?:[A-Za-z0-9._-]|%[0-9A-Fa-f]{2})+")
_KIND_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_SHARD_FILE_RE = re.compile(r"shard=([^/]+)\.parquet")
_DATASET_DIR_RE = re.compile(r"dataset=([^/]+)")
_PARQUET = ".parquet"
#: Object stores whose fsspec filesystems cache directory listings (turned off, see __init__).
_LISTING_CACHE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az"})


class CorruptFileError(ValueError):
    """A file in the store exists but cannot be decoded; ``str()`` names it and the reason."""

    def __init__(self, relpath: str, reason: str, location: str | None = None) -> None:
        super().__init__(relpath, reason, location)
        self.relpath = relpath
        self.reason = reason
        self.location = location or relpath

    def __str__(self) -> str:
        return f"corrupt or unreadable file '{self.location}': {self.reason}"


class CorruptShardError(CorruptFileError):
    """A Parquet file is truncated or damaged (``relpath``, ``reason``, ``location``)."""

    def __str__(self) -> str:
        return f"corrupt or truncated Parquet file '{self.location}': {self.reason}"


# --------------------------------------------------------------------------------------------
# shard names
# --------------------------------------------------------------------------------------------


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


def _arrow_owned(data: bytes) -> pa.Buffer:
    """Copy ``data`` into Arrow-allocated memory.

    A buffer wrapping a Python object must take the GIL when Arrow's threads release it; if
    that happens while the interpreter shuts down, the process aborts ("terminate called
    without an active exception"). Arrow-owned memory has no such tie.
    """
    sink = pa.BufferOutputStream()
    sink.write(data)
    return sink.getvalue()


# --------------------------------------------------------------------------------------------
# the store
# --------------------------------------------------------------------------------------------


class FeatureStore:
    """Atomic Parquet / bytes / JSON files under ``root`` (a local path or an fsspec URL)."""

    #: The longest percent-encoded shard name whose files fit in 255 bytes: the temporary
    #: ``.shard=<name>.parquet.<32 hex>.tmp`` of an atomic write.
    MAX_SHARD_COMPONENT = 255 - len(".shard=.parquet..tmp") - 32

    def __init__(self, root: str | os.PathLike[str], **storage_options: Any) -> None:
        self.root = os.fspath(root)
        self.storage_options = dict(storage_options)
        if fsspec.core.split_protocol(self.root)[0] in _LISTING_CACHE_PROTOCOLS:
            # Other processes (workers, the daemon) write under the same prefix: a cached
            # listing would hide their files from exists() and list().
            self.storage_options.setdefault("use_listings_cache", False)
        storage_options = self.storage_options
        self.fs, base = fsspec.core.url_to_fs(self.root, **storage_options)
        self._base = base.rstrip("/") or "/"
        self._local = isinstance(self.fs, LocalFileSystem)

    def __repr__(self) -> str:
        return f"FeatureStore({self.root!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FeatureStore):
            return NotImplemented
        return (self.fs.protocol, self._base) == (other.fs.protocol, other._base)

    def __hash__(self) -> int:
        return hash((str(self.fs.protocol), self._base))

    # ---- paths ----------------------------------------------------------------------------

    @staticmethod
    def _relpath(parts: Sequence[str], *, allow_root: bool = False) -> str:
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

    def path(self, *parts: str) -> str:
        """The filesystem path (without protocol) of a relative path; no parts: the root."""
        rel = self._relpath(parts, allow_root=True)
        if not rel:
            return self._base
        return f"{self._base.rstrip('/')}/{rel}"

    def url(self, *parts: str) -> str:
        """A displayable location: a local path, or the URL with its protocol."""
        path = self.path(*parts)
        return path if self._local else self.fs.unstrip_protocol(path)

    @staticmethod
    def shard_path(kind: str, dataset: str, shard: str) -> str:
        """``<kind>/dataset=<dataset>/shard=<shard>.parquet`` with names made path-safe."""
        if not isinstance(kind, str) or not _KIND_RE.fullmatch(kind):
            raise ValueError(f"invalid kind {kind!r}: use [A-Za-z0-9_.-], not starting with '.'")
        encoded = encode_component(shard)
        if len(encoded) > FeatureStore.MAX_SHARD_COMPONENT:
            raise ValueError(
                f"shard name {shard!r} is {len(encoded)} characters once percent-encoded, over "
                f"the {FeatureStore.MAX_SHARD_COMPONENT} a store file name can hold (shard keys "
                "from cw_pipeline.compute.shards.shard_key are always short enough)"
            )
        return f"{kind}/dataset={encode_component(dataset)}/shard={encoded}.parquet"

    # ---- atomic writes --------------------------------------------------------------------

    def _write_atomic(self, relpath: str, write: Callable[[IO[bytes]], None]) -> str:
        """Run ``write(fileobj)`` and publish the result at ``relpath`` atomically."""
        path = self.path(relpath)
        if self._local:
            folder, name = path.rsplit("/", 1)
            os.makedirs(folder, exist_ok=True)
            tmp = f"{folder}/.{name}.{uuid.uuid4().hex}.tmp"
            try:
                with open(tmp, "wb") as fh:
                    write(fh)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:  # never created (or its name refused): keep the first error
                    pass
                raise
        else:
            buf = io.BytesIO()
            write(buf)
            self.fs.pipe_file(path, buf.getvalue())
        return relpath

    def write_bytes(self, relpath: str, data: bytes) -> str:
        """Write ``data`` at ``relpath`` atomically; returns ``relpath``."""
        return self._write_atomic(self._relpath([relpath]), lambda fh: fh.write(bytes(data)))

    def read_bytes(self, relpath: str) -> bytes:
        """The bytes at ``relpath`` (FileNotFoundError naming it when absent)."""
        path = self.path(relpath)
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"not in the feature store: {self.url(relpath)}") from None

    def write_json(self, relpath: str, obj: Any, *, indent: int | None = 2) -> str:
        """Write ``obj`` as strict UTF-8 JSON (sorted keys, stable bytes; NaN and infinities
        become ``null``) atomically."""
        from cw_pipeline.core.jsonsafe import dumps

        text = dumps(obj, indent=indent, sort_keys=True, ensure_ascii=False)
        return self.write_bytes(relpath, (text + "\n").encode("utf-8"))

    def read_json(self, relpath: str) -> Any:
        """Parse the JSON at ``relpath``; :class:`CorruptFileError` if it does not parse."""
        data = self.read_bytes(relpath)
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise CorruptFileError(relpath, f"invalid JSON ({exc})", self.url(relpath)) from None

    def write_table(
        self, relpath: str, table: pa.Table, metadata: Mapping[str, str] | None = None
    ) -> str:
        """Write ``table`` as zstd Parquet with page checksums, atomically.

        ``metadata`` (str -> str) is merged into the schema metadata and comes back from
        :meth:`read_table` (``table.schema.metadata``) and :meth:`read_metadata`.
        """
        relpath = self._relpath([relpath])
        if not relpath.endswith(_PARQUET):
            raise ValueError(f"a table path must end with {_PARQUET!r}: {relpath!r}")
        if metadata:
            bad = [
                k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)
            ]
            if bad:
                raise TypeError(f"metadata keys and values must be strings: {bad!r}")
            merged = dict(table.schema.metadata or {})
            merged.update({k.encode(): v.encode() for k, v in metadata.items()})
            table = table.replace_schema_metadata(merged)

        # Dictionary encoding only for text: on the large numeric list columns (class vectors)
        # it made writes 1.5x and reads 2.5x slower for 7 % less space (1,000-row shard).
        text = [f.name for f in table.schema if pa.types.is_string(f.type)]

        def write(fh: IO[bytes]) -> None:
            pq.write_table(
                table, fh, compression="zstd", write_page_checksum=True, use_dictionary=text
            )

        return self._write_atomic(relpath, write)

    # ---- reading tables -------------------------------------------------------------------

    def _parquet_file(self, relpath: str) -> pq.ParquetFile:
        """Open a Parquet file: native reads locally, one whole-object fetch elsewhere (no
        Python callbacks from Arrow's I/O threads, which can abort the interpreter at exit)."""
        path = self.path(relpath)
        try:
            if self._local:
                source: Any = path
            else:
                source = pa.BufferReader(_arrow_owned(self.fs.cat_file(path)))
            return pq.ParquetFile(source, page_checksum_verification=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"not in the feature store: {self.url(relpath)}") from None
        except IsADirectoryError:
            raise
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise CorruptShardError(relpath, str(exc), self.url(relpath)) from None

    def read_table(self, relpath: str, columns: Sequence[str] | None = None) -> pa.Table:
        """Read a Parquet file (optionally some columns).

        Raises:
            FileNotFoundError: no such file.
            KeyError: a requested column is not in the file.
            CorruptShardError: the file is truncated or damaged (names the file).
        """
        relpath = self._relpath([relpath])
        pf = self._parquet_file(relpath)
        if columns is not None:
            missing = [c for c in columns if c not in pf.schema_arrow.names]
            if missing:
                raise KeyError(
                    f"{self.url(relpath)}: no column(s) {missing} (has {pf.schema_arrow.names})"
                )
        try:
            return pf.read(columns=list(columns) if columns is not None else None)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise CorruptShardError(relpath, str(exc), self.url(relpath)) from None

    def read_metadata(self, relpath: str) -> dict[str, str]:
        """The schema metadata of a Parquet file, decoded as text."""
        meta = self._parquet_file(self._relpath([relpath])).schema_arrow.metadata or {}
        return {k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in meta.items()}

    # ---- PCA models -----------------------------------------------------------------------

    def write_pca(self, relbase: str, model: PCAWhitening) -> str:
        """Write a PCA model as ``<relbase>.npz`` (its arrays, no pickles) and
        ``<relbase>.json`` (its metadata), each atomically; returns ``relbase``."""
        relbase = self._relpath([relbase])
        self.write_bytes(f"{relbase}.npz", model.npz_bytes())
        self.write_json(f"{relbase}.json", model.metadata)
        return relbase

    def read_pca(self, relbase: str) -> PCAWhitening:
        """The PCA model written by :meth:`write_pca` at ``relbase``.

        Raises:
            FileNotFoundError: the ``.npz`` or the ``.json`` is missing (names it).
            CorruptFileError: either does not decode, or the arrays do not fit (names it).
        """
        relbase = self._relpath([relbase])
        npz = f"{relbase}.npz"
        data = self.read_bytes(npz)
        metadata = self.read_pca_metadata(relbase)
        try:
            return PCAWhitening.from_npz_bytes(data, metadata)
        except ValueError as exc:
            raise CorruptFileError(npz, str(exc), self.url(npz)) from None

    def read_pca_metadata(self, relbase: str) -> dict[str, Any]:
        """The metadata of the PCA model at ``relbase`` (its ``.json``), without its arrays.

        Raises:
            FileNotFoundError: the ``.json`` is missing (names it).
            CorruptFileError: it does not decode, or is no JSON object (names it).
        """
        meta = f"{self._relpath([relbase])}.json"
        metadata = self.read_json(meta)
        if not isinstance(metadata, dict):
            reason = f"PCA metadata must be a JSON object, not {type(metadata).__name__}"
            raise CorruptFileError(meta, reason, self.url(meta))
        return metadata

    def pca_exists(self, relbase: str) -> bool:
        """Whether both files of the PCA model at ``relbase`` exist."""
        relbase = self._relpath([relbase])
        return self.exists(f"{relbase}.npz") and self.exists(f"{relbase}.json")

    # ---- listing and deleting -------------------------------------------------------------

    def exists(self, relpath: str) -> bool:
        """Whether a file or folder exists at ``relpath``."""
        return bool(self.fs.exists(self.path(relpath)))

    def delete(self, relpath: str, *, recursive: bool = False) -> bool:
        """Delete a file (or, with ``recursive``, a folder); False when nothing was there."""
        path = self.path(self._relpath([relpath]))
        if not self.fs.exists(path):
            return False
        if self.fs.isdir(path) and not recursive:
            raise IsADirectoryError(f"{self.url(relpath)} is a folder; pass recursive=True")
        self.fs.rm(path, recursive=recursive)
        return True

    def list(self, prefix: str = "", suffix: str | None = _PARQUET) -> list[str]:
        """Sorted relative paths of the files under the folder ``prefix`` ending in ``suffix``
        (None: any), skipping hidden and temporary names (any part starting with ``.``)."""
        top = self.path(prefix) if prefix else self._base
        try:
            found = self.fs.find(top)
        except FileNotFoundError:
            return []
        base = self._base.rstrip("/") + "/"
        out = []
        for full in found:
            full = self.fs._strip_protocol(full)
            if not full.startswith(base):
                continue
            rel = full[len(base) :]
            if any(part.startswith(".") for part in rel.split("/")):
                continue
            if suffix and not rel.endswith(suffix):
                continue
            out.append(rel)
        return sorted(out)

    def dataset(
        self,
        prefix: str = "",
        *,
        schema: pa.Schema | None = None,
        partitioning: str | None = None,
    ) -> pads.Dataset:
        """A :class:`pyarrow.dataset.Dataset` over every ``*.parquet`` under ``prefix``.

        Local stores scan the files lazily. Other stores fetch the files under ``prefix``
        (in parallel where the filesystem allows) when the dataset is built and decode them
        lazily; narrow ``prefix`` for large remote stores. ``partitioning="hive"`` adds the
        ``key=value`` folder levels below ``prefix`` (e.g. ``dataset``) as string columns.
        The schema is ``schema`` or the first file's. With no files, an empty dataset needs
        ``schema``; otherwise FileNotFoundError.
        """
        if partitioning not in (None, "hive"):
            raise ValueError(f"partitioning must be None or 'hive', got {partitioning!r}")
        rels = self.list(prefix)
        if not rels and schema is None:
            raise FileNotFoundError(f"no Parquet files under {self.url(prefix)}")
        files = [self.path(rel) for rel in rels]
        if self._local:
            return pads.dataset(
                files,
                schema=schema,
                format="parquet",
                filesystem=pafs.LocalFileSystem(),
                partitioning=partitioning,
                partition_base_dir=self.path(prefix) if partitioning else None,
            )
        fmt = pads.ParquetFileFormat()
        blobs = self.fs.cat(files, on_error="raise") if files else {}
        fragments = []
        keys: list[str] = []
        for rel, full in zip(rels, files, strict=True):
            data = blobs.get(full)
            if data is None:  # some filesystems key the answer with the protocol
                data = blobs[self.fs.unstrip_protocol(full)]
            expr = None
            if partitioning == "hive":
                below = rel[len(prefix.rstrip("/")) + 1 :] if prefix else rel
                for part in below.split("/")[:-1]:
                    key, eq, value = part.partition("=")
                    if not eq:
                        continue
                    try:
                        value = decode_component(value)
                    except ValueError:
                        pass
                    if key not in keys:
                        keys.append(key)
                    term = pads.field(key) == value
                    expr = term if expr is None else expr & term
            try:
                fragment = fmt.make_fragment(_arrow_owned(data), partition_expression=expr)
                physical = fragment.physical_schema
            except (pa.ArrowException, OSError, ValueError) as exc:
                raise CorruptShardError(rel, str(exc), self.url(rel)) from None
            fragments.append(fragment)
            if schema is None:
                schema = physical
        assert schema is not None
        for key in keys:
            if key not in schema.names:
                schema = schema.append(pa.field(key, pa.string()))
        return pads.FileSystemDataset(fragments, schema, fmt)


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
    return FeatureStore.shard_path(MANIFEST, dataset, shard)


def features_path(dataset: str, shard: str) -> str:
    """``cam_features/dataset=<ds>/shard=<shard>.parquet``: the CAM features of one shard."""
    return FeatureStore.shard_path(FEATURES, dataset, shard)


def rejected_path(dataset: str, shard: str) -> str:
    """``rejected/dataset=<ds>/shard=<shard>.parquet``: a shard's unreadable images."""
    return FeatureStore.shard_path(REJECTED, dataset, shard)


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
    FeatureStore.shard_path(kind, dataset, shard)
    return f"{CHECKPOINTS}/{kind}/{_ds(dataset)}/shard={encode_component(shard)}"


def query_features_path(dataset: str) -> str:
    """``query_features/dataset=<ds>/queries.parquet``: the features of a dataset's queries."""
    return f"query_features/{_ds(dataset)}/queries.parquet"


def pca_folder(dataset: str) -> str:
    """``pca/dataset=<ds>``: the folder of a dataset's PCA models (for listing)."""
    return f"pca/{_ds(dataset)}"


def pca_path(dataset: str, space: str, half: int | None = None) -> str:
    """``pca/dataset=<ds>/<space>[-half<k>]``: a PCA model, without suffix (the store holds
    ``.npz`` + ``.json``; see :meth:`FeatureStore.write_pca`). ``half``: 1 or 2 for the two
    models of a self-split dataset."""
    if half not in (None, 1, 2):
        raise ValueError(f"a PCA half is 1 or 2, got {half!r}")
    suffix = "" if half is None else f"-half{half}"
    return f"{pca_folder(dataset)}/{encode_component(space)}{suffix}"


def descriptors_folder(dataset: str) -> str:
    """``descriptors/dataset=<ds>``: the folder of a dataset's offline descriptors."""
    return f"descriptors/{_ds(dataset)}"


def descriptors_path(dataset: str, aggregation: str) -> str:
    """``descriptors/dataset=<ds>/<aggregation>.parquet``: a dataset's offline descriptors."""
    return f"{descriptors_folder(dataset)}/{encode_component(aggregation)}.parquet"


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


def rankings_path(evaluation: str, method: str) -> str:
    """``rankings/evaluation=<ev>/method=<m>.parquet``: one method's rankings."""
    return f"rankings/{_ev(evaluation)}/method={encode_component(method)}.parquet"


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
    return FeatureStore._relpath([report_folder(evaluation), *parts])
