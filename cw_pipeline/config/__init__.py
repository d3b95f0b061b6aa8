"""``datasets.yaml`` -> typed, validated project configuration (no Dagster).

:func:`load_config` reads the YAML file, expands ``~`` and ``${VAR}`` / ``${VAR:-default}``
in paths, resolves relative paths against the YAML file's folder and validates everything
at load: unknown keys anywhere, unknown layouts, protocols, backbones and layers, missing
folders and ground truth, PCA sources and distractor sets that do not fit. Every
:class:`ConfigError` names the file and the entry, e.g.::

    data/datasets.yaml: dataset 'oxford5k': unknown layout 'oxfrod' (expected one of ...)

A dataset marked ``optional: true`` whose folder is missing is *disabled* with a warning
instead (and so are the datasets that take their PCA from it and the evaluations that use
it); :attr:`ProjectConfig.disabled_datasets` says why.

PCA sources (``pca_from``): every dataset with ground truth needs one, the name of another
dataset whose features train its PCA (the paper's protocol: Oxford with PCA from Paris and
vice versa), or ``self-split`` for UKBench/Holidays, whose objects are split in two halves,
each evaluated with PCA from the other.

The package: :mod:`~cw_pipeline.config.yaml_file` (strict YAML, key lines, path expansion,
:class:`ConfigError`), :mod:`~cw_pipeline.config.models` (the validated models) and
:mod:`~cw_pipeline.config.load` (YAML -> models, the checks across entries); this module is
their public surface.
"""

from cw_pipeline.config.load import (
    DatasetLocation,
    dataset_location,
    default_config_path,
    load_config,
    project_root,
)
from cw_pipeline.config.models import (
    CONFIG_ENV,
    DEFAULT_METHODS,
    SELF_SPLIT,
    DatasetConfig,
    DatasetDefaults,
    EvaluationConfig,
    FeatureMapsConfig,
    ProjectConfig,
)
from cw_pipeline.config.yaml_file import ConfigError, UnknownNameError

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_METHODS",
    "SELF_SPLIT",
    "ConfigError",
    "DatasetConfig",
    "DatasetDefaults",
    "DatasetLocation",
    "EvaluationConfig",
    "FeatureMapsConfig",
    "ProjectConfig",
    "UnknownNameError",
    "dataset_location",
    "default_config_path",
    "load_config",
    "project_root",
]
