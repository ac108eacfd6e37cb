"""The orchestrator's settings, built once in __main__ from flags and environment."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from coolfusion.calibration import Calibration
from coolfusion.orchestrator.admission import AdmissionLimits
from coolfusion.orchestrator.registry import WorkerEntry
from coolfusion.orchestrator.strategy import DEFAULT, Strategy
from coolfusion.serving.security import TlsServerSettings, TokenFile
from coolfusion.serving.tracing import TracingSettings


@dataclass(frozen=True)
class RequestLimits:
    """Defaults and bounds for one fusion request."""

    # Enough for a worked GSM8K solution; callers ask for more explicitly.
    default_max_new_tokens: int = 256
    # Bounded so that one request cannot hold workers for hours.
    max_new_tokens: int = 4096
    # The paper's step cap (docs/design.md section 2.2).
    default_segment_tokens: int = 16
    # Workers accept at most 64 (their own limit); asking for more would only be refused there.
    max_segment_tokens: int = 64
    # Far above what the models can read; bounds parsing and tokenizer work on every worker.
    max_prompt_chars: int = 65_536
    max_stop_strings: int = 8
    max_stop_chars: int = 64
    # ExploreFusion visits at most this many nodes per request: a tree of short answers needs
    # tens, and each node costs a step on every worker.
    max_explore_nodes: int = 1024
    # Answers one request may ask for (n): each is a fusion of its own, sharing the prompt's prefill.
    max_choices: int = 8


@dataclass(frozen=True)
class OrchestratorSettings:
    """Everything the orchestrator process needs."""

    workers: tuple[WorkerEntry, ...]
    host: str = "127.0.0.1"
    port: int = 50050
    # One worker call (prefill of a long prompt on CPU is the slowest); a stuck worker is dropped after it.
    call_timeout_s: float = 120.0
    # Applies when the caller sets no deadline, so that no request runs forever.
    request_timeout_s: float = 900.0
    # How long a call may keep asking a busy worker (RESOURCE_EXHAUSTED) before the request fails
    # as overloaded; a busy worker is never dropped from a request.
    busy_wait_s: float = 30.0
    # Each client connection is closed (gracefully: calls in flight finish) after this long, so
    # that clients balancing over a headless Service resolve it again and find pods added since.
    max_connection_age_s: float = 300.0
    admission: AdmissionLimits = field(default_factory=AdmissionLimits)
    grace_s: float = 20.0
    log_json: bool | None = None
    limits: RequestLimits = field(default_factory=RequestLimits)
    # How requests that do not say otherwise fuse; registry weights and templates apply on top.
    strategy: Strategy = DEFAULT
    # Fitted selection rules requests may name (--calibration, the registry's `calibrations`), and
    # the one that requests choosing no aggregation run with where it fits their workers.
    calibrations: tuple[Calibration, ...] = ()
    default_calibration: str | None = None
    # Route name -> calibration name (--route, the registry's `routes`): names a request or the
    # HTTP gateway's model can give to run with that calibration on its workers.
    routes: Mapping[str, str] = field(default_factory=dict)
    # Prometheus endpoint on `host` (0: any free port). None, the default, serves none: several
    # servers share one host in local clusters and tests, where a fixed port would collide;
    # the Kubernetes manifests turn it on (--metrics-port).
    metrics_port: int | None = None
    tracing: TracingSettings = field(default_factory=TracingSettings)  # from the OTEL_* variables; off by default
    tls: TlsServerSettings | None = None  # None: plaintext, for loopback or a mesh that encrypts
    # Tokens the orchestrator's callers must send, re-read when their file changes; None: no authentication.
    auth_tokens: TokenFile | None = field(default=None, repr=False)
