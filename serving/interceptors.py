"""Maps exceptions escaping a handler to gRPC statuses, in one place for every RPC."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping

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
