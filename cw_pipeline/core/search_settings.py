"""The search settings (the YAML's ``search`` block): :class:`SearchParams`, with its
``rerank`` block :class:`RerankConfig`."""

from __future__ import annotations

from pydantic import Field, model_validator

from cw_pipeline.core.cams import BOX_THRESHOLDS
from cw_pipeline.core.validation import Settings, bounded_int


class RerankConfig(Settings):
    """CAM-box re-ranking settings (the paper's Sec. 4.3 / NOTES.md); how many results are
    re-ranked (R) is part of the method string (``ofa+r100``).

    Attributes:
        query_classes: the query's top classes whose CAMs are computed on each image and
            aggregated into each region's descriptor (the code used 6).
        box_classes: how many of them are averaged into the heatmap (2).
        thresholds: fractions of the heatmap maximum giving one box each.
        min_cells: boxes of fewer feature-map cells are skipped.
    """

    query_classes: bounded_int(1, 1000) = 6  # type: ignore[valid-type]
    box_classes: bounded_int(1) = 2  # type: ignore[valid-type]
    thresholds: tuple[float, ...] = Field(default=BOX_THRESHOLDS, strict=False)
    min_cells: bounded_int(1) = 5  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _boxes_within_query_classes(self) -> RerankConfig:
        if self.box_classes > self.query_classes:
            raise ValueError(
                f"box_classes must be in 1..query_classes ({self.query_classes}), "
                f"got {self.box_classes}"
            )
        return self


class SearchParams(Settings):
    """Search settings (the YAML's ``search`` block).

    Attributes:
        aggregated_classes: N_C, the classes aggregated into each descriptor per search
            (OfA: the image's top N_C; OnA: the query's top N_C).
        n_pca: N_pca, class vectors per training image that fit the class-space PCA.
        pca_dims: PCA dimensions kept (None: all that carry variance).
        rerank: CAM-box re-ranking settings (its query classes among them).
    """

    aggregated_classes: bounded_int(1, 1000) = 64  # type: ignore[valid-type]
    n_pca: bounded_int(1) = 1  # type: ignore[valid-type]
    pca_dims: bounded_int(1) | None = None  # type: ignore[valid-type]
    rerank: RerankConfig = RerankConfig()

    def class_needs(self, rerank: bool = True) -> dict[str, int]:
        """How many class vectors per image each setting reads (``rerank``: count the
        re-ranking's query classes), by its name in the YAML's ``search`` block."""
        out = {"aggregated_classes": self.aggregated_classes, "n_pca": self.n_pca}
        if rerank:
            out["rerank.query_classes"] = self.rerank.query_classes
        return out

    @property
    def classes_needed(self) -> int:
        """The class vectors each image must store for these settings (N_C stored)."""
        return max(self.class_needs().values())
