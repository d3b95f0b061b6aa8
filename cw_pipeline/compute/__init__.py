"""The store-backed computations: what each pipeline asset computes, without Dagster.

Named ``compute`` because that is what it holds — the work between the image folders and
the feature store, one module per step of the data flow, each reading its inputs from and
writing its results to :class:`cw_pipeline.store.FeatureStore` at the paths the store names:

* :mod:`~cw_pipeline.compute.shards` — files by ``stat``, shard keys, what to (re)index;
* :mod:`~cw_pipeline.compute.manifests` — per-shard manifests with sha1 reuse, and their
  readers;
* :mod:`~cw_pipeline.compute.features` — feature shards (sha1 reuse, extraction, layout),
  with :mod:`~cw_pipeline.compute.checkpoints` for the batches of a shard being built;
* :mod:`~cw_pipeline.compute.queries` — ground truth and query features;
* :mod:`~cw_pipeline.compute.pca` — PCA models;
* :mod:`~cw_pipeline.compute.descriptors` — offline (and distractor) descriptors;
* :mod:`~cw_pipeline.compute.feature_maps` — the feature maps kept for OnA and re-ranking;
* :mod:`~cw_pipeline.compute.rankings` — rankings, their scores, the kept pair values;
* :mod:`~cw_pipeline.compute.published` — the generations readers open (commit points);
* :mod:`~cw_pipeline.compute.reports` and :mod:`~cw_pipeline.compute.report_figures` — the
  mAP report of an evaluation and its pictures;
* :mod:`~cw_pipeline.compute.data_versions` — content hashes used as data versions;
* :mod:`~cw_pipeline.compute.catalog` — the state of every dataset's index (``datasets``).

The Dagster assets in :mod:`cw_pipeline.defs` call these functions; the CLI, the web app
and the tests may call them directly.
"""
