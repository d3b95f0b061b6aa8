"""The feature store's I/O: atomic Parquet / bytes / JSON / PCA files under one root, over
fsspec, and the errors that name a file that does not decode.

Where each artefact lives is :mod:`cw_pipeline.store.layout`'s business; this module reads
and writes whatever relative path it is given. The root is a local folder or any fsspec URL
(``s3://bucket/prefix``, ``memory://name``, ``file:///abs/path``).

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

import copy
import io
import json
import os
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
from cw_pipeline.core.jsonsafe import dumps
from cw_pipeline.store.layout import (
    MAX_SHARD_COMPONENT,
    decode_component,
    relative_path,
    shard_path,
)

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


def _arrow_owned(data: bytes) -> pa.Buffer:
    """Copy ``data`` into Arrow-allocated memory.

    A buffer wrapping a Python object must take the GIL when Arrow's threads release it; if
    that happens while the interpreter shuts down, the process aborts ("terminate called
    without an active exception"). Arrow-owned memory has no such tie.
    """
    sink = pa.BufferOutputStream()
    sink.write(data)
    return sink.getvalue()


def _naming(exc: OSError, where: str, writer: str | None = None) -> OSError:
    """``exc`` naming the file being written and, when known, for what (``[Errno 28] No space
    left on device (writing for asset alpha/cam_features [part1]): '<path>'``), of the same
    type and errno when it has one."""
    reason = exc.strerror or str(exc)
    if writer:
        reason = f"{reason} (writing for {writer})"
    if exc.errno is not None:
        try:
            return type(exc)(exc.errno, reason, where)
        except TypeError:  # an OSError subclass with another signature
            return OSError(exc.errno, reason, where)
    return OSError(f"{where}: {reason}")


class FeatureStore:
    """Atomic Parquet / bytes / JSON files under ``root`` (a local path or an fsspec URL)."""

    #: The longest percent-encoded shard name a store file can hold (see layout).
    MAX_SHARD_COMPONENT = MAX_SHARD_COMPONENT

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
        #: What this store writes for (an asset and partition), named by its I/O errors.
        self.writer: str | None = None

    def writing_for(self, writer: str | None) -> FeatureStore:
        """This store, its I/O errors also naming ``writer`` (e.g. ``asset alpha/descriptors``)."""
        out = copy.copy(self)
        out.writer = writer
        return out

    def __repr__(self) -> str:
        return f"FeatureStore({self.root!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FeatureStore):
            return NotImplemented
        return (self.fs.protocol, self._base) == (other.fs.protocol, other._base)

    def __hash__(self) -> int:
        return hash((str(self.fs.protocol), self._base))

    # ---- paths ----------------------------------------------------------------------------

    _relpath = staticmethod(relative_path)

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

    #: ``<kind>/dataset=<dataset>/shard=<shard>.parquet``, see :func:`layout.shard_path`.
    shard_path = staticmethod(shard_path)

    # ---- atomic writes --------------------------------------------------------------------

    def _write_atomic(self, relpath: str, write: Callable[[IO[bytes]], None]) -> str:
        """Run ``write(fileobj)`` and publish the result at ``relpath`` atomically. An I/O
        error (disk full, read-only, permission denied, EIO) names the file being written."""
        path = self.path(relpath)
        try:
            if self._local:
                for attempt in range(3):
                    try:
                        self._write_local(path, write)
                        break
                    except FileNotFoundError:
                        # Its folder was removed meanwhile (another run cleaning up the same
                        # checkpoints): made again, and the file written again.
                        if attempt == 2:
                            raise
            else:
                buf = io.BytesIO()
                write(buf)
                self.fs.pipe_file(path, buf.getvalue())
        except OSError as exc:
            raise _naming(exc, self.url(relpath), self.writer) from exc
        return relpath

    @staticmethod
    def _write_local(path: str, write: Callable[[IO[bytes]], None]) -> None:
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

    def row_count(self, relpath: str) -> int:
        """The number of rows of a Parquet file, from its footer."""
        return int(self._parquet_file(relpath).metadata.num_rows)

    def read_schema(self, relpath: str) -> pa.Schema:
        """The Arrow schema of a Parquet file, from its footer."""
        return self._parquet_file(self._relpath([relpath])).schema_arrow

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
