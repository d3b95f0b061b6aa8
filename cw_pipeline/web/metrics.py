"""What the search server measures, in the Prometheus text format (``GET /metrics``).

One registry per server (not the process-wide default, so that several apps in one process
never share counters):

* ``cw_http_requests_total{endpoint, method, status}`` and
  ``cw_http_request_duration_seconds{endpoint}`` (histogram): every request, by route
  (``/api/search``, ``/static/{name}`` …; any other path is ``other``);
* ``cw_search_features_seconds`` and ``cw_search_ranking_seconds{method}`` (histograms): the
  query's forward pass and the ranking of each search, ``method`` its aggregation with ``+r`` /
  ``+qe`` marks but no numbers (a bounded set of labels);
* ``cw_search_map_forward_passes_total``: database images a search had to run the network on
  (OnA, ``+r`` without kept maps);
* ``cw_searches_running`` / ``cw_searches_waiting`` (gauges), ``cw_search_slots``;
* ``cw_index_loads_total``: databases loaded or reloaded.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from cw_pipeline.core.methods import Method

__all__ = ["CONTENT_TYPE", "Metrics", "method_label"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

#: Seconds: from a thumbnail (milliseconds) to an OnA search over 100k images (tens of s).
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def method_label(method: Method) -> str:
    """``ofa+r+qe`` for ``ofa+r100+qe10``: the aggregation and which options it has."""
    label = method.aggregation
    if method.rerank:
        label += "+r"
    if method.qe:
        label += "+qe"
    return label


class Metrics:
    """The server's counters, gauges and histograms, in a registry of their own."""

    def __init__(self, max_searches: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "cw_http_requests",
            "HTTP requests answered, by route, method and status",
            ["endpoint", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "cw_http_request_duration_seconds",
            "Time to answer an HTTP request, by route",
            ["endpoint"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.features_seconds = Histogram(
            "cw_search_features_seconds",
            "Time of a search query's features (decode, forward pass)",
            buckets=_BUCKETS,
            registry=r,
        )
        self.ranking_seconds = Histogram(
            "cw_search_ranking_seconds",
            "Time of a search's ranking, by method (aggregation, +r, +qe)",
            ["method"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.map_forward_passes = Counter(
            "cw_search_map_forward_passes",
            "Database images whose feature maps a search computed (OnA, re-ranking)",
            registry=r,
        )
        self.running = Gauge("cw_searches_running", "Searches running now", registry=r)
        self.waiting = Gauge("cw_searches_waiting", "Searches waiting for a slot", registry=r)
        slots = Gauge("cw_search_slots", "Searches that may run at once", registry=r)
        slots.set(max_searches)
        self.index_loads = Counter(
            "cw_index_loads", "Search databases loaded or reloaded", registry=r
        )

    def request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, method, str(status)).inc()
        self.request_seconds.labels(endpoint).observe(seconds)

    def record_search(
        self, method: Method, features: float, ranking: float, map_passes: int
    ) -> None:
        """Count one search: its query's feature and ranking seconds, forward passes for maps."""
        self.features_seconds.observe(features)
        self.ranking_seconds.labels(method_label(method)).observe(ranking)
        if map_passes:
            self.map_forward_passes.inc(map_passes)

    def text(self) -> bytes:
        """Everything, in the Prometheus text exposition format."""
        return generate_latest(self.registry)
