"""What both services' gRPC servers share: health checking, reflection, binding a port."""

from __future__ import annotations

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
