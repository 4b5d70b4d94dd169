"""gRPC health check of a kvevict service, for the images' HEALTHCHECK and docker-compose.yml.

    python healthcheck.py 127.0.0.1:50051 [SERVICE]

Asks grpc.health.v1.Health/Check (SERVICE defaults to "", the whole server) and exits 0 only when
the answer is SERVING: the manager is NOT_SERVING while Redis is unreachable, the worker while its
model loads. Prints the status (or the call's error code) on one line.
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout_s: float = 3.0) -> str:
    """The serving status's name, or the status code's name when the call fails."""
    try:
        with grpc.insecure_channel(address) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    except grpc.RpcError as error:
        return error.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def main(argv: list[str]) -> int:
    if not 2 <= len(argv) <= 3:
        print("usage: healthcheck.py HOST:PORT [SERVICE]", file=sys.stderr)
        return 2
    status = check(argv[1], argv[2] if len(argv) == 3 else "")
    print(f"{argv[1]}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
