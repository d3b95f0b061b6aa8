"""The settings a result was computed with, recorded beside it (``cw-pipeline evaluate``'s
JSON, the reports' ``report.json``) so that it can be computed again."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cw_pipeline.core.extract import ExtractionConfig
from cw_pipeline.core.methods import Method
from cw_pipeline.core.search_settings import SearchParams


def settings_record(
    extraction: ExtractionConfig, params: SearchParams, methods: Sequence[Method]
) -> dict[str, Any]:
    """The settings a result was computed with, enough to compute it again.

    A summary (backbone, resolved layer, resize, N_C stored and aggregated, N_pca, PCA dims,
    method strings) and the full ``extraction`` and ``search`` settings, which validate back
    into equal objects: ``ExtractionConfig(**r["extraction"])``, ``SearchParams(**r["search"])``.
    """
    return {
        "backbone": extraction.backbone,
        "layer": extraction.resolved_layer,
        "resize": extraction.resize,
        "stored_classes": extraction.stored_classes,
        "aggregated_classes": params.aggregated_classes,
        "n_pca": params.n_pca,
        "pca_dims": params.pca_dims,
        "methods": [m.name for m in methods],
        "extraction": extraction.model_dump(mode="json"),
        "search": params.model_dump(mode="json"),
    }
