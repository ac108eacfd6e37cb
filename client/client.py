"""Python client for OrchestratorService: a sync and an asyncio class, with deadlines and typed errors."""

from __future__ import annotations

import warnings
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from types import TracebackType
from typing import Any, Self, TypedDict, Unpack

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coolfusion.client.structured import ToolChoiceLike, ToolLike, chat_prompt, tool_choice
from coolfusion.v1 import orchestrator_pb2, orchestrator_pb2_grpc, worker_pb2

# A prompt is plain text, or chat turns such as [{"role": "user", "content": "Hi"}] (an assistant
# turn may carry OpenAI-shaped "tool_calls", a "tool" turn its "tool_call_id").
PromptLike = str | Sequence[Mapping[str, Any]]
Metadata = tuple[tuple[str, str], ...]
_SERVING = health_pb2.HealthCheckResponse.SERVING
# Every call goes to the next of the addresses the target resolves to: with a headless Service
# (`dns:///name.namespace.svc:port`) calls spread over its pods; with one address it changes nothing.
_CHANNEL_OPTIONS = (("grpc.lb_policy_name", "round_robin"),)


class CoolfusionError(Exception):
    """A failed orchestrator call: its gRPC status code and the server's explanation."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class InvalidArgumentError(CoolfusionError):
    """The request was malformed or out of range (for example an unknown worker name)."""


class UnavailableError(CoolfusionError):
    """The orchestrator (or every worker) could not be reached, or is loading or draining."""


class DeadlineExceededError(CoolfusionError):
    """The call did not finish before its deadline."""


class ResourceExhaustedError(CoolfusionError):
    """A memory or queue limit was hit; retrying later may succeed."""


class NotFoundError(CoolfusionError):
    """Something the request named does not exist."""


_ERROR_TYPES: dict[grpc.StatusCode, type[CoolfusionError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
}


def error_from_rpc(error: grpc.RpcError) -> CoolfusionError:
    """Maps a failed gRPC call to the typed exception for its status code (others: the base class)."""
    # A bare grpc.RpcError need not carry a status (the interface declares no methods); treat it as UNKNOWN.
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = error.details() if callable(getattr(error, "details", None)) else str(error)
    return _ERROR_TYPES.get(code, CoolfusionError)(code, details or "")


def chat(text: str, *, system: str | None = None) -> list[dict[str, str]]:
    """One user turn (optionally after a system turn), in the form `fuse` accepts as a chat prompt."""
    turns = [{"role": "system", "content": system}] if system else []
    return [*turns, {"role": "user", "content": text}]


@dataclass(frozen=True)
class FuseOptions:
    """How one fusion runs; zero numbers, empty tuples and an unset strategy mean the orchestrator's defaults."""

    workers: tuple[str, ...] = ()  # worker names (default: all)
    max_new_tokens: int = 0  # answer length, in the first worker's tokens
    stop: tuple[str, ...] = ()  # the answer is cut before the first of these strings
    segment_max_tokens: int = 0  # per-step cap, tokens
    rerank: bool = False  # Cool+R: also rank the workers' solo answers
    trace: bool = False  # return every step's candidates and winner
    strategy: orchestrator_pb2.FusionStrategy | None = None  # see fusion_strategy
    # The language the answer is held to: json_schema(...), json_object(), regex(...) or lark_grammar(...).
    constraint: worker_pb2.Constraint | None = None
    tools: tuple[ToolLike, ...] = ()  # functions a chat answer may call, in the OpenAI API's shape
    tool_choice: ToolChoiceLike = ""  # "auto" (the default with tools), "none", "required" or a named function
    parallel_tool_calls: bool | None = None  # None: an answer may call several tools
    temperature: float = 0.0  # 0-2 (0: greedy); each worker draws its proposals at this temperature
    top_p: float = 0.0  # nucleus filter of the proposals, (0, 1] (0: none)
    top_k: int = 0  # top-k filter of the proposals (0: none)
    seed: int | None = None  # the same seed gives the same answers; None: the orchestrator draws one
    selection: str = ""  # "best" (the default) or "sample": how a step's winner is chosen when sampling
    n: int = 0  # answers to fuse (0: one); read them with fuse_choices
    tag: str = ""  # what the request is (a task, a tenant): a default calibration runs only inside its scope
    route: str = ""  # a route of the orchestrator's registry: runs with the calibration it names

    def __post_init__(self) -> None:
        # Any iterable of names is accepted; stored as tuples so the options stay immutable.
        object.__setattr__(self, "workers", tuple(self.workers))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "tools", tuple(self.tools))


class OptionKeywords(TypedDict, total=False):
    """FuseOptions' fields passed as keywords of `fuse`, `fuse_stream` and `fusion_parameters`: the
    form before FuseOptions (coolfusion 0.1), deprecated since 0.2 (docs/client.md, "Compatibility")."""

    workers: Iterable[str]
    max_new_tokens: int
    stop: Iterable[str]
    segment_max_tokens: int
    rerank: bool
    trace: bool
    strategy: orchestrator_pb2.FusionStrategy | None


_OPTION_FIELDS = tuple(f.name for f in fields(FuseOptions))


def resolve_options(options: FuseOptions | None, keywords: OptionKeywords, caller: str) -> FuseOptions | None:
    """The options of a call made in either form: FuseOptions, or (deprecated) its fields as keywords."""
    if not keywords:
        return options
    if unknown := [name for name in keywords if name not in _OPTION_FIELDS]:
        raise TypeError(f"{caller}() got an unexpected keyword argument {unknown[0]!r}")
    if options is not None:
        raise TypeError(f"{caller}() takes FuseOptions or its fields as keywords, not both")
    spelled = ", ".join(f"{name}=..." for name in keywords)
    warnings.warn(
        f"{caller}(prompt, {spelled}) is deprecated since coolfusion 0.2 and may be removed in 0.3: "
        f"pass {caller}(prompt, FuseOptions({spelled}))",
        DeprecationWarning,
        stacklevel=3,
    )
    given: dict[str, Any] = dict(keywords)
    return FuseOptions(**given)  # FuseOptions stores any iterable of names as a tuple


def fusion_parameters(
    prompt: PromptLike, options: FuseOptions | None = None, **keywords: Unpack[OptionKeywords]
) -> orchestrator_pb2.FusionParameters:
    """Builds the request parameters for `prompt`; no options means the orchestrator's defaults throughout."""
    options = resolve_options(options, keywords, "fusion_parameters") or FuseOptions()
    return orchestrator_pb2.FusionParameters(
        prompt=_prompt(prompt, options.tools),
        workers=options.workers,
        max_new_tokens=options.max_new_tokens,
        stop_strings=options.stop,
        segment_max_tokens=options.segment_max_tokens,
        rerank_mode=orchestrator_pb2.RERANK_MODE_FULL_ANSWER if options.rerank else orchestrator_pb2.RERANK_MODE_NONE,
        include_trace=options.trace,
        strategy=options.strategy,
        constraint=options.constraint,
        tool_choice=tool_choice(options.tool_choice),
        parallel_tool_calls=options.parallel_tool_calls,
        sampling=_sampling(options),
        n=options.n,
        tag=options.tag,
        route=options.route,
    )


def _sampling(options: FuseOptions) -> orchestrator_pb2.Sampling:
    try:
        selection = f"SELECTION_{options.selection.upper()}" if options.selection else None
        return orchestrator_pb2.Sampling(
            temperature=options.temperature, top_p=options.top_p, top_k=options.top_k, seed=options.seed,
            selection=selection,
        )  # fmt: skip
    except ValueError as error:
        raise ValueError(f"unknown sampling option: {error}") from None


def _option_names(enum, prefix: str) -> tuple[str, ...]:
    names = (value.name for value in enum.DESCRIPTOR.values)
    return tuple(n.removeprefix(prefix).lower() for n in names if not n.endswith("_UNSPECIFIED"))


# The strategy options a request may name, as docs and flags spell them ("nll_mean", "stop"),
# read from the protocol itself so that every tool offers exactly what the orchestrator knows.
AGGREGATIONS = _option_names(orchestrator_pb2.Aggregation, "AGGREGATION_")
REPETITION_GUARDS = _option_names(orchestrator_pb2.RepetitionGuard, "REPETITION_GUARD_")
SELECTIONS = _option_names(orchestrator_pb2.Selection, "SELECTION_")


def fusion_strategy(
    aggregation: str = "",
    repetition_guard: str = "",
    weights: Mapping[str, float] | None = None,
    prompt_templates: Mapping[str, str] | None = None,
    calibration: str = "",
) -> orchestrator_pb2.FusionStrategy:
    """A FusionStrategy from the names used in docs and flags ("nll_mean", "stop"); "" leaves a
    field to the orchestrator's default. `calibration` names a fitted rule the orchestrator loaded."""
    try:
        return orchestrator_pb2.FusionStrategy(
            aggregation=f"AGGREGATION_{aggregation.upper()}" if aggregation else None,
            repetition_guard=f"REPETITION_GUARD_{repetition_guard.upper()}" if repetition_guard else None,
            worker_weights=weights or {},
            prompt_templates=prompt_templates or {},
            calibration=calibration,
        )
    except ValueError as error:
        raise ValueError(f"unknown strategy option: {error}") from None


def _prompt(prompt: PromptLike, tools: Sequence[ToolLike]) -> worker_pb2.Prompt:
    if not isinstance(prompt, str):
        return chat_prompt(prompt, tools)
    if tools:
        raise ValueError("tools are offered to a chat prompt; this prompt is plain text")
    return worker_pb2.Prompt(text=prompt)


def _choices(response: orchestrator_pb2.FuseResponse) -> list[orchestrator_pb2.FuseResult]:
    return list(response.choices) or [response.result]


# A bearer token, or a function that returns the token to send now (one that rotates).
Token = str | Callable[[], str]


def _credentials(
    root_certificates: bytes | None, client_certificate: tuple[bytes, bytes] | None
) -> grpc.ChannelCredentials | None:
    """TLS when given a CA or a client certificate (mutual TLS); None means plaintext."""
    if not (root_certificates or client_certificate):
        return None
    chain, key = client_certificate or (None, None)
    # Without a CA, gRPC verifies the server against the system's roots.
    return grpc.ssl_channel_credentials(root_certificates or None, private_key=key, certificate_chain=chain)


class _ClientBase:
    """What both clients share: the address, the default deadline and the auth metadata."""

    def __init__(
        self,
        address: str,
        timeout_s: float,
        root_certificates: bytes | None,
        token: Token | None,
        client_certificate: tuple[bytes, bytes] | None,
    ):
        self.address = address
        self._timeout_s = timeout_s
        self._credentials = _credentials(root_certificates, client_certificate)
        self._token = token

    def _timeout(self, timeout_s: float | None) -> float:
        return self._timeout_s if timeout_s is None else timeout_s

    def _metadata(self, metadata: Metadata = ()) -> Metadata:
        """The client's token, then the call's own metadata (a `traceparent` joins the caller's trace).

        The token goes in each call's metadata rather than in call credentials, which gRPC refuses
        on plaintext channels (a local cluster, or a TLS-terminating proxy in front of the orchestrator).
        """
        token = self._token() if callable(self._token) else self._token
        return ((("authorization", f"Bearer {token}"),) if token else ()) + tuple(metadata)


class FusionClient(_ClientBase):
    """Blocking client; a context manager that closes its channel."""

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = 600.0,
        root_certificates: bytes | None = None,
        token: Token | None = None,
        client_certificate: tuple[bytes, bytes] | None = None,
    ):
        """`root_certificates` (PEM) turns on TLS; `client_certificate` is (chain, key) PEM for mutual TLS;
        `token` is a bearer token, or a function returning the one to send (called before every call)."""
        super().__init__(address, timeout_s, root_certificates, token, client_certificate)
        if self._credentials:
            self._channel = grpc.secure_channel(address, self._credentials, options=_CHANNEL_OPTIONS)
        else:
            self._channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self._stub = orchestrator_pb2_grpc.OrchestratorServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def fuse(
        self,
        prompt: PromptLike,
        options: FuseOptions | None = None,
        *,
        timeout_s: float | None = None,
        metadata: Metadata = (),
        **keywords: Unpack[OptionKeywords],
    ) -> orchestrator_pb2.FuseResult:
        """Runs one fusion to the end and returns its result (the first answer, with n > 1)."""
        options = resolve_options(options, keywords, "fuse")
        return self._fuse(prompt, options, timeout_s, metadata).result

    def fuse_choices(
        self, prompt: PromptLike, options: FuseOptions, *, timeout_s: float | None = None, metadata: Metadata = ()
    ) -> list[orchestrator_pb2.FuseResult]:
        """Runs a fusion of `options.n` answers to the end; returns every answer, in choice order."""
        return _choices(self._fuse(prompt, options, timeout_s, metadata))

    def _fuse(
        self, prompt: PromptLike, options: FuseOptions | None, timeout_s: float | None, metadata: Metadata
    ) -> orchestrator_pb2.FuseResponse:
        request = orchestrator_pb2.FuseRequest(parameters=fusion_parameters(prompt, options))
        try:
            return self._stub.Fuse(request, timeout=self._timeout(timeout_s), metadata=self._metadata(metadata))
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None

    def fuse_stream(
        self,
        prompt: PromptLike,
        options: FuseOptions | None = None,
        *,
        timeout_s: float | None = None,
        metadata: Metadata = (),
        **keywords: Unpack[OptionKeywords],
    ) -> Iterator[orchestrator_pb2.FuseStreamResponse]:
        """Yields one event per chosen segment, then the summary; leaving the loop early cancels the fusion."""
        options = resolve_options(options, keywords, "fuse_stream")
        request = orchestrator_pb2.FuseStreamRequest(parameters=fusion_parameters(prompt, options))
        call = self._stub.FuseStream(request, timeout=self._timeout(timeout_s), metadata=self._metadata(metadata))
        try:
            yield from call
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None
        finally:
            call.cancel()  # a no-op once finished; stops the server's work when the caller stops early

    def explore(
        self,
        prompt: PromptLike,
        options: FuseOptions | None = None,
        *,
        max_nodes: int = 0,
        timeout_s: float | None = None,
    ) -> orchestrator_pb2.FusionTree:
        """Every answer a fusion with these options could give, for calibration (ExploreFusion);
        `max_nodes` 0 takes the orchestrator's default."""
        request = orchestrator_pb2.ExploreFusionRequest(
            parameters=fusion_parameters(prompt, options), max_nodes=max_nodes
        )
        try:
            response = self._stub.ExploreFusion(request, timeout=self._timeout(timeout_s), metadata=self._metadata())
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None
        return response.tree

    def list_workers(self, *, timeout_s: float | None = None) -> list[orchestrator_pb2.WorkerStatus]:
        """The registered workers with their health and description."""
        return list(self.describe(timeout_s=timeout_s).workers)

    def describe(self, *, timeout_s: float | None = None) -> orchestrator_pb2.ListWorkersResponse:
        """The orchestrator's version and its registered workers, with their health and description."""
        request = orchestrator_pb2.ListWorkersRequest()
        try:
            return self._stub.ListWorkers(request, timeout=self._timeout(timeout_s), metadata=self._metadata())
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None

    def is_serving(self, *, timeout_s: float = 2.0) -> bool:
        """Whether the orchestrator's grpc.health.v1 check reports SERVING; False when it cannot be reached."""
        request = health_pb2.HealthCheckRequest()
        try:
            response = self._health.Check(request, timeout=timeout_s, metadata=self._metadata())
        except grpc.RpcError:
            return False
        return response.status == _SERVING

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class AsyncFusionClient(_ClientBase):
    """asyncio client (grpc.aio); an async context manager that closes its channel."""

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = 600.0,
        root_certificates: bytes | None = None,
        token: Token | None = None,
        client_certificate: tuple[bytes, bytes] | None = None,
    ):
        """`root_certificates` (PEM) turns on TLS; `client_certificate` is (chain, key) PEM for mutual TLS;
        `token` is a bearer token, or a function returning the one to send (called before every call)."""
        super().__init__(address, timeout_s, root_certificates, token, client_certificate)
        if self._credentials:
            self._channel = grpc.aio.secure_channel(address, self._credentials, options=_CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self._stub = orchestrator_pb2_grpc.OrchestratorServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def fuse(
        self,
        prompt: PromptLike,
        options: FuseOptions | None = None,
        *,
        timeout_s: float | None = None,
        metadata: Metadata = (),
        **keywords: Unpack[OptionKeywords],
    ) -> orchestrator_pb2.FuseResult:
        """Runs one fusion to the end and returns its result (the first answer, with n > 1)."""
        options = resolve_options(options, keywords, "fuse")
        return (await self._fuse(prompt, options, timeout_s, metadata)).result

    async def fuse_choices(
        self, prompt: PromptLike, options: FuseOptions, *, timeout_s: float | None = None, metadata: Metadata = ()
    ) -> list[orchestrator_pb2.FuseResult]:
        """Runs a fusion of `options.n` answers to the end; returns every answer, in choice order."""
        return _choices(await self._fuse(prompt, options, timeout_s, metadata))

    async def _fuse(
        self, prompt: PromptLike, options: FuseOptions | None, timeout_s: float | None, metadata: Metadata
    ) -> orchestrator_pb2.FuseResponse:
        request = orchestrator_pb2.FuseRequest(parameters=fusion_parameters(prompt, options))
        try:
            return await self._stub.Fuse(request, timeout=self._timeout(timeout_s), metadata=self._metadata(metadata))
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None

    async def fuse_stream(
        self,
        prompt: PromptLike,
        options: FuseOptions | None = None,
        *,
        timeout_s: float | None = None,
        metadata: Metadata = (),
        **keywords: Unpack[OptionKeywords],
    ) -> AsyncGenerator[orchestrator_pb2.FuseStreamResponse, None]:
        """Yields one event per chosen segment, then the summary; leaving the loop early cancels the fusion."""
        options = resolve_options(options, keywords, "fuse_stream")
        request = orchestrator_pb2.FuseStreamRequest(parameters=fusion_parameters(prompt, options))
        call = self._stub.FuseStream(request, timeout=self._timeout(timeout_s), metadata=self._metadata(metadata))
        try:
            async for event in call:
                yield event
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None
        finally:
            call.cancel()

    async def explore(
        self,
        prompt: PromptLike,
        options: FuseOptions | None = None,
        *,
        max_nodes: int = 0,
        timeout_s: float | None = None,
    ) -> orchestrator_pb2.FusionTree:
        """Every answer a fusion with these options could give, for calibration (ExploreFusion);
        `max_nodes` 0 takes the orchestrator's default."""
        request = orchestrator_pb2.ExploreFusionRequest(
            parameters=fusion_parameters(prompt, options), max_nodes=max_nodes
        )
        try:
            response = await self._stub.ExploreFusion(
                request, timeout=self._timeout(timeout_s), metadata=self._metadata()
            )
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None
        return response.tree

    async def list_workers(self, *, timeout_s: float | None = None) -> list[orchestrator_pb2.WorkerStatus]:
        """The registered workers with their health and description."""
        return list((await self.describe(timeout_s=timeout_s)).workers)

    async def describe(self, *, timeout_s: float | None = None) -> orchestrator_pb2.ListWorkersResponse:
        """The orchestrator's version and its registered workers, with their health and description."""
        request = orchestrator_pb2.ListWorkersRequest()
        try:
            return await self._stub.ListWorkers(request, timeout=self._timeout(timeout_s), metadata=self._metadata())
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None

    async def is_serving(self, *, timeout_s: float = 2.0) -> bool:
        """Whether the orchestrator's grpc.health.v1 check reports SERVING; False when it cannot be reached."""
        request = health_pb2.HealthCheckRequest()
        try:
            response = await self._health.Check(request, timeout=timeout_s, metadata=self._metadata())
        except grpc.RpcError:
            return False
        return response.status == _SERVING

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
