"""Where a run's steps execute: one of Dagster's executors, chosen by environment (wiring only).

``CW_PIPELINE_EXECUTOR`` selects the executor of every job of the code location (the
per-dataset ``index_<ds>`` jobs, automation runs, UI materializations):

* unset or ``default`` — ``in_process``: every step of a run in the run's own process, one
  after the other. The steps of this pipeline are short or CPU-bound on the same cores, and
  a new process per step (Dagster's ``multiprocess`` default) costs 10–30 s of imports
  (torch, the definitions) per step: an incremental refresh of 7 assets took minutes. The
  CLI's and the tests' ``dg.materialize`` runs stay in one process whatever is set here;
* ``in_process`` / ``multiprocess`` — Dagster's own (``multiprocess``: a subprocess per step,
  several steps at once);
* ``celery`` — each step is a Celery task, run by ``dagster-celery`` workers on any machine
  that reaches the broker (``pip install 'cw-pipeline[celery]'``). The executor's settings are
  the ``execution: config:`` block of the YAML file ``$CW_PIPELINE_CELERY_CONFIG`` (default:
  the project's ``celery.yaml``), the file the workers start with
  (``dagster-celery worker start -A dagster_celery.app -y celery.yaml``). Workers need the
  project installed, the Dagster instance (``$DAGSTER_HOME``), the images at the same path and
  the feature store;
* ``k8s`` — each step is a Kubernetes Job (``dagster-k8s``' ``k8s_job_executor``,
  ``pip install 'cw-pipeline[k8s]'``), for Dagster's Helm chart (``docs/deployment.md``).

Tags of the steps that run the CNN (``<ds>/cam_features``, :func:`cnn_op_tags`), ignored by
executors they are not meant for:

* ``CW_PIPELINE_CELERY_CNN_QUEUE`` (e.g. ``gpu``) — the Celery queue of those steps
  (``dagster-celery/queue``): only workers started with ``-q gpu`` run them;
* ``CW_PIPELINE_CNN_K8S_CONFIG`` — a JSON object used as the steps' ``dagster-k8s/config``
  (GPU resources, node selector, tolerations, environment).

Every value is checked when the definitions are built; a bad one raises :class:`ConfigError`
naming the variable.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg
import yaml

from cw_pipeline.config import ConfigError, project_root
from cw_pipeline.core.datasets import TextDecodeError, decode_text

__all__ = [
    "CELERY_CONFIG_ENV",
    "CELERY_QUEUE_TAG",
    "CNN_CELERY_QUEUE_ENV",
    "CNN_K8S_CONFIG_ENV",
    "EXECUTORS",
    "EXECUTOR_ENV",
    "K8S_CONFIG_TAG",
    "celery_config_path",
    "cnn_op_tags",
    "executor_from_env",
]

EXECUTOR_ENV = "CW_PIPELINE_EXECUTOR"
CELERY_CONFIG_ENV = "CW_PIPELINE_CELERY_CONFIG"
CNN_CELERY_QUEUE_ENV = "CW_PIPELINE_CELERY_CNN_QUEUE"
CNN_K8S_CONFIG_ENV = "CW_PIPELINE_CNN_K8S_CONFIG"

#: Op tag read by ``dagster-celery``: the queue of a step's task.
CELERY_QUEUE_TAG = "dagster-celery/queue"
#: Op tag read by ``dagster-k8s``: Kubernetes configuration of a step's Job.
K8S_CONFIG_TAG = "dagster-k8s/config"

EXECUTORS: tuple[str, ...] = ("default", "in_process", "multiprocess", "celery", "k8s")

#: Top-level keys of a ``dagster-k8s/config`` tag (``UserDefinedDagsterK8sConfig``).
_K8S_CONFIG_KEYS = frozenset(
    {
        "container_config",
        "pod_template_spec_metadata",
        "pod_spec_config",
        "job_config",
        "job_metadata",
        "job_spec_config",
        "merge_behavior",
    }
)
_QUEUE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _error(var: str, value: str, reason: str) -> ConfigError:
    return ConfigError(reason, source=f"${var}", entry=repr(value))


def celery_config_path(environ: Mapping[str, str] | None = None) -> Path:
    """``$CW_PIPELINE_CELERY_CONFIG``, else the project's ``celery.yaml``."""
    env = os.environ if environ is None else environ
    value = env.get(CELERY_CONFIG_ENV, "").strip()
    return Path(value).expanduser() if value else project_root() / "celery.yaml"


def _celery_config(path: Path) -> dict[str, Any]:
    """The ``execution: config:`` block of a ``dagster-celery`` worker YAML file, validated."""
    shown = str(path)

    try:
        data = yaml.safe_load(decode_text(path.read_bytes(), shown))
    except TextDecodeError as exc:
        raise _error(CELERY_CONFIG_ENV, shown, f"line {exc.line}: {exc.reason}") from None
    except OSError as exc:
        raise _error(CELERY_CONFIG_ENV, shown, f"cannot read the Celery config ({exc})") from None
    except yaml.YAMLError as exc:
        raise _error(CELERY_CONFIG_ENV, shown, f"invalid YAML ({exc})") from None
    block = ((data or {}).get("execution") or {}).get("config") if isinstance(data, dict) else None
    if not isinstance(block, dict) or not block.get("broker"):
        raise _error(
            CELERY_CONFIG_ENV,
            shown,
            "expected 'execution: config:' with at least 'broker' (as for dagster-celery -y)",
        )
    from dagster._config import validate_config  # what dagster-celery's CLI checks it with
    from dagster_celery.executor import celery_executor

    result = validate_config(celery_executor.config_schema.config_type, block)
    if not result.success:
        reasons = "; ".join(e.message for e in result.errors or [])
        raise _error(CELERY_CONFIG_ENV, shown, f"invalid Celery executor config: {reasons}")
    return block


def executor_from_env(
    environ: Mapping[str, str] | None = None,
) -> dg.ExecutorDefinition | None:
    """The executor ``$CW_PIPELINE_EXECUTOR`` names (default: ``in_process``)."""
    env = os.environ if environ is None else environ
    name = env.get(EXECUTOR_ENV, "").strip() or "default"
    if name in ("default", "in_process"):
        return dg.in_process_executor
    if name == "multiprocess":
        return dg.multiprocess_executor
    if name == "celery":
        try:
            from dagster_celery import celery_executor
        except ImportError:
            raise _error(
                EXECUTOR_ENV,
                name,
                "dagster-celery is not installed: pip install 'cw-pipeline[celery]'",
            ) from None
        config = _celery_config(celery_config_path(env))
        return celery_executor.configured(config, name="celery")
    if name == "k8s":
        try:
            from dagster_k8s import k8s_job_executor
        except ImportError:
            raise _error(
                EXECUTOR_ENV, name, "dagster-k8s is not installed: pip install 'cw-pipeline[k8s]'"
            ) from None
        return k8s_job_executor
    raise _error(EXECUTOR_ENV, name, f"unknown executor (expected one of {', '.join(EXECUTORS)})")


def _k8s_config(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise _error(CNN_K8S_CONFIG_ENV, text, f"invalid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise _error(CNN_K8S_CONFIG_ENV, text, "expected a JSON object")
    unknown = sorted(set(value) - _K8S_CONFIG_KEYS)
    if unknown:
        raise _error(
            CNN_K8S_CONFIG_ENV,
            text,
            f"unknown key(s) {unknown} (expected some of {sorted(_K8S_CONFIG_KEYS)})",
        )
    return value


def cnn_op_tags(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Op tags of the steps that run the CNN, from ``$CW_PIPELINE_CELERY_CNN_QUEUE`` and
    ``$CW_PIPELINE_CNN_K8S_CONFIG`` (empty when neither is set)."""
    env = os.environ if environ is None else environ
    tags: dict[str, str] = {}
    queue = env.get(CNN_CELERY_QUEUE_ENV, "").strip()
    if queue:
        if not _QUEUE_RE.fullmatch(queue):
            raise _error(CNN_CELERY_QUEUE_ENV, queue, "a queue name is [A-Za-z0-9_.-]")
        tags[CELERY_QUEUE_TAG] = queue
    k8s = env.get(CNN_K8S_CONFIG_ENV, "").strip()
    if k8s:
        tags[K8S_CONFIG_TAG] = json.dumps(_k8s_config(k8s), sort_keys=True)
    return tags
