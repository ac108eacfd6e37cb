"""The HTTP API: OpenAI's routes over the orchestrator, with tokens, request ids, metrics and logs."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from opentelemetry.trace import Span, Status, StatusCode, Tracer
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coolfusion.client import AsyncFusionClient, CoolfusionError, FuseOptions
from coolfusion.gateway.errors import ApiError, from_orchestrator, invalid
from coolfusion.gateway.metrics import GatewayMetrics
from coolfusion.gateway.models import ModelCatalogue
from coolfusion.gateway.parsing import FusionCall, parse_chat, parse_completion
from coolfusion.gateway.responses import Reply
from coolfusion.gateway.settings import GatewaySettings
from coolfusion.gateway.streaming import completion_events
from coolfusion.serving.security import TokenFile, accepts
from coolfusion.serving.tracing import continue_trace, trace_headers

logger = logging.getLogger(__name__)

T = TypeVar("T")
# Probes (kubelet, load balancers) call these without a token; they reveal only up or down.
HEALTH_PATHS = ("/health", "/health/ready")
_ROUTES = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/responses", *HEALTH_PATHS)
# A caller's X-Request-Id is kept when it looks like an id (the characters the workers accept).
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# nginx's code for a request whose client closed the connection: recorded, never received.
CLIENT_CLOSED = 499


class ClientGone(Exception):
    """The client disconnected before its answer was ready; the fusion was cancelled."""


class GatewayApi:
    """The endpoints; each request is one orchestrator call (plus a cached ListWorkers)."""

    def __init__(self, settings: GatewaySettings, client: AsyncFusionClient, metrics: GatewayMetrics):
        self._settings = settings
        self._client = client
        self._metrics = metrics
        self._catalogue = ModelCatalogue(client, settings.model_name, settings.models_ttl_s, int(time.time()))

    async def list_models(self, request: Request) -> Response:
        return JSONResponse(await self._orchestrator(self._catalogue.listing(), "model"))

    async def get_model(self, request: Request) -> Response:
        return JSONResponse(await self._orchestrator(self._catalogue.card(request.path_params["model"]), "model"))

    async def chat_completions(self, request: Request) -> Response:
        return await self._complete(request, parse_chat)

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, parse_completion)

    async def responses(self, request: Request) -> Response:
        """The Responses API is not served (docs/http-api.md, "Not served"): a 404 that says where
        to go instead, rather than the router's bare one."""
        raise ApiError(
            404,
            f"{request.method} {request.url.path} is not served here: coolfusion answers through "
            "POST /v1/chat/completions (and POST /v1/completions). The Responses API keeps conversation "
            "state, tools and reasoning items that a fusion of models has no part in.",
            code="unsupported_endpoint",
        )

    async def health(self, request: Request) -> Response:
        """Liveness: the process answers HTTP."""
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        """Readiness: the orchestrator's health service reports SERVING."""
        if await self._client.is_serving(timeout_s=self._settings.ready_timeout_s):
            return JSONResponse({"status": "ready"})
        reason = f"the orchestrator at {self._settings.orchestrator.address} is unreachable or not serving"
        return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)

    async def _complete(self, request: Request, parse: Callable[[dict[str, Any]], FusionCall]) -> Response:
        started = time.perf_counter()
        call = parse(await read_json(request, self._settings.max_body_bytes))
        options = await self._orchestrator(self._catalogue.options_for(call), call.prompt_param)
        reply = Reply(request.state.request_id, call, int(time.time()))
        if call.stream:
            return await self._stream(request, reply, options, started)
        fused = self._client.fuse_choices(
            call.prompt, options, timeout_s=self._settings.request_timeout_s, metadata=trace_headers()
        )
        results = await self._orchestrator(self._until_disconnected(request, fused), call.prompt_param)
        for result in results:
            self._metrics.count_tokens(result)
        logger.info("fusion %s answered", results[0].request_id, extra={"request_id": reply.request_id})
        return JSONResponse(reply.completion(results))

    async def _stream(self, request: Request, reply: Reply, options: FuseOptions, started: float) -> Response:
        """Waits for the first segment, so that a refused request still gets its HTTP status, then
        streams the rest."""
        events = self._client.fuse_stream(
            reply.call.prompt, options, timeout_s=self._settings.request_timeout_s, metadata=trace_headers()
        )
        try:
            first = await self._orchestrator(self._until_disconnected(request, anext(events)), reply.call.prompt_param)
        except BaseException:
            await events.aclose()
            raise
        body = completion_events(reply, first, events, options, self._metrics, started)
        # Starlette cancels the body's task when the client disconnects (it listens for
        # http.disconnect while streaming), which cancels the FuseStream call.
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering
        return StreamingResponse(body, media_type="text/event-stream", headers=headers)

    async def _orchestrator(self, call: Awaitable[T], prompt_param: str) -> T:
        """Awaits an orchestrator call; its failure becomes the matching HTTP error."""
        try:
            return await call
        except CoolfusionError as error:
            raise from_orchestrator(error, prompt_param) from None

    async def _until_disconnected(self, request: Request, work: Awaitable[T]) -> T:
        """Awaits `work`, cancelling it when the client disconnects first (its fusion then stops)."""
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        finally:
            watcher.cancel()
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        self._metrics.disconnects.inc()
        raise ClientGone()


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects; the body must have been read already."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object, read only up to `limit` bytes (413 beyond)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(f"is {int(declared)} bytes", limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(f"exceeds {limit} bytes", limit)
    try:
        data = json.loads(body)
    except ValueError as error:  # UnicodeDecodeError is one
        raise invalid(f"the body is not valid JSON: {error}", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise invalid("the body must be a JSON object", None, "invalid_json")
    return data


def _too_large(size: str, limit: int) -> ApiError:
    message = f"the request body {size}; the limit is {limit} bytes (--max-body-bytes)"
    return ApiError(413, message, code="request_too_large")


# ---- errors -------------------------------------------------------------------------------------


def error_response(error: ApiError) -> JSONResponse:
    headers = {}
    if error.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if error.status in (429, 503):
        headers["Retry-After"] = "1"
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


async def _api_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, ApiError)
    return error_response(error)


async def _http_error(request: Request, error: Exception) -> Response:
    """The router's own 404 and 405, in OpenAI's shape."""
    assert isinstance(error, HTTPException)
    code = "not_found" if error.status_code == 404 else "method_not_allowed"
    message = f"{request.method} {request.url.path}: {error.detail}"
    return error_response(ApiError(error.status_code, message, code=code))


async def _client_gone(request: Request, error: Exception) -> Response:
    return Response(status_code=CLIENT_CLOSED)


async def _unexpected(request: Request, error: Exception) -> Response:
    """Anything unexpected: a 500 naming only the exception's type (the log has the traceback)."""
    return error_response(ApiError(500, f"internal error ({type(error).__name__})", code="internal_error"))


# ---- per request --------------------------------------------------------------------------------


class RequestScope:
    """Wraps every HTTP request: its id (X-Request-Id, kept from the caller when valid), its span
    in the caller's trace, the bearer token check, metrics and one log line. A plain ASGI
    middleware: streams and their cancellation pass through untouched."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics, tokens: TokenFile | None, tracer: Tracer | None):
        self._app = app
        self._metrics = metrics
        self._tokens = tokens
        self._tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self._app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        route, method = _route(scope["path"]), scope["method"]
        attributes = {"http.request.method": method, "http.route": route, "url.path": scope["path"]}
        with continue_trace(self._tracer, headers, f"{method} {route}", attributes) as span:
            await self._serve(scope, receive, send, span)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, span: Span | None) -> None:
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        self._metrics.in_flight.inc()
        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await error_response(refusal)(scope, receive, send_with_id)
            else:
                await self._app(scope, receive, send_with_id)
        finally:
            self._metrics.in_flight.dec()
            self._record(scope, status, time.perf_counter() - started, request_id)
            if span is not None:
                _record_http_status(span, status, request_id)

    def _refusal(self, scope: Scope) -> ApiError | None:
        """Why the request is refused (401), or None: no tokens configured, a probe, or a valid token."""
        if self._tokens is None or scope["path"] in HEALTH_PATHS:
            return None
        values = [v for k, v in scope["headers"] if k == b"authorization"]
        scheme, _, presented = (values[0] if len(values) == 1 else b"").partition(b" ")
        if scheme.lower() != b"bearer" or not presented.strip():
            return ApiError(401, "missing bearer token: send 'Authorization: Bearer <token>'", code="missing_api_key")
        return (
            None
            if accepts(self._tokens, presented.strip())
            else ApiError(401, "invalid bearer token", code="invalid_api_key")
        )

    def _record(self, scope: Scope, status: int, seconds: float, request_id: str) -> None:
        path, method = scope["path"], scope["method"]
        route = _route(path)
        self._metrics.requests.labels(route, method, str(status)).inc()
        self._metrics.request_seconds.labels(route, method, str(status)).observe(seconds)
        if path not in HEALTH_PATHS:  # probes every few seconds would drown the log
            logger.info("%s %s %d %.3f s", method, path, status, seconds, extra={"request_id": request_id})


def _route(path: str) -> str:
    """The route a path belongs to, as metrics and spans name it (never the model a path names)."""
    if path in _ROUTES:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "/v1/responses/{id}" if path.startswith("/v1/responses/") else "other"


def _record_http_status(span: Span, status: int, request_id: str) -> None:
    span.set_attribute("http.response.status_code", status)
    span.set_attribute("coolfusion.request_id", request_id)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR, str(status)))


def _request_id(scope: Scope) -> str:
    given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")
    return given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def build_app(
    settings: GatewaySettings, client: AsyncFusionClient, metrics: GatewayMetrics, tracer: Tracer | None = None
) -> ASGIApp:
    """The gateway's ASGI application."""
    api = GatewayApi(settings, client, metrics)
    routes = [
        Route("/v1/models", api.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", api.get_model, methods=["GET"]),
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/responses", api.responses, methods=["GET", "POST", "DELETE"]),
        Route("/v1/responses/{rest:path}", api.responses, methods=["GET", "POST", "DELETE"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/health/ready", api.ready, methods=["GET"]),
    ]
    handlers = {ApiError: _api_error, HTTPException: _http_error, ClientGone: _client_gone, Exception: _unexpected}
    app = Starlette(routes=routes, exception_handlers=handlers)
    return RequestScope(app, metrics, settings.auth_tokens, tracer)
