"""gRPC channel and server options shared by both services and their clients.

Message limits are explicit on both sides (a Llama-3.1-8B-shaped report is several MB, above
gRPC's 4 MiB default) and keepalive settings match, so a server never rejects a client's pings.

A client channel retries its connection at most RECONNECT_MAX_BACKOFF_MS apart (gRPC's default
grows to 120 s: after a 12-30 s outage a channel slept through the server's return for another
12-14 s), so a call waiting for the channel (`wait_for_ready`) resumes within a second of a
restarted server listening again, however long it was gone.
"""

from __future__ import annotations

DEFAULT_MAX_MESSAGE_BYTES = 64 * 2**20
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000
# Connection attempts while the server is gone: the first after 100 ms, then 1.6 times longer
# each, capped at 500 ms; gRPC adds +-20 % jitter, so attempts are at most 0.6 s apart.
RECONNECT_INITIAL_BACKOFF_MS = 100
RECONNECT_MAX_BACKOFF_MS = 500
# How long one attempt may take (gRPC's "min reconnect backoff"; default 20 s): an attempt into a
# partition that drops packets gives up after 1 s instead of outliving the partition by 19 s.
CONNECT_TIMEOUT_MS = 1_000


def _shared(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Options for a client channel: reconnects at most RECONNECT_MAX_BACKOFF_MS (+20 %) apart."""
    return [
        *_shared(max_message_bytes),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_INITIAL_BACKOFF_MS),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_MAX_BACKOFF_MS),
        ("grpc.min_reconnect_backoff_ms", CONNECT_TIMEOUT_MS),
    ]


def server_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Options for a server: accepts the clients' keepalive pings (every KEEPALIVE_TIME_MS)."""
    return [
        *_shared(max_message_bytes),
        ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
        ("grpc.http2.max_ping_strikes", 0),
    ]
