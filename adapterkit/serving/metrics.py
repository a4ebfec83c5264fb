"""``GET /metrics``: the server's figures in Prometheus' text format.

Two sources, one registry per app (never prometheus_client's global one, so two servers in one
process — tests, benchmarks — keep separate counts):

* what the HTTP side counts as it answers: requests by endpoint and status, prompt and
  completion tokens it returned;
* what the engine reports when scraped (:meth:`Engine.stats`): requests and tokens decoded,
  decode steps and prefills, requests that failed, queue depth, rows in the batch, the pocket
  books attached.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

__all__ = ["CONTENT_TYPE", "ServerMetrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST


class _EngineCollector:
    """Reads :meth:`Engine.stats` at each scrape (nothing is copied between scrapes)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.stats()
        yield CounterMetricFamily("adapterkit_engine_requests",
                                  "Requests the engine accepted.",
                                  value=stats.get("requests_total", 0))
        yield CounterMetricFamily("adapterkit_engine_tokens",
                                  "Tokens the engine generated (all rows, cancelled ones too).",
                                  value=stats.get("tokens_total", 0))
        yield CounterMetricFamily("adapterkit_engine_steps",
                                  "Decode steps: one forward of the base for the whole batch.",
                                  value=stats.get("steps_total", 0))
        yield CounterMetricFamily("adapterkit_engine_prefills",
                                  "Prefills: one forward for the requests joining the batch.",
                                  value=stats.get("prefills_total", 0))
        yield CounterMetricFamily("adapterkit_engine_errors",
                                  "Requests that ended with an error (a pocket book that "
                                  "could not load, a failed step).",
                                  value=stats.get("errors_total", 0))
        yield GaugeMetricFamily("adapterkit_queue_depth",
                                "Requests waiting for a row of the batch.",
                                value=stats.get("queue_depth", 0))
        yield GaugeMetricFamily("adapterkit_batch_size", "Rows decoding now.",
                                value=stats.get("batch_size", 0))
        attached = list(stats.get("attached_content", []))
        yield GaugeMetricFamily("adapterkit_attached_books",
                                "Pocket books attached to the resident base.", value=len(attached))
        # a ref re-created with other weights may be attached twice for a while (its old
        # content until the rows using it end): the content label keeps each series unique
        each = GaugeMetricFamily("adapterkit_attached_book",
                                 "1 for each pocket book attached now (content: a digest of "
                                 "its weights, config and creation time).",
                                 labels=["book", "content"])
        for ref, content in attached:
            each.add_metric([str(ref), str(content)], 1)
        yield each


class ServerMetrics:
    """The registry of one app and the counters its routes bump."""

    def __init__(self, engine: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.http_requests = Counter(
            "adapterkit_http_requests", "HTTP requests answered, by endpoint and status.",
            ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter(
            "adapterkit_prompt_tokens", "Prompt tokens of the completions answered "
            "(whole answers delivered; failed and abandoned ones are not counted).",
            registry=self.registry)
        self.completion_tokens = Counter(
            "adapterkit_completion_tokens",
            "Completion tokens returned to clients (cut at stop strings).",
            registry=self.registry)
        self.registry.register(_EngineCollector(engine))  # type: ignore[arg-type]

    def render(self) -> bytes:
        return generate_latest(self.registry)
