"""What the service benchmarks (benchmarks/load.py, benchmarks/fuzz.py) share: CPU seconds of
live processes, model shapes, a ReportBlock session that sends real-sized reports cheaply, and
the Redis bytes a session holds.

A report is what a worker sends: every layer's statistics for every cached token, in the dtypes
the manager negotiated. Building that message for each call would cost the client more CPU than
the manager spends deciding it, so each layer's encoded statistics are built once per cache
length and reused (the manager decodes and decides them as any others), and a report's bytes
are its small head (session, sequence, phase, positions) followed by those layers' bytes:
concatenated protobuf encodings are the encoding of the merged message.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvevict import wire
from kvevict.v1 import cache_manager_pb2 as pb

# name: (layers, KV heads, query heads, head dim)
SHAPES = {
    "tiny": (2, 2, 4, 16),
    "small": (30, 3, 9, 64),  # SmolLM2-135M
    "8b": (32, 8, 32, 128),  # Llama-3.1-8B
}


def geometry(shape: str) -> pb.ModelGeometry:
    layers, kv_heads, query_heads, head_dim = SHAPES[shape]
    return pb.ModelGeometry(num_layers=layers, num_kv_heads=kv_heads, num_query_heads=query_heads, head_dim=head_dim)


# -- CPU of processes ---------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process, every thread, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds each named process used between `start()` and `stop()`."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._start: dict[str, float] = {}
        self.used: dict[str, float] = {}

    def start(self) -> CpuMeter:
        self._start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        return self

    def stop(self) -> dict[str, float]:
        self.used = {name: cpu_seconds(pid) - self._start[name] for name, pid in self.pids.items()}
        return self.used

    def total(self, prefix: str) -> float:
        return sum(seconds for name, seconds in self.used.items() if name.startswith(prefix))


# -- real-sized reports -------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


_LAYERS_TAG = bytes([(pb.ReportBlockRequest.DESCRIPTOR.fields_by_name["layers"].number << 3) | 2])


def _statistic(rng: np.random.Generator, statistic: int, shape: tuple[int, int]) -> np.ndarray:
    """Plausible values: attention masses in [0, 1] summing like a few queries', norms >= 0,
    cosines in [-1, 1]."""
    if statistic == pb.STATISTIC_KEY_COSINE:
        return rng.uniform(-1.0, 1.0, shape)
    if statistic in (pb.STATISTIC_ATTN_SUM, pb.STATISTIC_ATTN_WINDOW):
        raw = rng.exponential(1.0, shape) ** 3
        return raw / raw.sum(axis=-1, keepdims=True) * 4
    return rng.uniform(0.0, 3.0, shape)


def _encoded(values: np.ndarray, dtype: int):
    if dtype == 6:  # DTYPE_BFLOAT16
        return wire.encode_bfloat16(values.astype(np.float32))
    return wire.encode(values.astype({1: np.float16, 2: np.float32}[dtype]))


@dataclass
class LayerBytes:
    """Each layer's encoded LayerStatistics (with its field tag) per cache length, built once and
    shared by every session of the same geometry and negotiated statistics."""

    opened: pb.OpenSessionResponse
    heads: int
    seed: int = 0
    _cache: dict[tuple[int, int], bytes] = field(default_factory=dict)

    def get(self, layer: int, length: int) -> bytes:
        key = (layer, length)
        if key not in self._cache:
            rng = np.random.default_rng((self.seed, layer, length))
            message = pb.LayerStatistics(layer=layer, cache_length=length, values=[
                _encoded(_statistic(rng, req.statistic, (self.heads, length)), req.dtype)
                for req in self.opened.statistics])
            body = message.SerializeToString()
            self._cache[key] = _LAYERS_TAG + _varint(len(body)) + body
        return self._cache[key]


@dataclass
class ReportSession:
    """One session's reports, in sequence: `prefill_tokens` of prompt in blocks of `block`, then
    decode reports of `block` tokens each (a report per block of decode steps). `next_report()`
    gives the bytes to send; `answered(response)` follows the manager's keep masks so that the
    next report's cache lengths are what a worker's cache would hold."""

    session_id: str
    layers: LayerBytes
    num_layers: int
    block: int
    prefill_tokens: int
    sequence: int = 0
    position: int = 0
    lengths: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.lengths = [0] * self.num_layers

    def next_report(self) -> bytes:
        phase = pb.PHASE_PREFILL if self.position < self.prefill_tokens else pb.PHASE_DECODE
        new = np.arange(self.position, self.position + self.block, dtype=np.int64)
        head = pb.ReportBlockRequest(session_id=self.session_id, sequence=self.sequence + 1, phase=phase,
                                     positions=wire.encode(new)).SerializeToString()
        return head + b"".join(self.layers.get(layer, self.lengths[layer] + self.block)
                               for layer in range(self.num_layers))

    def answered(self, response: pb.ReportBlockResponse) -> None:
        self.sequence += 1
        self.position += self.block
        self.lengths = [length + self.block for length in self.lengths]
        for keep in response.keeps:
            self.lengths[keep.layer] = keep.kept_tokens


# -- Redis bytes per session --------------------------------------------------------------------


def session_key_bytes(clients: Iterable, prefix: str, session_ids: Sequence[str]) -> tuple[dict[str, int], int]:
    """`MEMORY USAGE` (exact: SAMPLES 0) of every key under `prefix` (found by SCAN on each node),
    summed per session id the key names; and the bytes of the keys that name none (indexes)."""
    per_session = dict.fromkeys(session_ids, 0)
    other = 0
    for client in clients:
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            size = client.memory_usage(key, samples=0) or 0
            name = key.decode() if isinstance(key, bytes) else key
            owner = next((sid for sid in session_ids if sid in name), None)
            if owner is None:
                other += size
            else:
                per_session[owner] += size
    return per_session, other


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")
