"""What both services' gRPC servers share: health checking, reflection, binding a port (plaintext
or TLS), and the interceptor that counts and times every call for the metrics."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# grpcio-reflection ships only v1alpha; grpc.reflection.v1 (what grpcurl and current clients ask
# first) is the same protocol, message for message and field for field, in another package.
REFLECTION_V1_PACKAGE = "grpc.reflection.v1"
REFLECTION_V1_FILE = "grpc/reflection/v1/reflection.proto"
REFLECTION_V1_SERVICE_NAME = f"{REFLECTION_V1_PACKAGE}.ServerReflection"


class ServiceHealth:
    """grpc.health.v1 for "" and one service; both start NOT_SERVING. Also adds reflection."""

    def __init__(self, server: grpc.aio.Server, service_name: str) -> None:
        self.servicer = health.aio.HealthServicer()
        self.names = ("", service_name)
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)
        enable_reflection(server, (service_name, HEALTH_SERVICE_NAME))

    async def set(self, status: int) -> None:
        for name in self.names:
            await self.servicer.set(name, status)

    async def enter_graceful_shutdown(self) -> None:
        await self.servicer.enter_graceful_shutdown()


def enable_reflection(server: grpc.aio.Server, service_names: tuple[str, ...]) -> None:
    """Server reflection, v1 and v1alpha, listing `service_names` and both reflection services."""
    reflection_v1_file()  # the v1 file must be in the default pool for clients to resolve it
    servicer = reflection.aio.ReflectionServicer(
        (*service_names, REFLECTION_V1_SERVICE_NAME, reflection.SERVICE_NAME))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    # The v1 method answers with the same servicer: its messages have v1alpha's wire format.
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo, request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1_SERVICE_NAME, {"ServerReflectionInfo": v1}),))


def reflection_v1_file() -> FileDescriptor:
    """grpc/reflection/v1/reflection.proto in the default descriptor pool: v1alpha's file with its
    package renamed (added once per process)."""
    pool = descriptor_pool.Default()
    try:
        return pool.FindFileByName(REFLECTION_V1_FILE)
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old_prefix, new_prefix = f".{proto.package}.", f".{REFLECTION_V1_PACKAGE}."
    proto.name, proto.package = REFLECTION_V1_FILE, REFLECTION_V1_PACKAGE
    proto.options.Clear()  # v1alpha's options name v1alpha's Java/Go packages
    for message in proto.message_type:
        for field in message.field:
            if field.type_name.startswith(old_prefix):
                field.type_name = new_prefix + field.type_name[len(old_prefix):]
    for service in proto.service:
        for method in service.method:
            method.input_type = new_prefix + method.input_type[len(old_prefix):]
            method.output_type = new_prefix + method.output_type[len(old_prefix):]
    return pool.AddSerializedFile(proto.SerializeToString())


# gRPC drops a status whose details pass its metadata limits (8 KiB soft, 16 KiB hard; the
# details travel percent-encoded, up to 3 characters a byte), and the client then gets
# RESOURCE_EXHAUSTED "Stream removed" instead: a message echoing a huge field must be cut short.
MAX_DETAILS_BYTES = 1024


def status_details(text: str) -> str:
    """`text` cut to at most MAX_DETAILS_BYTES of UTF-8 (what an error message may echo of a
    request is bounded, whatever its characters)."""
    encoded = text.encode("utf-8", errors="replace")
    if len(encoded) <= MAX_DETAILS_BYTES:
        return text
    suffix = f"... ({len(text)} characters)"
    return encoded[: MAX_DETAILS_BYTES - len(suffix)].decode("utf-8", errors="ignore") + suffix


def bind(server: grpc.aio.Server, host: str, port: int, credentials: grpc.ServerCredentials | None = None) -> int:
    """Listens on host:port (0 = a free port), over TLS with `credentials`; returns the port or
    raises OSError."""
    address = f"{host}:{port}"
    try:
        bound = (server.add_insecure_port(address) if credentials is None
                 else server.add_secure_port(address, credentials))
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
