"""Session states in Redis (redis-py asyncio): the store shared by manager replicas.

Layout (prefix `kvevict:` by default):
- `<prefix>session:<id>`: an 8-byte random version, then the state (`SessionState.to_bytes()`),
  with a TTL refreshed on every write (a session idle for `ttl_s` expires: NOT_FOUND).
- `<prefix>sessions`: sorted set of open session ids scored by their expiry (Redis server time,
  to the microsecond, so an id is pruned only once its key has expired);
  it counts sessions for `max_sessions`, a limit shared by every replica, and for the metrics.
  Expired ids are pruned from it when a session is created and by `count()` (the manager's
  health probe, every second); the replica that prunes an id adds it to its `expired` tally,
  so the replicas' tallies sum to the sessions that expired unclosed. The set itself lives
  INDEX_GRACE_S longer than its newest session, so a probe still finds (and counts) the last ones.

A report is one optimistic transaction: WATCH the key, read it (see the cache below), run the
step (decode, validate, decide, encode) in the default executor, then MULTI / SET with the TTL /
refresh the index / EXEC.
If another replica wrote the session in between, EXEC fails (WatchError) and the step runs
again on the new state: so exactly one decision per sequence number is stored, and the loser
of a race on a retried sequence number answers the winner's decision.

Each replica keeps the states it last read or wrote in a bounded LRU cache keyed by that
version: an update first reads the 8-byte version (GETRANGE, under the WATCH) and transfers the
whole state only if its cached copy is not the current one. A worker's channel sticks to one
replica, so most reports skip the largest read (8.5 MB for an H2O session of Llama-3.1-8B at
4K tokens; redis-py takes ~30 ms for it). The version is random per write, not the sequence
number, because a Redis restored from an older snapshot could store a different state under a
sequence number a replica has cached.

Every Redis or socket error becomes StoreUnavailable (UNAVAILABLE); commands time out after
`timeout_s`, and only a broken pooled connection is retried (once, at once), so an outage
surfaces in bounded time and the worker's backoff decides what happens next.

`observer(operation, seconds, failed)`, when set, hears of every operation (ping, get, create,
update, delete, count) with the time spent talking to Redis (an update's decision step, run
in the executor, is not Redis time and is left out) and whether it failed (StoreUnavailable).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, WatchError

from kvevict.cache_manager.errors import Aborted, ResourceExhausted, StoreUnavailable
from kvevict.logs import log_event
from kvevict.cache_manager.state import MAX_ATTEMPTS, R, SessionState, Step, Transition

log = logging.getLogger("kvevict.manager.redis")

DEFAULT_TTL_S = 3600
DEFAULT_TIMEOUT_S = 2.0
DEFAULT_CACHE_BYTES = 256 * 2**20
VERSION_BYTES = 8
# The index outlives its newest session by this much, so expired ids are pruned (and counted)
# before the index itself goes.
INDEX_GRACE_S = 60

# Prunes expired ids, enforces the limit, stores a new session and indexes it, atomically.
# KEYS: session key, index; ARGV: state, ttl (s), max sessions (0 = none), session id, index ttl (s).
# Returns {open sessions if refused else -1, expired ids pruned}.
_CREATE = """
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1e6
local pruned = redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local limit = tonumber(ARGV[3])
if limit > 0 and redis.call('ZCARD', KEYS[2]) >= limit then
  return {redis.call('ZCARD', KEYS[2]), pruned}
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[5])
return {-1, pruned}
"""
# Refreshes a session's expiry in the index (runs inside the update's MULTI). KEYS: index;
# ARGV: ttl (s), session id, index ttl (s).
_TOUCH = """
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1e6
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""
# Live sessions. KEYS: index. Returns {expired ids pruned, open sessions}.
_COUNT = """
local time = redis.call('TIME')
local pruned = redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(time[1]) + tonumber(time[2]) / 1e6)
return {pruned, redis.call('ZCARD', KEYS[1])}
"""


def redact(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _new_version() -> bytes:
    return os.urandom(VERSION_BYTES)


def _decode(data: bytes) -> tuple[bytes, SessionState]:
    view = memoryview(data)
    return bytes(view[:VERSION_BYTES]), SessionState.from_bytes(view[VERSION_BYTES:])


def _apply(step: Step[R], stored: SessionState | bytes | None, version: bytes) -> tuple[
        Transition[R], SessionState | None, bytes | None]:
    """Decode (unless cached), step, encode: the CPU-bound part of an update (in the executor).
    Returns the transition, the stored state as decoded, and the encoded new value (None: no write)."""
    if isinstance(stored, bytes):
        _, stored = _decode(stored)
    transition = step(stored)
    if transition.state is None:
        return transition, stored, None
    return transition, stored, transition.state.to_bytes(prefix=version)


class StateCache:
    """LRU of session -> (version, state), bounded by the states' encoded sizes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[str, tuple[bytes, SessionState, int]] = OrderedDict()

    def get(self, session_id: str, version: bytes) -> SessionState | None:
        entry = self._entries.get(session_id)
        if entry is not None and entry[0] == version:
            self._entries.move_to_end(session_id)
            self.hits += 1
            return entry[1]
        self.misses += 1
        return None

    def put(self, session_id: str, version: bytes, state: SessionState, size: int) -> None:
        self.discard(session_id)
        if size > self.max_bytes:
            return
        self._entries[session_id] = (version, state, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, _, evicted) = self._entries.popitem(last=False)
            self.bytes -= evicted

    def discard(self, session_id: str) -> None:
        entry = self._entries.pop(session_id, None)
        if entry is not None:
            self.bytes -= entry[2]


class RedisStateStore:
    """AsyncStateStore on Redis; see the module docstring for the layout and the transaction."""

    def __init__(self, client: redis.Redis, *, ttl_s: int = DEFAULT_TTL_S, max_sessions: int = 0,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, prefix: str = "kvevict:") -> None:
        if ttl_s <= 0:
            raise ValueError(f"session TTL must be > 0 s, got {ttl_s}")
        self.client = client
        self.ttl_s = int(ttl_s)
        self.max_sessions = max_sessions  # 0 = no limit
        self.prefix = prefix
        self.index_key = f"{prefix}sessions"
        self.cache = StateCache(cache_bytes)
        self.conflicts = 0  # steps run again because another writer won the race
        self.expired = 0  # expired session ids this replica pruned from the index
        self.observer: Callable[[str, float, bool], None] | None = None  # see the module docstring
        self._create = client.register_script(_CREATE)
        self._count = client.register_script(_COUNT)

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, **options) -> RedisStateStore:
        client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        return cls(client, **options)

    def key(self, session_id: str) -> str:
        return f"{self.prefix}session:{session_id}"

    @staticmethod
    def encode(state: SessionState) -> bytes:
        """A state as stored under its key: a new random version, then the state's bytes."""
        return state.to_bytes(prefix=_new_version())

    async def ping(self) -> None:
        with self._unavailable("ping"):
            await self.client.ping()

    async def get(self, session_id: str) -> SessionState | None:
        key = self.key(session_id)
        with self._unavailable("get"):
            version = await self.client.getrange(key, 0, VERSION_BYTES - 1)
            if not version:
                return None
            state = self.cache.get(session_id, version)
            if state is not None:
                return state
            data = await self.client.get(key)
        if data is None:
            return None
        version, state = _decode(data)
        self.cache.put(session_id, version, state, len(data))
        return state

    async def create(self, state: SessionState) -> None:
        data = self.encode(state)
        version = data[:VERSION_BYTES]
        with self._unavailable("create"):
            refused, pruned = await self._create(
                keys=[self.key(state.session_id), self.index_key],
                args=[data, self.ttl_s, self.max_sessions, state.session_id, self.ttl_s + INDEX_GRACE_S],
            )
        self.expired += int(pruned)
        if refused >= 0:
            raise ResourceExhausted(f"too many sessions: {refused} open, limit {self.max_sessions}")
        self.cache.put(state.session_id, version, state, len(data))

    async def update(self, session_id: str, step: Step[R]) -> R:
        key = self.key(session_id)
        loop = asyncio.get_running_loop()
        for attempt in range(MAX_ATTEMPTS):
            try:
                with self._unavailable("update") as timer:
                    async with self.client.pipeline(transaction=True) as pipe:
                        await pipe.watch(key)
                        version = await pipe.getrange(key, 0, VERSION_BYTES - 1)
                        stored: SessionState | bytes | None = None
                        if version:
                            stored = self.cache.get(session_id, version) or await pipe.get(key)
                        new_version = _new_version()
                        stepped = time.perf_counter()
                        transition, seen, data = await loop.run_in_executor(None, _apply, step, stored, new_version)
                        timer.excluded += time.perf_counter() - stepped
                        if isinstance(stored, bytes):
                            self.cache.put(session_id, version, seen, len(stored))
                        if data is None:
                            return transition.result  # a retry or an error: nothing to write
                        pipe.multi()
                        pipe.set(key, data, ex=self.ttl_s)
                        pipe.eval(_TOUCH, 1, self.index_key, self.ttl_s, session_id, self.ttl_s + INDEX_GRACE_S)
                        await pipe.execute()
                        self.cache.put(session_id, new_version, transition.state, len(data))
                        return transition.result
            except WatchError:  # another writer won (or the watching connection broke): again
                self.conflicts += 1
                log_event(log, logging.INFO, "store.conflict", session=session_id, attempt=attempt + 1)
        raise Aborted(f"session_id: session {session_id!r} is being updated concurrently; retry")

    async def delete(self, session_id: str) -> SessionState | None:
        self.cache.discard(session_id)
        with self._unavailable("delete"):
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.getdel(self.key(session_id))
                pipe.zrem(self.index_key, session_id)
                data, _ = await pipe.execute()
        return None if data is None else _decode(data)[1]

    async def count(self) -> int:
        """Open sessions (every replica's)."""
        with self._unavailable("count"):
            pruned, count = await self._count(keys=[self.index_key])
        self.expired += int(pruned)
        return int(count)

    async def close(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.client.aclose()

    @contextlib.contextmanager
    def _unavailable(self, operation: str) -> Iterator[_Timer]:
        """Redis errors -> StoreUnavailable; tells the observer how long the block talked to Redis."""
        timer = _Timer()
        started = time.perf_counter()
        failed = False
        try:
            yield timer
        except WatchError:
            raise
        except (RedisError, OSError, asyncio.TimeoutError) as error:
            failed = True
            raise StoreUnavailable(f"redis {operation} failed: {type(error).__name__}: {error}") from error
        finally:
            if self.observer is not None:
                self.observer(operation, max(0.0, time.perf_counter() - started - timer.excluded), failed)


class _Timer:
    """Seconds of a timed block that were not spent on Redis (an update's decision step)."""

    __slots__ = ("excluded",)

    def __init__(self) -> None:
        self.excluded = 0.0
