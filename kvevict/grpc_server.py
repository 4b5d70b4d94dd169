"""What both services' gRPC servers share: health checking, reflection, binding a port, and the
interceptor that counts and times every call for the metrics."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class ServiceHealth:
    """grpc.health.v1 for "" and one service; both start NOT_SERVING."""

    def __init__(self, server: grpc.aio.Server, service_name: str) -> None:
        self.servicer = health.aio.HealthServicer()
        self.names = ("", service_name)
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)
        # Reflection lists the service, health and reflection itself.
        reflection.enable_server_reflection((service_name, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server)

    async def set(self, status: int) -> None:
        for name in self.names:
            await self.servicer.set(name, status)

    async def enter_graceful_shutdown(self) -> None:
        await self.servicer.enter_graceful_shutdown()


def bind(server: grpc.aio.Server, host: str, port: int) -> int:
    """Listens on host:port (0 = a free port); returns the port or raises OSError."""
    address = f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as error:
        raise OSError(f"cannot listen on {address}: {error}") from error
    if not bound:
        raise OSError(f"cannot listen on {address}")
    return bound


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Reports every call's method, final status code and duration to `record(method, code,
    seconds)` (both services' `rpcs_total{method, code}` and `rpc_duration_seconds{method}`).

    `method` is the last part of the gRPC path (`ReportBlock`, `Check`), `code` the status name
    (`OK`, `INVALID_ARGUMENT`). A call that aborts is counted with its abort's code; one whose
    client went away (or ran past its deadline) while the handler ran, CANCELLED; an exception
    that escapes the handler, UNKNOWN (what gRPC answers). Calls gRPC refuses before any handler
    runs (unknown method, message over the size limit, over `maximum_concurrent_rpcs`) are not
    seen here. Handlers that are not coroutines or async generators are passed through as is.
    """

    def __init__(self, record: Callable[[str, str, float], None]) -> None:
        self._record = record

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: UNIMPLEMENTED, and a client-chosen name: not a label
            return None
        method = handler_call_details.method.rpartition("/")[2]
        kind = ("stream" if handler.request_streaming else "unary") + "_" + (
            "stream" if handler.response_streaming else "unary")
        behavior = getattr(handler, kind)
        if inspect.isasyncgenfunction(behavior):
            wrapped = self._streaming(behavior, method)
        elif inspect.iscoroutinefunction(behavior):
            wrapped = self._awaited(behavior, method)
        else:
            return handler
        return _HANDLER_FACTORIES[kind](wrapped, request_deserializer=handler.request_deserializer,
                                        response_serializer=handler.response_serializer)

    def _awaited(self, behavior, method: str):
        async def call(request, context):
            started = time.perf_counter()
            code = None
            try:
                return await behavior(request, context)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except grpc.aio.AbortError:
                raise
            except Exception:
                code = grpc.StatusCode.UNKNOWN
                raise
            finally:
                self._done(method, code, context, started)

        return call

    def _streaming(self, behavior, method: str):
        async def call(request, context):
            started = time.perf_counter()
            code = None
            responses = behavior(request, context)
            try:
                async for response in responses:
                    yield response
            except (asyncio.CancelledError, GeneratorExit):
                code = grpc.StatusCode.CANCELLED
                raise
            except grpc.aio.AbortError:
                raise
            except Exception:
                code = grpc.StatusCode.UNKNOWN
                raise
            finally:
                try:
                    await responses.aclose()
                finally:
                    self._done(method, code, context, started)

        return call

    def _done(self, method: str, code: grpc.StatusCode | None, context, started: float) -> None:
        if code is None:
            code = _status_code(context.code())
        self._record(method, code.name, time.perf_counter() - started)


def _status_code(code) -> grpc.StatusCode:
    """The context's code (None until set: OK); grpc.aio may hold it as a StatusCode or an int."""
    if code is None:
        return grpc.StatusCode.OK
    if isinstance(code, grpc.StatusCode):
        return code
    return _CODES_BY_VALUE.get(code, grpc.StatusCode.UNKNOWN)


_CODES_BY_VALUE = {status.value[0]: status for status in grpc.StatusCode}
_HANDLER_FACTORIES = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}
