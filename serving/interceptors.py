"""Server interceptors: exceptions mapped to gRPC statuses in one place, and a base for observing calls."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractContextManager

import grpc

logger = logging.getLogger(__name__)


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Turns known domain errors into their status codes and anything else into INTERNAL.

    Handlers raise plain exceptions; this keeps status handling out of every handler body.
    """

    def __init__(self, codes: Mapping[type[Exception], grpc.StatusCode]):
        self._codes = dict(codes)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _wrap_unary(self, behavior, method: str):
        async def unary(request, context: grpc.aio.ServicerContext):
            try:
                return await behavior(request, context)
            except Exception as error:  # noqa: BLE001 - mapped or reported as INTERNAL below
                await self._abort(error, context, method)

        return unary

    def _wrap_stream(self, behavior, method: str):
        async def stream(request, context: grpc.aio.ServicerContext):
            try:
                async for response in behavior(request, context):
                    yield response
            except Exception as error:  # noqa: BLE001 - mapped or reported as INTERNAL below
                await self._abort(error, context, method)

        return stream

    async def _abort(self, error: Exception, context: grpc.aio.ServicerContext, method: str) -> None:
        if isinstance(error, grpc.aio.AbortError):
            raise error
        for kind, code in self._codes.items():
            if isinstance(error, kind):
                await context.abort(code, str(error))
        logger.exception("unexpected error in %s", method)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}")


class CallObservingInterceptor(grpc.aio.ServerInterceptor):
    """Base for interceptors that watch calls without changing them (metrics, tracing).

    `observe(method, context)` returns a context manager entered around each call of a
    unary-request handler (unary or streaming response), so it sees the time the call took and
    any exception ending it. Client-streaming handlers (only reflection here) pass through.
    """

    def observe(self, method: str, context: grpc.aio.ServicerContext) -> AbstractContextManager[object]:
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        # Unknown methods have no handler and are never observed: a label per made-up method
        # name would let any caller grow the metrics without bound.
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        method = handler_call_details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_stream_rpc_method_handler(
            self._wrap_stream(handler.unary_stream, method),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _wrap_unary(self, behavior, method: str):
        async def unary(request, context: grpc.aio.ServicerContext):
            with self.observe(method, context):
                return await behavior(request, context)

        return unary

    def _wrap_stream(self, behavior, method: str):
        async def stream(request, context: grpc.aio.ServicerContext):
            with self.observe(method, context):
                async for response in behavior(request, context):
                    yield response

        return stream


def final_code(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    """The status a call ends with, as the server sees it once the handler has returned or raised."""
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        # gRPC cancels the handler both when the caller cancels and when its deadline passes.
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= 0
        return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
    code = context.code()  # set by context.abort (ErrorMappingInterceptor) or set_code
    if code is not None:
        return code
    return grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN


def split_method(method: str) -> tuple[str, str]:
    """'/package.Service/Method' -> ('package.Service', 'Method')."""
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name
