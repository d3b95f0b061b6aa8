"""The search settings (the YAML's ``search`` block): :class:`SearchParams`."""

from __future__ import annotations

from cw_pipeline.core.search import RerankConfig
from cw_pipeline.core.validation import Settings, bounded_int


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
