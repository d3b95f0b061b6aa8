"""Per-batch checkpoints of a shard being built, so that a killed run loses at most one batch.

While a feature shard is computed, the rows of every batch are written as their own small
Parquet file (atomically, like every store write) under

    _checkpoints/<kind>/dataset=<ds>/shard=<shard>/part-<run>-<n>.parquet

with the features' code version in the file's metadata. The shard file itself is written once,
at the end, from the stored rows plus the new ones; then the checkpoints are deleted. A run that
finds checkpoints (the previous run of the shard was killed, or one is still running) reuses
their rows by sha1, like the rows of the stored shard, so only images without stored features
get a forward pass.

Readers never look under ``_checkpoints/``: the shard file is the only published result. A
checkpoint of another code version, or one that does not decode, is ignored (and deleted with
the rest when the shard is complete). Two runs of one shard at once may read each other's
checkpoints: rows with equal sha1 and code version are equal (extraction is deterministic), so
either run's result is the same.
"""

from __future__ import annotations

import logging
import os
import time
import uuid

import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

from cw_pipeline.store import CHECKPOINTS, CorruptFileError, FeatureStore, checkpoint_folder

__all__ = ["CHECKPOINT_ROOT", "ShardCheckpoints"]

logger = logging.getLogger(__name__)

#: Top-level folder of the checkpoints in the store (outside every reader's prefix).
CHECKPOINT_ROOT = CHECKPOINTS
#: Age after which a hidden temporary in a checkpoint folder is a dead writer's, deleted.
STALE_TEMP_SECONDS = 3600


class ShardCheckpoints:
    """The checkpoints of one shard of one kind of table, for one code version."""

    def __init__(
        self, store: FeatureStore, kind: str, dataset: str, shard: str, code_version: str
    ) -> None:
        self.store = store
        self.code_version = code_version
        self.prefix = checkpoint_folder(kind, dataset, shard)  # validates the names
        self._run = uuid.uuid4().hex[:12]
        self.written = 0  #: checkpoints written by this object

    def __repr__(self) -> str:
        return f"ShardCheckpoints({self.store.url(self.prefix)!r})"

    def files(self) -> list[str]:
        """Relative paths of the checkpoints present now (any run, any code version)."""
        return self.store.list(self.prefix)

    def write(self, table: pa.Table) -> str:
        """Write one batch's rows as a new checkpoint (atomically); returns its path."""
        rel = f"{self.prefix}/part-{self._run}-{self.written:06d}.parquet"
        meta = {"code_version": self.code_version}
        try:
            self.store.write_table(rel, table, metadata=meta)
        except FileNotFoundError:
            # A concurrent run of the shard finished and pruned the empty folder between
            # creating it and writing into it: once more.
            self.store.write_table(rel, table, metadata=meta)
        self.written += 1
        return rel

    def load(self, log: logging.Logger | None = None) -> pa.Table | None:
        """The rows of every usable checkpoint (this code version, decodable), or None."""
        log = log or logger
        tables: list[pa.Table] = []
        stale = 0
        for rel in self.files():
            try:
                if self.store.read_metadata(rel).get("code_version") != self.code_version:
                    stale += 1
                    continue
                table = self.store.read_table(rel).replace_schema_metadata(None)
            except FileNotFoundError:  # removed by a concurrent run that just finished
                continue
            except CorruptFileError as exc:
                log.warning("%s: ignoring this checkpoint", exc)
                continue
            if tables and table.schema != tables[0].schema:
                log.warning("%s: rows of another layout, ignoring this checkpoint", rel)
                continue
            tables.append(table)
        if stale:
            log.info("%s: ignoring %d checkpoint(s) of another code version", self, stale)
        if not tables:
            return None
        rows = pa.concat_tables(tables)
        log.info("%s: resuming from %d checkpointed row(s)", self, rows.num_rows)
        return rows

    def clear(self) -> int:
        """Delete every checkpoint of the shard (once the shard file is written); returns how
        many. Files are deleted one by one, never the folder with what another run is writing
        in it; hidden temporaries of killed checkpoint writes go once they are stale."""
        removed = 0
        for rel in self.files():
            try:
                removed += self.store.delete(rel)
            except FileNotFoundError:
                pass
        if isinstance(self.store.fs, LocalFileSystem):
            self._remove_dead_temporaries()
            parts = self.prefix.split("/")
            for depth in range(len(parts), 0, -1):  # empty folders, deepest first
                try:
                    self.store.fs.rmdir(self.store.path("/".join(parts[:depth])))
                except OSError:
                    break
        return removed

    def _remove_dead_temporaries(self) -> None:
        """Hidden temporaries of checkpoint writes older than :data:`STALE_TEMP_SECONDS`
        (their writer was killed; a live one finishes its write in well under a second)."""
        folder = self.store.path(self.prefix)
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return
        cutoff = time.time() - STALE_TEMP_SECONDS
        for name in names:
            if not (name.startswith(".part-") and name.endswith(".tmp")):
                continue
            try:
                if os.stat(f"{folder}/{name}").st_mtime < cutoff:
                    os.unlink(f"{folder}/{name}")
            except FileNotFoundError:
                pass
