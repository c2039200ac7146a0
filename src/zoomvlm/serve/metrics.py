"""Prometheus metrics of one zoom server (own registry, so several servers can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["ServeMetrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServeMetrics:
    """Every metric the server exports at ``GET /metrics`` (names as documented in docs/serve.md).

    - ``zoomvlm_requests_total{path, status}``: finished ``/v1/*`` requests by HTTP status (499 = the
      client went away first).
    - ``zoomvlm_policy_seconds``: zoom policy latency per request (histogram, seconds).
    - ``zoomvlm_upstream_seconds``: upstream latency per request incl. retries (proxy mode; until the
      headers of a stream), or the local target's (local mode) (histogram, seconds).
    - ``zoomvlm_crops_per_request``: crops sent to the model per request (histogram).
    - ``zoomvlm_rtr``: Retain Token Ratio per request, pixels sent / native pixels of the user's images.
    - ``zoomvlm_fail_open_total{reason}``: requests forwarded without crops because the policy failed.
    - ``zoomvlm_upstream_retries_total``: retried upstream attempts.
    - ``zoomvlm_rejected_total{reason}``: requests refused before model work (bad input, limits, overload).
    - ``zoomvlm_batch_size{stage}``: items per policy / local target call (batching across clients).
    - ``zoomvlm_queue_depth``: admitted requests waiting for a processing slot.
    - ``zoomvlm_in_flight``: requests being processed.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "zoomvlm_requests", "finished /v1 requests by HTTP status", ["path", "status"], registry=r
        )
        self.policy_seconds = Histogram(
            "zoomvlm_policy_seconds", "zoom policy latency per request", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.upstream_seconds = Histogram(
            "zoomvlm_upstream_seconds", "upstream (or local target) latency", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.crops = Histogram(
            "zoomvlm_crops_per_request", "crops sent per request", buckets=(0, 1, 2, 3, 4, 6, 8, 16), registry=r
        )
        self.rtr = Histogram(
            "zoomvlm_rtr",
            "retain token ratio per request (pixels sent / native pixels)",
            buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0),
            registry=r,
        )
        self.fail_open = Counter(
            "zoomvlm_fail_open", "requests forwarded without crops after a policy failure", ["reason"], registry=r
        )
        self.retries = Counter("zoomvlm_upstream_retries", "retried upstream attempts", registry=r)
        self.rejected = Counter("zoomvlm_rejected", "requests refused before model work", ["reason"], registry=r)
        self.batch_size = Histogram(
            "zoomvlm_batch_size", "items per policy / target call", ["stage"], buckets=(1, 2, 4, 8, 16, 32), registry=r
        )
        self.queue_depth = Gauge("zoomvlm_queue_depth", "admitted requests waiting for a slot", registry=r)
        self.in_flight = Gauge("zoomvlm_in_flight", "requests being processed", registry=r)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
