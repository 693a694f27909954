"""Prometheus metrics for one server, in their own registry (no process-global state).

The per-request series (requests, latency and batch-size histograms, in-flight) are plain counters
kept on the event loop thread and turned into Prometheus families only when /metrics is scraped:
prometheus_client's own ``observe()`` takes a lock and costs several µs, and a request here makes
five observations. Rare events (loads, failures, rejections) use prometheus_client directly.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class LocalHistogram:
    """Bucket counts and a sum; ``observe`` is a bisect and two adds (event-loop thread only)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, float(running)))
        return out


class ModelSeries:
    """The per-model histograms one request or batch touches."""

    __slots__ = ("batch_rows", "compute", "queue", "total")

    def __init__(self) -> None:
        self.queue = LocalHistogram(LATENCY_BUCKETS_S)
        self.compute = LocalHistogram(LATENCY_BUCKETS_S)
        self.total = LocalHistogram(LATENCY_BUCKETS_S)
        self.batch_rows = LocalHistogram(BATCH_BUCKETS)

    def on_batch(self, rows: int, compute_s: float) -> None:
        self.batch_rows.observe(rows)
        self.compute.observe(compute_s)


class ServeMetrics(Collector):
    """Requests, latency (queue/compute/total), batch sizes, in-flight, rejections, loads, process RSS/CPU."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total
        self.requests: dict[tuple[str, str, str], int] = {}
        self.series: dict[str, ModelSeries] = {}
        self.in_flight = 0
        self.rejections = Counter("slipstream_rejections", "Requests refused, by reason.", ["reason"], registry=r)
        self.load_seconds = Gauge(
            "slipstream_model_load_seconds", "Load + verify + warm-up time.", ["model", "version"], registry=r
        )
        self.load_failures = Counter(
            "slipstream_model_load_failures", "Versions refused at load.", ["model", "version"], registry=r
        )
        self.signature_refusals = Counter(
            "slipstream_signature_refusals",
            "Versions refused by --require-signature, by reason (unsigned, modified, untrusted, unreadable).",
            ["model", "reason"],
            registry=r,
        )
        self.model_ready = Gauge(
            "slipstream_model_ready", "1 while a version serves traffic.", ["model", "version"], registry=r
        )
        r.register(self)
        # Under `serve --workers N`: merges this worker's exposition with its siblings' (serve.workers).
        self.aggregate: Callable[[bytes], bytes] | None = None

    def model(self, name: str) -> ModelSeries:
        series = self.series.get(name)
        if series is None:
            series = self.series[name] = ModelSeries()
        return series

    def count_request(self, model: str, version: str, status: int) -> None:
        key = (model, version, str(status))
        self.requests[key] = self.requests.get(key, 0) + 1

    def describe(self) -> Iterator[CounterMetricFamily]:
        return iter(())  # families are built at scrape time

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        requests = CounterMetricFamily(
            "slipstream_requests",
            "Infer requests by model, version and HTTP status.",
            labels=["model", "version", "status"],
        )
        for (model, version, status), count in sorted(self.requests.items()):
            requests.add_metric([model, version, status], count)
        yield requests
        yield GaugeMetricFamily(
            "slipstream_in_flight_requests", "Infer requests being handled now.", value=self.in_flight
        )
        families = {
            "queue": HistogramMetricFamily(
                "slipstream_queue_seconds", "Time a request waited for its batch.", labels=["model"]
            ),
            "compute": HistogramMetricFamily("slipstream_compute_seconds", "Model time per batch.", labels=["model"]),
            "total": HistogramMetricFamily(
                "slipstream_request_seconds", "Server time per infer request.", labels=["model"]
            ),
            "batch_rows": HistogramMetricFamily("slipstream_batch_size", "Rows per model call.", labels=["model"]),
        }
        for name, series in sorted(self.series.items()):
            for attr, family in families.items():
                hist: LocalHistogram = getattr(series, attr)
                family.add_metric([name], hist.buckets(), hist.total)
        yield from families.values()

    def render(self) -> bytes:
        """The exposition /metrics answers: this server's, or every worker's summed (``aggregate``)."""
        own = generate_latest(self.registry)
        return own if self.aggregate is None else self.aggregate(own)
