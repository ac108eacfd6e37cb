"""Test helpers: workers on tiny models and an orchestrator, started inside the test's event loop,
and a scrape of their Prometheus endpoints."""

from __future__ import annotations

import asyncio
import inspect
import socket
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM, AutoTokenizer

from coolfusion.orchestrator.registry import WorkerEntry
from coolfusion.orchestrator.server import RunningOrchestrator, start_orchestrator
from coolfusion.orchestrator.settings import OrchestratorSettings
from coolfusion.worker.hf.backend import TransformersBackend
from coolfusion.worker.hf.model import HFModel
from coolfusion.worker.server import RunningWorker, start_worker
from coolfusion.worker.sessions import SessionStore
from coolfusion.worker.settings import BatchLimits, WorkerSettings

LOOPBACK = "127.0.0.1"
# Loopback only: an opener that ignores any proxy configured in the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def tiny_model(folder: Path, name: str) -> HFModel:
    return HFModel(AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder), name)


def tiny_backend(folder: Path, name: str, batch: BatchLimits | None = None) -> TransformersBackend:
    """The transformers backend over the tiny model in `folder`; shut it down after use."""
    return TransformersBackend(tiny_model(folder, name), "float32", batch or BatchLimits())


class StoreDriver:
    """A SessionStore driven from synchronous tests: its coroutines run on an event loop of its own."""

    def __init__(self, store: SessionStore):
        self.store = store
        self._loop = asyncio.new_event_loop()

    def __getattr__(self, name: str):
        attribute = getattr(self.store, name)
        if not inspect.iscoroutinefunction(attribute):
            return attribute
        return lambda *args: self._loop.run_until_complete(attribute(*args))

    def close_loop(self) -> None:
        self._loop.close()


async def start_tiny_worker(folder: Path, name: str, **settings) -> RunningWorker:
    """A SERVING worker on loopback (gRPC and metrics on free ports) with the tiny model in `folder`."""
    defaults = {"host": LOOPBACK, "port": 0, "metrics_port": 0, "grace_s": 0.0}
    worker_settings = WorkerSettings(**(defaults | settings))
    return await start_worker(worker_settings, tiny_backend(folder, name, worker_settings.batch))


async def start_local_orchestrator(workers: dict[str, str], **settings) -> RunningOrchestrator:
    """An orchestrator on loopback over `workers` (name -> address)."""
    entries = tuple(WorkerEntry(name, address) for name, address in workers.items())
    defaults = {"host": LOOPBACK, "port": 0, "metrics_port": 0, "grace_s": 0.0}
    return await start_orchestrator(OrchestratorSettings(workers=entries, **(defaults | settings)))


def address(running: RunningWorker | RunningOrchestrator) -> str:
    return f"{LOOPBACK}:{running.port}"


def unused_address() -> str:
    """A loopback address with nothing listening: a worker that is gone."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return f"{LOOPBACK}:{s.getsockname()[1]}"


def scrape(metrics_port: int, host: str = LOOPBACK) -> dict[tuple[str, frozenset], float]:
    """Every sample of the endpoint, by (name, labels)."""
    with _DIRECT.open(f"http://{host}:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float | None:
    """One sample's value; None when the endpoint does not export it."""
    return samples.get((name, frozenset(labels.items())))
