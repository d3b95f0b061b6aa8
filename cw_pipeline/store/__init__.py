"""The feature store: Parquet shards and small files under one root, over fsspec (no Dagster).

The root is a local folder or any fsspec URL (``s3://bucket/prefix``, ``memory://name``,
``file:///abs/path``). Paths inside the store are relative POSIX paths; shards follow the
hive-style layout ``<kind>/dataset=<dataset>/shard=<shard>.parquet`` (:meth:`shard_path`).

This package owns the warehouse layout (:mod:`~cw_pipeline.store.layout`; the reading and
writing is :mod:`~cw_pipeline.store.feature_store`'s): every artefact of the pipeline has a
named path there (:func:`manifest_path`, :func:`features_path`, :func:`rejected_path`,
:func:`plan_path`, :func:`checkpoint_folder`, :func:`query_features_path`, :func:`pca_path`,
:func:`descriptors_path`, :func:`distractor_descriptors_path`, :func:`feature_maps_path`,
:func:`pair_cache_path`, :func:`rankings_path`, :func:`ranked_database_path`, the commit
pointers (:func:`commit_path`, see :mod:`~cw_pipeline.store.commits`), and
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

from cw_pipeline.store.feature_store import (
    CorruptFileError,
    CorruptShardError,
    FeatureStore,
)
from cw_pipeline.store.layout import (
    CHECKPOINTS,
    FEATURE_MAPS,
    FEATURES,
    MANIFEST,
    REJECTED,
    REPORT_JSON,
    REPORT_MARKDOWN,
    REPORT_PER_QUERY,
    SHARD_KINDS,
    bounded_component,
    checkpoint_folder,
    commit_path,
    commits_folder,
    decode_component,
    descriptors_folder,
    descriptors_path,
    distractor_descriptors_folder,
    distractor_descriptors_path,
    encode_component,
    feature_maps_folder,
    feature_maps_path,
    features_path,
    manifest_path,
    pair_cache_path,
    parse_shard_path,
    pca_folder,
    pca_path,
    plan_path,
    query_features_path,
    ranked_database_path,
    rankings_folder,
    rankings_path,
    rejected_path,
    report_folder,
    report_path,
    shard_folder,
    shard_name_from_path,
)

__all__ = [
    "CHECKPOINTS",
    "FEATURES",
    "FEATURE_MAPS",
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
    "commit_path",
    "commits_folder",
    "decode_component",
    "descriptors_folder",
    "descriptors_path",
    "distractor_descriptors_folder",
    "distractor_descriptors_path",
    "encode_component",
    "feature_maps_folder",
    "feature_maps_path",
    "features_path",
    "manifest_path",
    "pair_cache_path",
    "parse_shard_path",
    "pca_folder",
    "pca_path",
    "plan_path",
    "query_features_path",
    "ranked_database_path",
    "rankings_folder",
    "rankings_path",
    "rejected_path",
    "report_folder",
    "report_path",
    "shard_folder",
    "shard_name_from_path",
]
