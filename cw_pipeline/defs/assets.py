"""Asset factories: one set of assets per dataset, one per evaluation.

Per dataset ``<ds>`` (group ``<ds>``), partitioned by shards (``DynamicPartitionsDefinition``):

* ``<ds>/manifest`` — image id, path, bytes, mtime, sha1, width, height per shard.
* ``<ds>/cam_features`` — top classes, class vectors, sum-pooled vector, CAM boxes per shard;
  rows are reused by sha1, so only new or changed images get a forward pass.

Per dataset with ground truth (unpartitioned):

* ``<ds>/query_features`` (box queries), ``<ds>/pca_model`` (fitted on the paired dataset's
  features), ``<ds>/descriptors`` (raw, raw+PCA, OfA).

Per evaluation ``<ev>`` (a dataset, optionally with distractor sets):

* ``<ev>/<d>_descriptors`` per distractor set ``d`` (partitioned like ``d``), with ``<ds>``'s PCA.
* ``<ev>/rankings`` — one Parquet table per method; ``<ev>/map_report`` — mAP per method.
"""

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import dagster as dg

from cw_pipeline import report_figures, reports, stages
from cw_pipeline.checkpoints import ShardCheckpoints
from cw_pipeline.config import DatasetConfig, EvaluationConfig, ProjectConfig
from cw_pipeline.core.datasets import skipped_summary
from cw_pipeline.core.extract import FeatureExtractor
from cw_pipeline.defs.executors import cnn_op_tags
from cw_pipeline.defs.resources import PipelineResource
from cw_pipeline.defs.versions import (
    INPUT_VERSION_TAG,
    Dep,
    input_version,
    on_cron_when_inputs_change,
    refresh_when_inputs_change,
    version_of,
)
from cw_pipeline.indexing import (
    build_manifest,
    feature_code_version,
    fingerprint,
    manifest_version,
    progress_logger,
    scan,
    shard_files,
    shard_skipped,
    stored_class_shape,
    stored_finite,
    update_features,
)
from cw_pipeline.store import CorruptFileError, FeatureStore, encode_component

StoreFactory = Callable[[], FeatureStore]

logger = logging.getLogger(__name__)

PROGRESS_EVERY = 50  # images between progress log lines inside runs


#: The pool of the forward-pass steps (``dagster.yaml``'s ``pools.default_limit`` bounds it).
CNN_POOL = "cnn"


def ident(name: str) -> str:
    """A Dagster-safe identifier for a dataset or evaluation name."""
    return "".join(c if c.isalnum() or c == "_" else "_" for c in name)


def partitions_def(ds_name: str) -> dg.DynamicPartitionsDefinition:
    return dg.DynamicPartitionsDefinition(name=f"{ident(ds_name)}_shards")


def _versioned(
    context: dg.AssetExecutionContext, deps: list[Dep], partition: str | None = None
) -> tuple[str, dict[str, str]]:
    """The input version of a run (read *before* its inputs) and the tags recording it."""
    version = input_version(context.instance, deps, partition) or "missing"
    return version, {INPUT_VERSION_TAG: version}


def _cpu(start: float) -> float:
    """CPU seconds of this process (all its threads) since ``start`` (``time.process_time``)."""
    return round(time.process_time() - start, 3)


def current_shards(instance: dg.DagsterInstance, ds_name: str) -> list[str]:
    return sorted(instance.get_dynamic_partitions(partitions_def(ds_name).name))


def _read_optional(store: FeatureStore, rel: str, log: logging.Logger | None = None):
    """A stored table, or None when absent or corrupt (a corrupt file is rebuilt)."""
    if not store.exists(rel):
        return None
    try:
        return store.read_table(rel)
    except CorruptFileError as exc:
        (log or logger).warning("%s: rebuilding it", exc)
        return None


# --------------------------------------------------------------------------- per dataset


def dataset_assets(
    config: ProjectConfig, ds: DatasetConfig, store_factory: StoreFactory | None = None
) -> list[dg.AssetsDefinition]:
    """manifest and cam_features (partitioned), and the ground-truth assets where relevant.

    ``store_factory`` gives the feature store to the automation condition of
    ``query_features`` (which reads the manifests); default: the configuration's warehouse.
    """
    store_factory = store_factory or (lambda: FeatureStore(config.warehouse))
    parts = partitions_def(ds.name)
    group = ident(ds.name)
    manifest_key = dg.AssetKey([ds.name, "manifest"])
    features_key = dg.AssetKey([ds.name, "cam_features"])
    code_version = feature_code_version(ds)

    @dg.asset(
        key=manifest_key,
        partitions_def=parts,
        group_name=group,
        kinds={"parquet"},
        description=f"Files of {ds.name} per shard: id, path, bytes, sha1, width, height.",
        check_specs=[dg.AssetCheckSpec("ids_unique_and_readable", asset=manifest_key)],
    )
    def manifest(context: dg.AssetExecutionContext, pipeline: PipelineResource):
        cpu0 = time.process_time()
        store = pipeline.store()
        shard = context.partition_key
        found = scan(ds)
        files = shard_files(ds, found.files, store).get(shard, [])
        skipped = shard_skipped(ds, found.skipped, store, len(found.files)).get(shard, [])
        rel = stages.shard_relpath("manifest", ds.name, shard)
        previous = _read_optional(store, rel, context.log)
        table, hashed = build_manifest(ds, files, previous)
        store.write_table(rel, table, metadata={"fingerprint": fingerprint(files)})
        ids = table.column("image_id").to_pylist()
        errors = [e for e in table.column("error").to_pylist() if e]
        unique = len(set(ids)) == len(ids)
        return dg.MaterializeResult(
            metadata={
                "cpu_seconds": _cpu(cpu0),
                "images": len(ids),
                "hashed": hashed,
                "unreadable": len(errors),
                "skipped": len(skipped),
                "skipped_files": skipped_summary(skipped) or "none",
                "path": store.url(rel),
            },
            data_version=dg.DataVersion(manifest_version(table)),
            check_results=[
                dg.AssetCheckResult(
                    check_name="ids_unique_and_readable",
                    passed=unique and not errors,
                    severity=dg.AssetCheckSeverity.ERROR
                    if not unique
                    else dg.AssetCheckSeverity.WARN,
                    metadata={
                        "duplicate_ids": len(ids) - len(set(ids)),
                        "unreadable": len(errors),
                        "first_error": errors[0] if errors else "",
                    },
                )
            ],
        )

    @dg.asset(
        key=features_key,
        deps=[manifest_key],
        partitions_def=parts,
        group_name=group,
        kinds={"pytorch", "parquet"},
        pool=CNN_POOL,
        op_tags=cnn_op_tags(),  # executor hints (Dask resources, Kubernetes GPU); see executors
        code_version=code_version,
        description=(
            f"CAM features of {ds.name} per shard ({ds.extraction.backbone}, "
            f"resize {ds.extraction.resize}, N_C={ds.extraction.stored_classes} stored)."
        ),
        check_specs=[
            dg.AssetCheckSpec("features_finite_and_shaped", asset=features_key),
            dg.AssetCheckSpec("no_rejected_images", asset=features_key),
        ],
    )
    def cam_features(context: dg.AssetExecutionContext, pipeline: PipelineResource):
        store = pipeline.store()
        shard = context.partition_key
        manifest_table = store.read_table(stages.shard_relpath("manifest", ds.name, shard))
        rel = stages.shard_relpath("cam_features", ds.name, shard)
        previous = _read_optional(store, rel, context.log)
        if previous is not None:
            # The version of the rows just read (not a second read: another run may have
            # replaced the file since).
            meta = previous.schema.metadata or {}
            stored_version = meta.get(b"code_version", b"").decode("utf-8", "replace")
            if stored_version != code_version:
                context.log.info("stored features are from %s: recomputing", stored_version)
                previous = None
        # Every batch is checkpointed; a run killed mid-shard resumes from its checkpoints.
        checkpoints = ShardCheckpoints(store, "cam_features", ds.name, shard, code_version)
        extractor = pipeline.extractor(ds)
        cpu0 = time.process_time()
        update = update_features(
            ds,
            manifest_table,
            previous,
            extractor,
            progress_logger(context.log, f"{ds.name}/{shard}", every_images=PROGRESS_EVERY),
            resumed=checkpoints.load(context.log),
            checkpoint=checkpoints.write,
        )
        store.write_table(rel, update.table, metadata={"code_version": code_version})
        store.write_table(stages.shard_relpath("rejected", ds.name, shard), update.rejected)
        checkpoints.clear()
        finite, shaped = _features_ok(update.table, ds, extractor)
        # Features are a function of the manifest's (id, sha1) pairs and the code version.
        version = version_of({"manifest": manifest_version(manifest_table), "code": code_version})
        return dg.MaterializeResult(
            data_version=dg.DataVersion(version),
            metadata={
                "rows": update.table.num_rows,
                "forward_passes": update.forward_passes,
                "reused": update.reused,
                "resumed": update.resumed,
                "rejected": update.rejected.num_rows,
                "seconds": round(update.seconds, 3),
                "cpu_seconds": _cpu(cpu0),
                "images_per_second": round(update.images_per_second, 2),
                "path": store.url(rel),
            },
            check_results=[
                dg.AssetCheckResult(
                    check_name="features_finite_and_shaped",
                    passed=finite and shaped,
                    metadata={"finite": finite, "shaped": shaped},
                ),
                dg.AssetCheckResult(
                    check_name="no_rejected_images",
                    passed=update.rejected.num_rows == 0,
                    severity=dg.AssetCheckSeverity.WARN,
                    metadata={
                        "rejected": update.rejected.num_rows,
                        "reasons": "\n".join(f"{i}: {r}" for i, r in update.errors[:20]),
                    },
                ),
            ],
        )

    out = [manifest, cam_features]
    out += [shards_readable_check(ds, manifest_key), shards_readable_check(ds, features_key)]
    if not ds.has_groundtruth:
        return out

    if ds.layout not in ("ukbench", "holidays"):

        def query_version(instance: dg.DagsterInstance) -> str | None:
            shards = current_shards(instance, ds.name)
            return stages.query_input_version(store_factory(), ds, shards, code_version)

        @dg.asset(
            key=[ds.name, "query_features"],
            deps=[manifest_key],
            group_name=group,
            kinds={"pytorch", "parquet"},
            code_version=f"{code_version}-{ds.query_protocol}",
            automation_condition=refresh_when_inputs_change(
                [Dep(manifest_key, parts)], version_fn=query_version
            ),
            description=f"Features of {ds.name}'s queries ({ds.query_protocol} protocol).",
        )
        def query_features(context: dg.AssetExecutionContext, pipeline: PipelineResource):
            cpu0 = time.process_time()
            store = pipeline.store()
            shards = current_shards(context.instance, ds.name)
            version = stages.query_input_version(store, ds, shards, code_version) or "missing"
            tables = [
                store.read_table(stages.shard_relpath("manifest", ds.name, s)) for s in shards
            ]
            import pyarrow as pa

            man = pa.concat_tables(tables)
            t0 = time.perf_counter()
            table = stages.compute_query_features(ds, man, pipeline.extractor(ds))
            rel = f"query_features/dataset={encode_component(ds.name)}/queries.parquet"
            store.write_table(rel, table)
            return dg.MaterializeResult(
                data_version=dg.DataVersion(version),
                tags={INPUT_VERSION_TAG: version},
                metadata={
                    "queries": table.num_rows,
                    "seconds": round(time.perf_counter() - t0, 2),
                    "cpu_seconds": _cpu(cpu0),
                },
            )

        out.append(query_features)

    paired = config.paired(ds.name)
    assert paired is not None, f"dataset {ds.name} has ground truth but no PCA source"
    pca_key = dg.AssetKey([ds.name, "pca_model"])
    pca_deps = [Dep(dg.AssetKey([paired.name, "cam_features"]), partitions_def(paired.name))]

    @dg.asset(
        key=pca_key,
        deps=[dg.AssetKey([paired.name, "cam_features"])],
        group_name=group,
        kinds={"numpy"},
        automation_condition=refresh_when_inputs_change(pca_deps),
        description=(
            f"PCA-whitening for {ds.name}, learned on "
            + ("the other half of its objects." if ds.self_split else f"{paired.name}.")
        ),
    )
    def pca_model(context: dg.AssetExecutionContext, pipeline: PipelineResource):
        cpu0 = time.process_time()
        _, tags = _versioned(context, pca_deps)
        store = pipeline.store()
        train = stages.load_features(
            store, paired.name, current_shards(context.instance, paired.name), paired.images
        )
        models = stages.fit_pca_models(config, ds, train)
        for rel, model in models.items():
            stages.save_pca(store, rel, model)
        first = next(iter(models.values()))
        arrays = {
            f"{rel}/{name}": getattr(m, name)
            for rel, m in models.items()
            for name in ("mean", "components", "eigenvalues")
        }
        return dg.MaterializeResult(
            data_version=dg.DataVersion(stages.array_version(arrays)),
            tags=tags,
            metadata={
                "cpu_seconds": _cpu(cpu0),
                "training_set": str(first.metadata.get("training_set")),
                "training_images": len(train),
                "models": len(models),
                "dims": {Path(r).name: m.output_dim for r, m in models.items()},
            },
        )

    desc_deps = [Dep(features_key, parts), Dep(pca_key)]

    @dg.asset(
        key=[ds.name, "descriptors"],
        deps=[features_key, pca_key],
        group_name=group,
        kinds={"parquet"},
        automation_condition=refresh_when_inputs_change(desc_deps),
        description=f"Raw, raw+PCA and OfA descriptors of {ds.name}.",
    )
    def descriptors(context: dg.AssetExecutionContext, pipeline: PipelineResource):
        cpu0 = time.process_time()
        _, tags = _versioned(context, desc_deps)
        store = pipeline.store()
        feats = stages.load_features(
            store, ds.name, current_shards(context.instance, ds.name), ds.images
        )
        desc = stages.dataset_descriptors(config, store, ds, feats)
        dims, versions = {}, {}
        for agg, (ids, mat) in desc.items():
            store.write_table(
                stages.descriptors_rel(ds.name, agg), stages.descriptor_table(ids, mat)
            )
            dims[agg] = int(mat.shape[1])
            versions[agg] = stages.array_version({agg: mat}, ids)
        return dg.MaterializeResult(
            data_version=dg.DataVersion(version_of(versions)),
            tags=tags,
            metadata={"images": len(feats), "dims": dims, "cpu_seconds": _cpu(cpu0)},
        )

    out += [pca_model, descriptors]
    return out


SHARDS_READABLE = "shards_readable"
#: Blocking check of ``<ev>/rankings``: its inputs describe one state of the images.
INPUTS_CONSISTENT = "inputs_consistent"
#: Cron of evaluations with distractors that set no ``schedule``.
DEFAULT_EVALUATION_CRON = "0 3 * * *"


def shards_readable_check(ds: DatasetConfig, key: dg.AssetKey) -> dg.AssetChecksDefinition:
    """Check ``shards_readable`` of a partitioned table asset (``<ds>/manifest`` or
    ``<ds>/cam_features``): its Parquet shards decode, page checksums included.

    In a run of one shard (every materialization) it reads that shard; run on its own (the
    UI's "Execute" on the check, or a job selecting it) it reads every shard of the dataset.
    A truncated or damaged file fails it (ERROR) with the file named; re-materializing the
    shard rebuilds it (a corrupt stored shard is not reused). Shards not materialized yet are
    counted, not failed.
    """
    kind = key.path[-1]

    @dg.asset_check(
        asset=key,
        name=SHARDS_READABLE,
        description=f"Every stored {kind} shard of {ds.name} is a complete Parquet file.",
    )
    def shards_readable(context: dg.AssetCheckExecutionContext, pipeline: PipelineResource):
        store = pipeline.store()
        shard = context.run.tags.get("dagster/partition")
        shards = [shard] if shard else current_shards(context.instance, ds.name)
        corrupt: list[CorruptFileError] = []
        missing = 0
        for s in shards:
            rel = stages.shard_relpath(kind, ds.name, s)
            try:
                store.read_table(rel)
            except FileNotFoundError:
                missing += 1
            except CorruptFileError as exc:
                context.log.error("%s: re-materialize shard %r to rebuild it", exc, s)
                corrupt.append(exc)
        return dg.AssetCheckResult(
            passed=not corrupt,
            severity=dg.AssetCheckSeverity.ERROR,
            description="; ".join(str(e) for e in corrupt) or None,
            metadata={
                "checked": len(shards) - missing,
                "not_materialized": missing,
                "corrupt": len(corrupt),
                "corrupt_files": "\n".join(e.location for e in corrupt),
            },
        )

    return shards_readable


def _features_ok(table, ds: DatasetConfig, extractor: FeatureExtractor) -> tuple[bool, bool]:
    if table.num_rows == 0:
        return True, True
    expected = (ds.extraction.stored_classes, extractor.backbone.feature_dim)
    return stored_finite(table), stored_class_shape(table) == expected


# --------------------------------------------------------------------------- per evaluation


def evaluation_assets(config: ProjectConfig, ev: EvaluationConfig) -> list[dg.AssetsDefinition]:
    ds = config.dataset(ev.dataset)
    group = ident(ev.name)
    out: list[dg.AssetsDefinition] = []
    deps = [Dep(dg.AssetKey([ds.name, "descriptors"])), Dep(dg.AssetKey([ds.name, "pca_model"]))]
    if ds.layout not in ("ukbench", "holidays"):
        deps.append(Dep(dg.AssetKey([ds.name, "query_features"])))
    cron = ev.schedule or DEFAULT_EVALUATION_CRON
    for dname in ev.distractors:
        out.append(_distractor_descriptors(config, ev, dname, cron))
        deps.append(Dep(dg.AssetKey([ev.name, f"{dname}_descriptors"]), partitions_def(dname)))
    # With distractors (100k images) the rankings wait for the evaluation's cron.
    condition = (
        on_cron_when_inputs_change(cron, deps)
        if ev.distractors
        else refresh_when_inputs_change(deps)
    )
    rankings_key = dg.AssetKey([ev.name, "rankings"])
    methods = [m.name for m in ev.methods]

    @dg.asset(
        key=rankings_key,
        deps=[d.key for d in deps],
        group_name=group,
        kinds={"parquet"},
        automation_condition=condition,
        description=f"Rankings of {ev.name} for {', '.join(methods)}.",
        check_specs=[
            dg.AssetCheckSpec("covers_every_query", asset=rankings_key),
            dg.AssetCheckSpec(
                INPUTS_CONSISTENT,
                asset=rankings_key,
                blocking=True,
                description="Descriptors, distractor descriptors, query features and ground "
                "truth describe one state of the images (the current manifests); a mixed state "
                "fails the run before anything is written, and stops the chain.",
            ),
        ],
    )
    def rankings(context: dg.AssetExecutionContext, pipeline: PipelineResource):
        cpu0 = time.process_time()
        _, tags = _versioned(context, deps)
        store = pipeline.store()
        shards = {ds.name: current_shards(context.instance, ds.name)}
        for dname in ev.distractors:
            shards[dname] = current_shards(context.instance, dname)
        problems = stages.evaluation_input_problems(config, store, ev, shards)
        if problems:
            raise dg.Failure(
                description=f"{ev.name}: inputs of the rankings are inconsistent: "
                + "; ".join(problems),
                metadata={INPUTS_CONSISTENT: False, "problems": "\n".join(problems)},
            )
        needs_maps = any(m.needs_maps for m in ev.methods)
        extractor = pipeline.extractor(ds) if needs_maps else None
        tables, stats = stages.evaluation_rankings(config, store, ev, shards, extractor)
        for name, table in tables.items():
            store.write_table(stages.rankings_rel(ev.name, name), table)
        expected = _expected_queries(config, store, ev, shards)
        covered = all(set(t.column("query_id").to_pylist()) == expected for t in tables.values())
        return dg.MaterializeResult(
            data_version=dg.DataVersion(stages.table_version(tables)),
            tags=tags,
            metadata={
                "cpu_seconds": _cpu(cpu0),
                "methods": methods,
                "database_images": stats["database"],
                "queries": stats["queries"],
                "seconds_per_method": stats["seconds"],
                "map_forward_passes": stats["map_forward_passes"],
            },
            check_results=[
                dg.AssetCheckResult(
                    check_name="covers_every_query",
                    passed=covered,
                    metadata={"expected_queries": len(expected)},
                ),
                dg.AssetCheckResult(
                    check_name=INPUTS_CONSISTENT,
                    passed=True,
                    metadata={
                        "database_images": stats["database"],
                        "shards": sum(len(v) for v in shards.values()),
                    },
                ),
            ],
        )

    report_key = dg.AssetKey([ev.name, "map_report"])
    checks = []
    floor = reports.MAP_FLOORS.get(ev.name)
    if floor is not None:
        checks.append(dg.AssetCheckSpec("map_above_floor", asset=report_key))

    report_deps = [Dep(rankings_key)]

    @dg.asset(
        key=report_key,
        deps=[rankings_key],
        group_name=group,
        kinds={"markdown"},
        automation_condition=refresh_when_inputs_change(report_deps),
        description=f"mAP of {ev.name} per method, per query, beside the paper's numbers.",
        check_specs=checks,
    )
    def map_report(context: dg.AssetExecutionContext, pipeline: PipelineResource):
        cpu0 = time.process_time()
        _, tags = _versioned(context, report_deps)
        store = pipeline.store()
        shards = {ds.name: current_shards(context.instance, ds.name)}
        for dname in ev.distractors:
            shards[dname] = current_shards(context.instance, dname)
        report, figs, folder = report_figures.report_with_figures(
            config, store, ev, shards, pipeline.reports_dir(), pipeline.extractor(ds)
        )
        md = reports.markdown(report, figs.embedded)
        results = []
        if floor is not None:
            best = report["results"][0]["map"] if report["results"] else 0.0
            primary = next((r for r in report["results"] if r["method"] == "ofa"), None)
            value = primary["map"] if primary else best
            results.append(
                dg.AssetCheckResult(
                    check_name="map_above_floor",
                    passed=bool(value >= floor),
                    metadata={"ofa_map": value, "floor": floor},
                )
            )
        meta = {
            "cpu_seconds": _cpu(cpu0),
            "report": dg.MetadataValue.md(md),
            "path": dg.MetadataValue.path(str(folder / "report.md")),
            "figures": dg.MetadataValue.path(str(figs.folder)),
            **figs.as_metadata(),
        }
        for r in report["results"]:
            meta[f"map/{r['method']}"] = round(r["map"], 4)
        version = version_of(json.dumps(report["results"], sort_keys=True, default=str))
        return dg.MaterializeResult(
            data_version=dg.DataVersion(version),
            tags=tags,
            metadata=meta,
            check_results=results,
        )

    return [*out, rankings, map_report]


def _expected_queries(config, store, ev, shards) -> set[str]:
    ds = config.dataset(ev.dataset)
    if ds.layout in ("ukbench", "holidays"):
        feats = stages.load_features(store, ds.name, shards[ds.name])
        return set(feats.ids)
    rel = f"query_features/dataset={encode_component(ds.name)}/queries.parquet"
    return set(store.read_table(rel, ["image_id"]).column("image_id").to_pylist())


def _distractor_descriptors(
    config: ProjectConfig, ev: EvaluationConfig, dname: str, cron: str
) -> dg.AssetsDefinition:
    ds = config.dataset(ev.dataset)
    dset = config.dataset(dname)
    features_key = dg.AssetKey([dname, "cam_features"])
    deps = [
        Dep(features_key, partitions_def(dname), same_partition=True),
        Dep(dg.AssetKey([ds.name, "pca_model"])),
    ]

    @dg.asset(
        key=[ev.name, f"{dname}_descriptors"],
        deps=[dg.AssetKey([dname, "cam_features"]), dg.AssetKey([ds.name, "pca_model"])],
        partitions_def=partitions_def(dname),
        group_name=ident(ev.name),
        kinds={"parquet"},
        automation_condition=on_cron_when_inputs_change(cron, deps),
        description=f"Descriptors of distractor set {dname} with {ds.name}'s PCA "
        f"(refreshed after the evaluation's cron, {cron}).",
    )
    def distractor_descriptors(context: dg.AssetExecutionContext, pipeline: PipelineResource):
        cpu0 = time.process_time()
        shard = context.partition_key
        version, tags = _versioned(context, deps, shard)
        store = pipeline.store()
        rel = stages.shard_relpath("cam_features", dset.name, shard)
        if store.read_table(rel, ["image_id"]).num_rows == 0:
            for agg in stages.offline_aggregations():  # drop descriptors of removed images
                store.delete(stages.distractor_rel(ev.name, dname, agg, shard))
            return dg.MaterializeResult(
                data_version=dg.DataVersion(version),
                tags=tags,
                metadata={"images": 0, "cpu_seconds": _cpu(cpu0)},
            )
        feats = stages.load_features(store, dset.name, [shard])
        if ds.self_split:
            raise ValueError(f"{ev.name}: distractors with a self-split dataset are not supported")
        desc = stages.descriptor_sets(feats, stages.pca_models_for(store, ds), config.search)
        for agg, mat in desc.items():
            rel = stages.distractor_rel(ev.name, dname, agg, shard)
            store.write_table(rel, stages.descriptor_table(feats.ids, mat))
        # A deterministic function of this shard's features and the PCA: its input version.
        return dg.MaterializeResult(
            data_version=dg.DataVersion(version),
            tags=tags,
            metadata={"images": len(feats), "cpu_seconds": _cpu(cpu0)},
        )

    return distractor_descriptors
