"""Per-session state and where it lives.

A `SessionState` is immutable: a report builds a new one and stores it (state and the answer in
one `put`), so a request that fails half-way leaves the stored state untouched and a retried
sequence finds the answer it got. Arrays are read-only to enforce it.
"""

from __future__ import annotations

import json
import struct
import threading
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from kvevict.cache_manager.settings import SessionSettings

_MAGIC = b"KVST1"
_HEADER = struct.Struct("<I")
# Scalar fields stored in the JSON header.
_META = ("session_id", "layer_budgets", "last_sequence", "last_position", "reports", "evicted_tokens")


def _frozen(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


@dataclass(frozen=True, eq=False)  # arrays inside: compare states with to_bytes()
class SessionState:
    """One session as the manager tracks it, aligned column for column with the worker's cache."""

    session_id: str
    settings: SessionSettings
    layer_budgets: tuple[int, ...]
    # Per layer (num_kv_heads, cache_length) int32: absolute position of every cached token.
    positions: tuple[np.ndarray, ...]
    # Per layer (num_kv_heads, cache_length) float32 for accumulating policies (H2O); else empty.
    accumulators: tuple[np.ndarray, ...] = ()
    last_sequence: int = 0
    last_position: int = -1  # highest position reported so far
    last_response: bytes = b""  # serialized ReportBlockResponse of last_sequence
    reports: int = 0
    evicted_tokens: int = 0  # summed over layers and KV heads

    @classmethod
    def new(cls, session_id: str, settings: SessionSettings, layer_budgets: list[int], accumulates: bool) -> SessionState:
        heads = settings.geometry.num_kv_heads
        layers = settings.geometry.num_layers
        return cls(
            session_id=session_id,
            settings=settings,
            layer_budgets=tuple(layer_budgets),
            positions=tuple(_frozen(np.zeros((heads, 0), np.int32)) for _ in range(layers)),
            accumulators=tuple(_frozen(np.zeros((heads, 0), np.float32)) for _ in range(layers)) if accumulates else (),
        )

    @property
    def cache_lengths(self) -> list[int]:
        return [p.shape[1] for p in self.positions]

    def evolve(self, **changes: Any) -> SessionState:
        """A copy with `changes`; new arrays are made read-only."""
        for name in ("positions", "accumulators"):
            if name in changes:
                changes[name] = tuple(_frozen(a) for a in changes[name])
        return replace(self, **changes)

    def to_bytes(self) -> bytes:
        """Compact, deterministic encoding: a JSON header, then the raw arrays back to back."""
        arrays = [(f"positions[{i}]", a) for i, a in enumerate(self.positions)]
        arrays += [(f"accumulators[{i}]", a) for i, a in enumerate(self.accumulators)]
        header = {
            "meta": {key: getattr(self, key) for key in _META},
            "settings": self.settings.to_dict(),
            "arrays": [[name, a.dtype.str, list(a.shape)] for name, a in arrays],
            "last_response": len(self.last_response),
        }
        head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
        blobs = [np.ascontiguousarray(a).tobytes() for _, a in arrays]
        return b"".join([_MAGIC, _HEADER.pack(len(head)), head, self.last_response, *blobs])

    @classmethod
    def from_bytes(cls, data: bytes) -> SessionState:
        if not data.startswith(_MAGIC):
            raise ValueError("not a kvevict session state")
        offset = len(_MAGIC)
        (head_len,) = _HEADER.unpack_from(data, offset)
        offset += _HEADER.size
        header = json.loads(data[offset : offset + head_len])
        offset += head_len
        last_response = bytes(data[offset : offset + header["last_response"]])
        offset += header["last_response"]
        buffer = memoryview(data)
        arrays: dict[str, list[np.ndarray]] = {"positions": [], "accumulators": []}
        for name, dtype, shape in header["arrays"]:
            dt = np.dtype(dtype)
            size = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
            array = np.frombuffer(buffer[offset : offset + size], dtype=dt).reshape(shape)
            arrays[name.split("[")[0]].append(array)
            offset += size
        meta = header["meta"]
        meta["layer_budgets"] = tuple(meta["layer_budgets"])
        return cls(
            settings=SessionSettings.from_dict(header["settings"]),
            positions=tuple(arrays["positions"]),
            accumulators=tuple(arrays["accumulators"]),
            last_response=last_response,
            **meta,
        )


class StateStore(Protocol):
    """Where session states live (in memory when embedded; Redis when replicated)."""

    def get(self, session_id: str) -> SessionState | None: ...

    def put(self, state: SessionState) -> None:
        """Stores the whole state (answer included) atomically, replacing any previous one."""
        ...

    def delete(self, session_id: str) -> bool:
        """Removes a session; False if there was none."""
        ...


class InMemoryStateStore:
    """States kept as objects in a dict; safe because states are never mutated in place."""

    def __init__(self) -> None:
        self._states: dict[str, SessionState] = {}
        self._lock = threading.Lock()

    def get(self, session_id: str) -> SessionState | None:
        with self._lock:
            return self._states.get(session_id)

    def put(self, state: SessionState) -> None:
        with self._lock:
            self._states[state.session_id] = state

    def delete(self, session_id: str) -> bool:
        with self._lock:
            return self._states.pop(session_id, None) is not None

    def __len__(self) -> int:
        with self._lock:
            return len(self._states)
