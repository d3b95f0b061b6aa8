"""``<ds>/pca_model``: PCA-whitening learned on the paired dataset's features."""

import dagster as dg

from cw_pipeline.compute.data_versions import array_version
from cw_pipeline.compute.features import load_features
from cw_pipeline.compute.pca import fit_pca_models
from cw_pipeline.compute.published import publish_pca
from cw_pipeline.config import DatasetConfig, ProjectConfig
from cw_pipeline.defs.assets.features import features_key
from cw_pipeline.defs.assets.support import start_step
from cw_pipeline.defs.automation import refresh_when_inputs_change
from cw_pipeline.defs.dependencies import Dep
from cw_pipeline.defs.partitions import ident, partitions_def
from cw_pipeline.defs.resources import PipelineResource


def pca_key(ds: DatasetConfig) -> dg.AssetKey:
    return dg.AssetKey([ds.name, "pca_model"])


def pca_asset(config: ProjectConfig, ds: DatasetConfig) -> dg.AssetsDefinition:
    """The ``class`` and ``raw`` PCA models of ``ds`` (one pair per half when self-split),
    fitted on the features of ``config.paired(ds)``: a cross-group dependency."""
    paired = config.paired(ds.name)
    assert paired is not None, f"dataset {ds.name} has ground truth but no PCA source"
    deps = [Dep(features_key(paired), partitions_def(paired.name))]
    learned = "the other half of its objects" if ds.self_split else paired.name

    @dg.asset(
        key=pca_key(ds),
        deps=[features_key(paired)],
        group_name=ident(ds.name),
        kinds={"numpy"},
        automation_condition=refresh_when_inputs_change(deps),
        description=f"{ds.name} PCA-whitening, learned on {learned} "
        f"(features of {paired.name}/cam_features).",
    )
    def pca_model(context: dg.AssetExecutionContext, pipeline: PipelineResource):
        step = start_step(context, pipeline, deps)
        store, shards = step.store, step.shards(paired.name)
        train = load_features(store, paired.name, shards, paired.images)
        models = fit_pca_models(config, ds, train)
        commit = publish_pca(store, ds, models)  # one generation, visible at once
        first = next(iter(models.values()))
        arrays = {
            f"{rel}/{name}": getattr(m, name)
            for rel, m in models.items()
            for name in ("mean", "components", "eigenvalues")
        }
        return dg.MaterializeResult(
            data_version=dg.DataVersion(array_version(arrays)),
            tags=step.tags,
            metadata={
                "cpu_seconds": step.cpu_seconds(),
                "training_set": str(first.metadata.get("training_set")),
                "training_images": len(train),
                "models": len(models),
                "dims": {r.removeprefix("pca:"): m.output_dim for r, m in models.items()},
                "generation": commit.generation,
            },
        )

    return pca_model
