"""Per-session state and where it lives.

A `SessionState` is immutable: a report builds a new one and stores it (state and the answer in
one write), so a request that fails half-way leaves the stored state untouched and a retried
sequence finds the answer it got. Arrays are read-only to enforce it.

Stores update a session by running a pure `Step` (state -> answer and next state) atomically:
optimistic concurrency, so two replicas racing on one session cannot both write (the loser's
step runs again on the winner's state). The Redis store is in `redis_store`.
"""

from __future__ import annotations

import asyncio
import json
import math
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from kvevict.cache_manager.batch import LayerStack
from kvevict.cache_manager.errors import Aborted, ResourceExhausted
from kvevict.cache_manager.settings import SessionSettings

R = TypeVar("R")

_MAGIC = b"KVST1"
# Per-head sessions' states (one array per (layer, KV head), head budgets): a reader that only
# knows KVST1 refuses them instead of misreading them. Rectangular states stay KVST1, unchanged.
_MAGIC_PER_HEAD = b"KVST2"
_HEADER = struct.Struct("<I")
# Scalar fields stored in the JSON header.
_META = ("session_id", "layer_budgets", "last_sequence", "last_position", "reports", "evicted_tokens", "owner",
         "last_request_digest")


def _frozen(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


def _frozen_layers(arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
    """The arrays made read-only, as a tuple (a LayerStack stays one, its buffer read-only too)."""
    if isinstance(arrays, LayerStack):
        return LayerStack([a if not a.flags.writeable else _frozen(a) for a in arrays], _frozen(arrays.flat))
    return tuple(_frozen(a) for a in arrays)


@dataclass(frozen=True, eq=False)  # arrays inside: compare states with to_bytes()
class SessionState:
    """One session as the manager tracks it, aligned column for column with the worker's cache."""

    session_id: str
    settings: SessionSettings
    # Per layer: tokens per KV head (per-head sessions: the total over the layer's KV heads).
    layer_budgets: tuple[int, ...]
    # Per layer (num_kv_heads, cache_length) int32: absolute position of every cached token.
    # Decisions and from_bytes store them as a batch.LayerStack (views of one flat buffer).
    # Per-head sessions (settings.per_head): one (1, length) array per (layer, KV head), layer
    # major (entry layer x num_kv_heads + head), each head's own length.
    positions: tuple[np.ndarray, ...]
    # Per layer (num_kv_heads, cache_length) float32 for accumulating policies (H2O); else empty.
    # Per-head sessions: one (1, length) array per (layer, KV head), as `positions`.
    accumulators: tuple[np.ndarray, ...] = ()
    last_sequence: int = 0
    last_position: int = -1  # highest position reported so far
    last_response: bytes = b""  # serialized ReportBlockResponse of last_sequence
    reports: int = 0
    evicted_tokens: int = 0  # summed over layers and KV heads
    # The identity that opened the session (kvevict.identity); every other identity is told
    # NOT_FOUND. "" when the server authenticates nobody (every caller is the same identity).
    owner: str = ""
    # Hex SHA-256 of last_sequence's request: a retry must repeat that request exactly.
    last_request_digest: str = ""
    # Per-head sessions: budget per (layer, KV head), row-major; empty otherwise.
    head_budgets: tuple[int, ...] = ()

    @classmethod
    def new(cls, session_id: str, settings: SessionSettings, layer_budgets: list[int], accumulates: bool,
            owner: str = "", head_budgets: Sequence[int] = ()) -> SessionState:
        heads = settings.geometry.num_kv_heads
        layers = settings.geometry.num_layers
        # Per-head sessions: one single-row array per (layer, head).
        rows, count = (1, layers * heads) if settings.per_head else (heads, layers)

        def empty(dtype: type) -> LayerStack:
            return LayerStack([_frozen(np.zeros((rows, 0), dtype)) for _ in range(count)], _frozen(np.zeros(0, dtype)))

        return cls(
            session_id=session_id,
            settings=settings,
            layer_budgets=tuple(layer_budgets),
            positions=empty(np.int32),
            accumulators=empty(np.float32) if accumulates else (),
            owner=owner,
            head_budgets=tuple(int(b) for b in head_budgets),
        )

    @property
    def cache_lengths(self) -> list[int]:
        """Per layer: tokens per KV head (per-head sessions: the total over the layer's heads)."""
        if self.settings.per_head:
            return self.head_cache_lengths.sum(axis=1).tolist()
        return [p.shape[1] for p in self.positions]

    @property
    def head_cache_lengths(self) -> np.ndarray:
        """Per-head sessions: tokens tracked per (layer, KV head), int64 (layers, heads)."""
        geometry = self.settings.geometry
        lengths = np.fromiter((p.shape[1] for p in self.positions), dtype=np.int64, count=len(self.positions))
        return lengths.reshape(geometry.num_layers, -1) if self.settings.per_head else \
            np.repeat(lengths[:, None], geometry.num_kv_heads, axis=1)

    @property
    def array_bytes(self) -> int:
        """Bytes of the tracked arrays (positions and accumulators): what grows with the cache."""
        return sum(a.nbytes for a in self.positions) + sum(a.nbytes for a in self.accumulators)

    def evolve(self, **changes: Any) -> SessionState:
        """A copy with `changes`; new arrays are made read-only."""
        for name in ("positions", "accumulators"):
            if name in changes:
                changes[name] = _frozen_layers(changes[name])
        return replace(self, **changes)

    def to_bytes(self, prefix: bytes = b"") -> bytes:
        """Compact, deterministic encoding: a JSON header, then the raw arrays back to back
        (after `prefix`, if given: a store's own header, without another copy of the state)."""
        arrays = [(f"positions[{i}]", a) for i, a in enumerate(self.positions)]
        arrays += [(f"accumulators[{i}]", a) for i, a in enumerate(self.accumulators)]
        meta = {key: getattr(self, key) for key in _META}
        if self.settings.per_head:
            meta["head_budgets"] = self.head_budgets
        header = {
            "meta": meta,
            "arrays": [[name, a.dtype.str, list(a.shape)] for name, a in arrays],
            "last_response": len(self.last_response),
        }
        # The header with its keys sorted, "settings" (the last of them) from the settings' own
        # encoding: the bytes json.dumps(..., sort_keys=True) of the whole header gives.
        head = (json.dumps(header, separators=(",", ":"), sort_keys=True)[:-1] + ',"settings":'
                + self.settings.json_text + "}").encode()
        blobs = [np.ascontiguousarray(a).data for _, a in arrays]
        magic = _MAGIC_PER_HEAD if self.settings.per_head else _MAGIC
        return b"".join([prefix, magic, _HEADER.pack(len(head)), head, self.last_response, *blobs])

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> SessionState:
        """Decodes to_bytes() output (any bytes-like object); arrays are read-only views of it."""
        buffer = memoryview(data)
        if bytes(buffer[: len(_MAGIC)]) not in (_MAGIC, _MAGIC_PER_HEAD):
            raise ValueError("not a kvevict session state")
        offset = len(_MAGIC)
        (head_len,) = _HEADER.unpack_from(buffer, offset)
        offset += _HEADER.size
        header = json.loads(bytes(buffer[offset : offset + head_len]))
        offset += head_len
        last_response = bytes(buffer[offset : offset + header["last_response"]])
        offset += header["last_response"]
        # Each kind's arrays lie back to back: one read-only buffer each, the layers its views.
        groups: dict[str, list[tuple[np.dtype, list[int]]]] = {"positions": [], "accumulators": []}
        for name, dtype, shape in header["arrays"]:
            groups[name.split("[")[0]].append((np.dtype(dtype), shape))
        stacks = {}
        for kind, arrays in groups.items():
            dtypes = {dt for dt, _ in arrays}
            sizes = [int(np.prod(shape, dtype=np.int64)) for _, shape in arrays]
            if len(dtypes) == 1:
                dt = dtypes.pop()
                flat = _frozen(np.frombuffer(buffer[offset : offset + sum(sizes) * dt.itemsize], dtype=dt))
                starts = np.cumsum([0] + sizes)
                stacks[kind] = LayerStack([flat[start:start + size].reshape(shape) for start, size, (_, shape)
                                           in zip(starts, sizes, arrays)], flat)
                offset += sum(sizes) * dt.itemsize
                continue
            layers = []
            for (dt, shape), size in zip(arrays, sizes):
                layers.append(_frozen(np.frombuffer(buffer[offset : offset + size * dt.itemsize], dtype=dt).reshape(shape)))
                offset += size * dt.itemsize
            stacks[kind] = tuple(layers)
        meta = header["meta"]
        meta["layer_budgets"] = tuple(meta["layer_budgets"])
        if "head_budgets" in meta:
            meta["head_budgets"] = tuple(meta["head_budgets"])
        return cls(
            settings=SessionSettings.from_dict(header["settings"]),
            positions=stacks["positions"],
            accumulators=stacks["accumulators"],
            last_response=last_response,
            **meta,
        )


@dataclass(frozen=True)
class Transition(Generic[R]):
    """What one step of a session returns: the answer, and the state to store (None: store nothing)."""

    result: R
    state: SessionState | None


# A pure read-modify-write of one session: the state as stored (None if there is none) -> what
# to answer and store. Stores run it atomically: its state is written only if nobody wrote the
# session in between, else the step runs again on the newer state.
Step = Callable[[SessionState | None], Transition[R]]
# Attempts before a store gives up on a session that other writers keep changing.
MAX_ATTEMPTS = 16


class StateStore(Protocol):
    """Where session states live, for the sync core (in memory when embedded)."""

    def get(self, session_id: str) -> SessionState | None: ...

    def create(self, state: SessionState) -> None:
        """Stores a new session; ResourceExhausted when the store holds its maximum of sessions."""
        ...

    def update(self, session_id: str, step: Step[R]) -> R:
        """Runs `step` on the stored state and stores its new state atomically (see Step)."""
        ...

    def delete(self, session_id: str) -> SessionState | None:
        """Removes a session and returns its last state; None if there was none."""
        ...


class AsyncStateStore(Protocol):
    """Where session states live, for the async core (Redis when replicated). Same contract as
    StateStore; `update` runs the CPU-bound step off the event loop; `ping` raises
    StoreUnavailable when the store cannot serve."""

    async def get(self, session_id: str) -> SessionState | None: ...

    async def create(self, state: SessionState) -> None: ...

    async def update(self, session_id: str, step: Step[R]) -> R: ...

    async def delete(self, session_id: str) -> SessionState | None: ...

    async def count(self) -> int:
        """Open sessions (with Redis: every replica's); expired ones are pruned and added to
        `expired`, the store's tally of sessions whose TTL ran out."""
        ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


class InMemoryStateStore:
    """States kept as objects in a dict (safe: states are never mutated in place).

    `update` is optimistic like the Redis store: the step runs outside the lock, and its state is
    stored only if the session still holds the state the step saw (an identity check under the
    lock), else the step runs again. Decisions of different sessions thus run in parallel and a
    slow decision never blocks other sessions. `ttl_s` (None = forever) expires idle sessions,
    refreshed on every write; `max_sessions` (None = no limit) bounds the live sessions and
    `max_sessions_per_owner` (0 = no limit) those of one owner (SessionState.owner).
    """

    def __init__(self, ttl_s: float | None = None, max_sessions: int | None = None,
                 clock: Callable[[], float] = time.monotonic, max_sessions_per_owner: int = 0) -> None:
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self.max_sessions_per_owner = max_sessions_per_owner
        self._clock = clock
        self._states: dict[str, tuple[SessionState, float]] = {}  # id -> (state, deadline)
        self._lock = threading.Lock()
        self.conflicts = 0  # steps run again because the session changed meanwhile
        self.expired = 0  # sessions removed because their TTL ran out (never closed)

    def get(self, session_id: str) -> SessionState | None:
        with self._lock:
            return self._live(session_id)

    def put(self, state: SessionState) -> None:
        """Stores a state unconditionally, replacing any previous one (no limit applies)."""
        with self._lock:
            self._states[state.session_id] = (state, self._deadline())

    def create(self, state: SessionState) -> None:
        with self._lock:
            if state.session_id not in self._states and (self.max_sessions is not None or self.max_sessions_per_owner):
                self._expire()
                if self.max_sessions is not None and len(self._states) >= self.max_sessions:
                    raise ResourceExhausted(f"max_sessions: the manager's limit of {self.max_sessions} open "
                                            f"sessions is reached")
                if self.max_sessions_per_owner and self.max_sessions_per_owner <= sum(
                        1 for held, _ in self._states.values() if held.owner == state.owner):
                    raise ResourceExhausted(f"max_sessions_per_client: the client's limit of "
                                            f"{self.max_sessions_per_owner} open sessions is reached")
            self._states[state.session_id] = (state, self._deadline())

    def update(self, session_id: str, step: Step[R]) -> R:
        for _ in range(MAX_ATTEMPTS):
            seen = self.get(session_id)
            transition = step(seen)
            if transition.state is None:
                return transition.result
            assert transition.state.session_id == session_id, "a step must keep its session id"
            with self._lock:
                if self._live(session_id) is seen:
                    self._states[session_id] = (transition.state, self._deadline())
                    return transition.result
                self.conflicts += 1
        raise Aborted("session_id: the session is being updated concurrently; retry")

    def delete(self, session_id: str) -> SessionState | None:
        with self._lock:
            state = self._live(session_id)
            self._states.pop(session_id, None)
            return state

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._states)

    def _deadline(self) -> float:
        return math.inf if self.ttl_s is None else self._clock() + self.ttl_s

    def _live(self, session_id: str) -> SessionState | None:
        entry = self._states.get(session_id)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            del self._states[session_id]
            self.expired += 1
            return None
        return entry[0]

    def _expire(self) -> None:
        if self.ttl_s is not None:
            now = self._clock()
            for session_id in [k for k, (_, deadline) in self._states.items() if deadline <= now]:
                del self._states[session_id]
                self.expired += 1


class AsyncInMemoryStateStore:
    """An InMemoryStateStore behind the AsyncStateStore interface (`manager serve --redis-url
    memory://`): updates run in the default executor, the rest inline (they are dict lookups)."""

    def __init__(self, store: InMemoryStateStore | None = None) -> None:
        self.store = store if store is not None else InMemoryStateStore()

    async def get(self, session_id: str) -> SessionState | None:
        return self.store.get(session_id)

    async def create(self, state: SessionState) -> None:
        self.store.create(state)

    async def update(self, session_id: str, step: Step[R]) -> R:
        return await asyncio.get_running_loop().run_in_executor(None, self.store.update, session_id, step)

    async def delete(self, session_id: str) -> SessionState | None:
        return self.store.delete(session_id)

    async def count(self) -> int:
        return len(self.store)

    @property
    def expired(self) -> int:
        return self.store.expired

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None
