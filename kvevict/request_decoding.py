"""Requests that are not a valid protobuf message get INVALID_ARGUMENT, not UNKNOWN.

gRPC decodes a request before any handler runs; when the bytes are not a message of the
method's type, grpcio answers UNKNOWN and logs a traceback (a client can fill the log with
them). `RequestDecodingInterceptor` hands the handler the raw bytes and decodes them itself, so
a bad message is refused as `INVALID_ARGUMENT: request: not a valid kvevict.v1.X message`,
logged by nobody, counted by the metrics like any other refusal. Only calls with a single
request are decoded this way; streamed requests (server reflection) keep grpc's own decoding.

The handler can ask `wire_size(request)` for the size the request had on the wire: the length
of the bytes decoded here (a decoded message's ByteSize() walks it again: ~10 ms for a
4 MB Llama-8B-shaped report).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextvars import ContextVar

import grpc
from google.protobuf.message import DecodeError

# The bytes of the request this RPC decoded (each RPC runs in its own asyncio task, so its own).
_request_bytes: ContextVar[int | None] = ContextVar("kvevict_request_bytes", default=None)

_HANDLERS = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
}


class RequestDecodingInterceptor(grpc.aio.ServerInterceptor):
    """Decodes single-message requests inside the handler; undecodable bytes: INVALID_ARGUMENT."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        kind = "unary_stream" if handler.response_streaming else "unary_unary"
        behavior = getattr(handler, kind)
        decode = handler.request_deserializer
        name = _message_name(decode)
        if inspect.isasyncgenfunction(behavior):
            wrapped = _streaming(behavior, decode, name)
        elif inspect.iscoroutinefunction(behavior):
            wrapped = _awaited(behavior, decode, name)
        else:  # a sync handler would run on grpc's thread pool: not ours, keep grpc's decoding
            return handler
        return _HANDLERS[kind](wrapped, request_deserializer=None, response_serializer=handler.response_serializer)


def wire_size(request) -> int:
    """The serialized size of `request`: as received, when this RPC's interceptor decoded it."""
    size = _request_bytes.get()
    return request.ByteSize() if size is None else size


def _decoded(decode: Callable[[bytes], object], data: bytes) -> object | None:
    _request_bytes.set(len(data))
    try:
        return decode(data)
    except (DecodeError, ValueError, TypeError):
        return None


def _invalid(name: str) -> str:
    return f"request: not a valid {name} message"


def _awaited(behavior, decode: Callable[[bytes], object], name: str):
    async def call(data: bytes, context):
        request = _decoded(decode, data)
        if request is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _invalid(name))
        return await behavior(request, context)

    return call


def _streaming(behavior, decode: Callable[[bytes], object], name: str):
    async def call(data: bytes, context):
        request = _decoded(decode, data)
        if request is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _invalid(name))
        async for response in behavior(request, context):
            yield response

    return call


def _message_name(decode: Callable[[bytes], object]) -> str:
    """`kvevict.v1.OpenSessionRequest` for a message class's FromString."""
    owner = getattr(decode, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return descriptor.full_name if descriptor is not None else "request"
