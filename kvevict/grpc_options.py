"""gRPC channel and server options shared by both services and their clients.

Message limits are explicit on both sides (a Llama-3.1-8B-shaped report is several MB, above
gRPC's 4 MiB default) and keepalive settings match, so a server never rejects a client's pings.
"""

from __future__ import annotations

DEFAULT_MAX_MESSAGE_BYTES = 64 * 2**20
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000


def _shared(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Options for a client channel."""
    return [*_shared(max_message_bytes), ("grpc.http2.max_pings_without_data", 0)]


def server_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Options for a server: accepts the clients' keepalive pings (every KEEPALIVE_TIME_MS)."""
    return [
        *_shared(max_message_bytes),
        ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
        ("grpc.http2.max_ping_strikes", 0),
    ]
