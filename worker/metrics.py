"""The worker's Prometheus metrics: its RPCs, its session cache and its model calls in flight."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from coolfusion.serving.metrics import LATENCY_BUCKETS_S, RpcMetrics
from coolfusion.worker.backend import PassStats
from coolfusion.worker.sessions import Load

BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class SessionLoadCollector(Collector):
    """The worker's session-cache figures, as sampled on the event loop after the last change.

    The session store is not thread-safe, so a scrape (on the HTTP server's thread) never reads
    it: `sample` runs on the event loop (the store's `on_change`) and `collect` reads the copy.
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


class CompileCounter(Collector):
    """Constraint grammars the worker compiled, read from the backend at each scrape (a plain
    integer read, safe from any thread)."""

    def __init__(self) -> None:
        self.read: Callable[[], int] = lambda: 0

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "coolfusion_worker_grammar_compiles",
            "Constraint grammars compiled against this model's vocabulary; a constraint seen before compiles nothing.",
            value=self.read(),
        )


class WorkerMetrics:
    """Everything a worker exports: its RPCs, its session cache and its model calls in flight."""

    def __init__(self, registry: CollectorRegistry, token_budget: int | None = None):
        self.registry = registry
        self.rpc = RpcMetrics(registry)
        self.sessions = SessionLoadCollector()
        registry.register(self.sessions)
        self.grammar_compiles = CompileCounter()
        registry.register(self.grammar_compiles)
        self._queue_depth = Gauge(
            "coolfusion_worker_model_queue_depth",
            "Model calls waiting for a forward pass or running in one.",
            registry=registry,
        )
        # Set once the model is attached: a budget sized from memory is known only then.
        self._token_budget = Gauge(
            "coolfusion_worker_token_budget", "Cached tokens allowed over all sessions.", registry=registry
        )
        if token_budget is not None:
            self._token_budget.set(token_budget)
        self._pass_sessions = Histogram(
            "coolfusion_worker_batch_sessions",
            "Sessions advanced by one forward pass (continuous batching).",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self._pass_tokens = Histogram(
            "coolfusion_worker_batch_tokens",
            "Tokens computed by one forward pass: decode tokens, prefill chunks and candidates to score.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),
            registry=registry,
        )
        self._pass_seconds = Histogram(
            "coolfusion_worker_pass_seconds",
            "Wall time of one forward pass.",
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )

    def observe_pass(self, stats: PassStats) -> None:
        """Called from the model thread after every pass (prometheus_client is thread-safe)."""
        self._pass_sessions.observe(stats.sessions)
        self._pass_tokens.observe(stats.tokens)
        self._pass_seconds.observe(stats.seconds)

    def set_token_budget(self, tokens: int) -> None:
        self._token_budget.set(tokens)

    def watch_queue(self, depth: Callable[[], int]) -> None:
        """Reads the queue depth at each scrape (a plain integer read, safe from any thread)."""
        self._queue_depth.set_function(depth)
