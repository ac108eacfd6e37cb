"""The worker's settings, built once in __main__ from flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from coolfusion.serving.security import TlsServerSettings, TokenFile
from coolfusion.serving.tracing import TracingSettings

# The token budget where nothing sized it: an engine that cannot tell its free memory, and
# session stores built outside a worker (warm-up, tests). 64k tokens of SmolLM2-135M's cache
# take 3 GB in float32.
FALLBACK_TOKEN_BUDGET = 65_536


@dataclass(frozen=True)
class SessionLimits:
    """Bounds on the session cache and on what one request may ask for."""

    # Cached tokens over all sessions. None (the default) sizes it from the memory left free
    # once the model is loaded and warmed up (docs/design.md section 4.3); a number overrides.
    token_budget: int | None = None
    # Fraction of that free memory the sized budget leaves unused: allocator fragmentation,
    # candidates' temporary key copies while scoring, and the runtime's own growth.
    memory_headroom: float = 0.2
    # Each fused request holds one session per worker (two with Cool+R); 256 covers heavy load.
    max_sessions: int = 256
    # A fusion step takes seconds; a session idle for 5 minutes belongs to a dead request.
    idle_ttl_s: float = 300.0
    # Scoring batches all candidates at once; with K workers there are at most K+1 (rerank).
    max_candidates: int = 16
    # 64k characters is far above any prompt these models can read, and bounds tokenizer work.
    max_text_chars: int = 65_536
    # The design's default cap is 16; 64 leaves room for callers that want longer segments.
    max_segment_tokens: int = 64
    # docs/design.md section 2.2: a step generates at most 16 tokens unless the caller says otherwise.
    default_segment_tokens: int = 16
    # Stop strings per call and their length bound tokenizer-independent scanning work.
    max_stop_strings: int = 8
    max_stop_chars: int = 64
    # Keeping each session's KV cache between calls is the point of sessions; False (--no-cache)
    # drops it after every call so each call re-prefills the whole context: the baseline that
    # `coolfusion bench` measures the caches against. Texts and scores are the same either way.
    keep_kv_cache: bool = True


@dataclass(frozen=True)
class BatchLimits:
    """How much one forward pass of the continuous-batching scheduler may hold, and how many model
    calls may wait (docs/performance.md has the measurements behind the defaults)."""

    # Sessions (calls) advanced by one pass. Beyond ~16 a CPU pass costs about as much per
    # session as running them apart; a GPU takes far more (raise it there).
    max_sessions: int = 16
    # Tokens in one pass: decode tokens, prefill chunks and candidate tokens together. It bounds
    # how long decoding sessions wait while a long prompt is prefilled beside them, and the
    # logits a scoring pass holds at once.
    max_tokens: int = 256
    # Calls waiting or running; beyond it new calls are refused (RESOURCE_EXHAUSTED) at once
    # instead of letting latency grow without bound.
    max_queued: int = 64


@dataclass(frozen=True)
class VLLMSettings:
    """The vLLM engine's own settings (--engine vllm; docs/design.md section 4.7). The batch limits
    and --dtype apply to it as to every engine."""

    # One GPU per model pod is the product's layout; a model larger than one GPU spreads its
    # layers' weights over this many GPUs (tensor parallelism).
    tensor_parallel_size: int = 1
    # vLLM's own default: the share of each GPU's memory it may take for weights, activations and
    # the KV cache; the rest stays with the CUDA context and other processes.
    gpu_memory_utilization: float = 0.9
    # Tokens per KV block. Prefix caching reuses whole blocks only, so each call recomputes up to
    # a block of its cached context: small blocks keep that short. None: 16 on a GPU (vLLM's
    # default), 32 on the CPU, whose attention needs a multiple of 32 (its default of 128
    # recomputed up to 127 tokens per call, 140 ms against about 60 ms for one token).
    block_size: int | None = None
    # The longest context served, tokens; None: the model's own.
    max_model_len: int | None = None
    # The KV cache's size, GiB. None: on a GPU, what gpu_memory_utilization leaves after the
    # weights; on the CPU 4 GiB (about 90k tokens of SmolLM2-135M in float32), since vLLM's CPU
    # default asks for most of the host's memory, which a host shared with other workers lacks.
    kv_cache_gib: float | None = None
    # None: eager on the CPU (it starts in 15-21 s; compiling took 74-173 s here for about the
    # same speed), compiled with CUDA graphs on a GPU, where they pay.
    enforce_eager: bool | None = None


@dataclass(frozen=True)
class WorkerSettings:
    """Everything the worker process needs, resolved from the command line."""

    model: str | None = None  # a model folder or .gguf file
    preset: str | None = None  # or one of model_files.PRESETS
    host: str = "127.0.0.1"
    port: int = 50051
    device: str = "cpu"  # the whole model on one device, unless device_map is set
    # Placement by accelerate: "auto", "balanced", "sequential" or a JSON file mapping module
    # names to devices (docs/design.md section 7.1). None keeps the whole model on `device`.
    device_map: str | None = None
    max_memory: tuple[tuple[str, int], ...] = ()  # (device, bytes) caps on the weights per device
    offload_dir: Path | None = None  # disk-offloaded weights; None = <cache dir>/offload
    dtype: str = "float32"
    # 0 keeps torch's default (all cores); co-located workers should split the cores instead,
    # because oversubscribed OpenMP threads spin and slow every process down many times over.
    threads: int = 0
    cache_dir: Path | None = None  # where GGUF conversions are kept; None = model_files.default_cache_dir()
    # Kubernetes sends SIGTERM and waits terminationGracePeriodSeconds (30 by default): drain in less.
    grace_s: float = 20.0
    log_json: bool | None = None  # None: JSON when stderr is not a terminal
    limits: SessionLimits = SessionLimits()
    batch: BatchLimits = BatchLimits()
    # The model backend (worker/backend.py's load_backend): transformers is the exact reference
    # and needs nothing else installed; vllm needs the vllm package (docs/design.md section 4.7).
    engine: str = "transformers"
    vllm: VLLMSettings = VLLMSettings()
    # Prometheus endpoint on `host` (0: any free port). None, the default, serves none: several
    # servers share one host in local clusters and tests, where a fixed port would collide;
    # the Kubernetes manifests turn it on (--metrics-port).
    metrics_port: int | None = None
    tracing: TracingSettings = field(default_factory=TracingSettings)  # from the OTEL_* variables; off by default
    tls: TlsServerSettings | None = None  # None: plaintext, for loopback or a mesh that encrypts
    # Accepted bearer tokens, re-read when their file changes; None: no authentication.
    auth_tokens: TokenFile | None = field(default=None, repr=False)
