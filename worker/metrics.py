"""The worker's Prometheus metrics: its RPCs, its session cache and its model thread's queue."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from coolfusion.serving.metrics import RpcMetrics
from coolfusion.worker.sessions import Load


class SessionLoadCollector(Collector):
    """The worker's session-cache figures, as sampled on the model thread after its last call.

    The session store is not thread-safe, so a scrape (on the HTTP server's thread) never reads
    it: `sample` runs on the model thread (ModelThread's `after_each`) and `collect` reads the copy.
    """

    def __init__(self) -> None:
        self._read_load: Callable[[], Load] | None = None
        self._load: Load | None = None

    def watch(self, read_load: Callable[[], Load]) -> None:
        """Starts sampling `read_load` (the store's `load`), once the model is attached."""
        self._read_load = read_load

    def sample(self) -> None:
        if self._read_load is not None:
            self._load = self._read_load()

    def collect(self) -> Iterator[Metric]:
        load = self._load
        yield GaugeMetricFamily(
            "coolfusion_worker_sessions", "Sessions open on this worker.", value=load.open_sessions if load else 0
        )
        yield GaugeMetricFamily(
            "coolfusion_worker_cached_tokens",
            "Tokens held in the KV caches of all sessions.",
            value=load.cached_tokens if load else 0,
        )
        evictions = CounterMetricFamily(
            "coolfusion_worker_session_evictions",
            "Sessions evicted, by cause: ttl (idle too long), token_budget (LRU, to make room), max_sessions.",
            labels=["cause"],
        )
        for cause, count in (load.evicted_by_cause if load else {}).items():
            evictions.add_metric([cause], count)
        yield evictions


class WorkerMetrics:
    """Everything a worker exports: its RPCs, its session cache and its model thread's queue."""

    def __init__(self, registry: CollectorRegistry, token_budget: int):
        self.registry = registry
        self.rpc = RpcMetrics(registry)
        self.sessions = SessionLoadCollector()
        registry.register(self.sessions)
        self._queue_depth = Gauge(
            "coolfusion_worker_model_queue_depth",
            "Model calls waiting for the model thread or running on it.",
            registry=registry,
        )
        budget = Gauge("coolfusion_worker_token_budget", "Cached tokens allowed over all sessions.", registry=registry)
        budget.set(token_budget)

    def watch_queue(self, depth: Callable[[], int]) -> None:
        """Reads the queue depth at each scrape (a plain integer read, safe from any thread)."""
        self._queue_depth.set_function(depth)
