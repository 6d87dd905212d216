"""The daemon's Prometheus metrics: RPCs, log streams, jobs by state, retention removals."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from jobworker.retention import REASONS, Removal
from jobworker.spec import JobState


class _JobsCollector(Collector):
    def __init__(self, states: Callable[[], Iterable[JobState]]) -> None:
        self._states = states

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "jobworker_jobs", "Jobs known to the daemon, by state.", labels=["state"]
        )
        counts = collections.Counter(self._states())
        for state in JobState:
            family.add_metric([state.value], counts[state])
        yield family


class Metrics:
    """The daemon's Prometheus metrics, in a registry of their own (so several daemons can run
    in one process, as in tests)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.rpcs = Counter(
            "jobworker_rpcs",
            "RPCs handled, by method and status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.rpc_seconds = Histogram(
            "jobworker_rpc_duration_seconds",
            "RPC latency by method (a Logs stream counts until it ends).",
            ["method"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "jobworker_rpcs_in_flight",
            "RPCs being handled now, by method.",
            ["method"],
            registry=self.registry,
        )
        self.followers = Gauge(
            "jobworker_log_streams_active", "Logs streams being served now.", registry=self.registry
        )
        self.bytes_streamed = Counter(
            "jobworker_log_streamed_bytes",
            "Output bytes sent to Logs clients.",
            registry=self.registry,
        )
        self.jobs_removed = Counter(
            "jobworker_jobs_removed",
            "Ended jobs removed by retention (record and log), by the limit that removed them.",
            ["reason"],
            registry=self.registry,
        )
        for reason in REASONS:
            self.jobs_removed.labels(reason)

    def job_removed(self, removal: Removal) -> None:
        self.jobs_removed.labels(removal.reason).inc()

    def observe_jobs(self, states: Callable[[], Iterable[JobState]]) -> None:
        """Report jobs by state, read with ``states()`` at each scrape (from the HTTP thread)."""
        self.registry.register(_JobsCollector(states))

    def rpc(self, method: str, code: str, seconds: float) -> None:
        self.rpcs.labels(method, code).inc()
        self.rpc_seconds.labels(method).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
