"""Session states in Redis (redis-py asyncio), standalone or Redis Cluster: the store shared by
manager replicas.

Layout (prefix `kvevict:` by default; docs/REDIS.md says what each part costs):
- `<prefix>{<id>}:state`: an 8-byte random version, then the state (`SessionState.to_bytes()`),
  with a TTL refreshed on every write (a session idle for `ttl_s` expires: NOT_FOUND). The
  hash tag `{<id>}` puts everything of one session on one cluster slot.
- `<prefix>sessions`: sorted set of open session ids scored by their expiry (Redis server time,
  to the microsecond, so an id is pruned only once its key has expired);
  it counts sessions for `max_sessions`, a limit shared by every replica, and for the metrics.
  Expired ids are pruned from it when a session is created and by `count()` (the manager's
  health probe, every second); the replica that prunes an id adds it to its `expired` tally,
  so the replicas' tallies sum to the sessions that expired unclosed. The set itself lives
  INDEX_GRACE_S longer than its newest session, so a probe still finds (and counts) the last ones.
- `<prefix>{owner:<digest>}:sessions`: the same for the sessions of one owner (the identity that
  opened them; `max_sessions_per_owner`), pruned when that owner creates a session. The tag is a
  digest of the owner, so no identity appears in a key and any string makes a valid tag.
On a cluster each index is one key on its own slot, so no command ever spans two slots.

A report is optimistic: it starts from the state this replica cached last, unread (else it
reads the version with GETRANGE, and the whole state only if the cache below does not hold
that version), runs the step (decode, validate, decide, encode) in the default executor, then
a compare-and-set on the session's slot: the new value is SET under a staging key
(`<prefix>{<id>}:state:staged:<version>`), and a script renames it onto the state key only if
the stored version is still the one the step saw (else drops it). Redis never copies the state
into Lua (an 8 MB script argument costs its one thread ~20 ms; the SET and the rename, under
1 ms). Pipelined after them (in order on the same connection when not on a cluster) the index
entries' expiries move, only for entries that exist: a session deleted meanwhile is not
brought back. If another replica wrote the session in between, the swap refuses and the step
runs again on the new state, read (`conflicts`; Aborted after MAX_ATTEMPTS); a step that
stored nothing on the unread state (a retry's answer, a refusal) counts only once the version
is checked: so one round trip per report when the cache is current, exactly one
decision per sequence number is stored, and the loser of a race on one sequence number answers
the winner's decision if it sent the same request, else FAILED_PRECONDITION (the stored digest).

Creating a session touches three slots, so it is a sequence of single-slot scripts: reserve the
id in the global index (prune, check `max_sessions`, add), then in the owner's, then SET the
state; a refusal or failure of a later step undoes the earlier ones. `delete` removes the state
and both index entries.

With `wait_replicas` > 0 every state write (create, update) is followed, on the same connection
to the key's master, by `WAIT wait_replicas wait_timeout_ms`; fewer acknowledgements are
StoreUnavailable, and a report answered from the stored state (a retry) first makes that
master's replicas acknowledge everything up to it. A decision a worker received thus survives
the loss of its master (the replica promoted in its place holds it).

Each replica keeps the states it last read or wrote in a bounded LRU cache keyed by that
version: an update transfers the whole state only if its cached copy is not the current one.
A worker's channel sticks to one replica, so most reports skip the largest read (8.5 MB for an H2O session of Llama-3.1-8B at 4K tokens; redis-py takes
~30 ms for it). The version is random per write, not the sequence number, because a Redis
restored from an older snapshot could store a different state under a sequence number a
replica has cached.

Every Redis or socket error becomes StoreUnavailable (UNAVAILABLE); commands time out after
`timeout_s`, and only a broken pooled connection is retried (once; on a cluster, after
re-reading the slot map), so an outage surfaces in bounded time and the worker's backoff
decides what happens next.

`observer(operation, seconds, failed)`, when set, hears of every operation (ping, get, create,
update, delete, count) with the time spent talking to Redis (an update's decision step, run
in the executor, is not Redis time and is left out) and whether it failed (StoreUnavailable).
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Union
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as redis
from redis.asyncio.cluster import ClusterNode, PipelineCommand, RedisCluster
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError

from kvevict.cache_manager.errors import Aborted, ManagerError, ResourceExhausted, StoreUnavailable
from kvevict.logs import log_event, session_ref
from kvevict.cache_manager.state import MAX_ATTEMPTS, R, SessionState, Step, Transition

log = logging.getLogger("kvevict.manager.redis")

Client = Union[redis.Redis, RedisCluster]
CLUSTER_SCHEMES = ("redis-cluster://", "rediss-cluster://")
DEFAULT_PREFIX = "kvevict:"
DEFAULT_TTL_S = 3600
DEFAULT_TIMEOUT_S = 2.0
DEFAULT_CACHE_BYTES = 256 * 2**20
DEFAULT_WAIT_TIMEOUT_MS = 1000
VERSION_BYTES = 8
# A staged state lives this long at most (if the swap after it never comes: a lost connection).
STAGED_TTL_S = 60
# The index outlives its newest session by this much, so expired ids are pruned (and counted)
# before the index itself goes.
INDEX_GRACE_S = 60

# Prunes expired ids, enforces a limit and adds an id, atomically (one index, one slot).
# KEYS: index; ARGV: ttl (s), limit (0 = none), session id, index ttl (s).
# Returns {indexed sessions if refused else -1, expired ids pruned}.
_RESERVE = """
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1e6
local pruned = redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local limit = tonumber(ARGV[2])
if limit > 0 and redis.call('ZCARD', KEYS[1]) >= limit then
  return {redis.call('ZCARD', KEYS[1]), pruned}
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return {-1, pruned}
"""
# Swaps a staged state in only if the stored version is still the one the step saw ("" = no
# key), else drops it. The state's bytes never pass through Lua: a script argument of 8 MB costs
# Redis ~20 ms of its one thread, a SET of the same bytes plus this RENAME under 1 ms
# (docs/REDIS.md). KEYS: state key, staged key (same slot); ARGV: expected version, the staged
# value's version, ttl (s). Returns 1 if the staged value is now the state (also when it already
# was: the client resent this write after a lost reply), else 0.
_SWAP = """
local current = redis.call('GETRANGE', KEYS[1], 0, 7)
if current == ARGV[1] then
  redis.call('RENAME', KEYS[2], KEYS[1])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  return 1
end
redis.call('DEL', KEYS[2])
if current ~= '' and current == ARGV[2] then
  return 1
end
return 0
"""
# Moves an indexed session's expiry; an id not indexed (deleted meanwhile) is not added back.
# KEYS: index; ARGV: ttl (s), session id, index ttl (s). Returns 1 if the id was indexed.
_TOUCH = """
if not redis.call('ZSCORE', KEYS[1], ARGV[2]) then
  return 0
end
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1e6
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""
# Rewrites a key's expiry to what it already is: a write that changes nothing, so that a WAIT
# after it counts the replicas holding everything this master stored before. KEYS: state key.
_REAFFIRM = """
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return ttl
"""
# Live sessions. KEYS: index. Returns {expired ids pruned, open sessions}.
_COUNT = """
local time = redis.call('TIME')
local pruned = redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(time[1]) + tonumber(time[2]) / 1e6)
return {pruned, redis.call('ZCARD', KEYS[1])}
"""


class ReplicasBehind(RedisError):
    """Fewer replicas than `wait_replicas` acknowledged a write within `wait_timeout_ms`."""


def redact(url: str) -> str:
    """The URL without its password, for logs (a cluster URL's host list is kept as it is)."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return urlunsplit(parts._replace(netloc=f"{userinfo.partition(':')[0]}:***@{hosts}"))


def session_key(session_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The key of a session's state, tagged by the session: `kvevict:{<id>}:state`."""
    return f"{prefix}{{{session_id}}}:state"


def owner_key(owner: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The index of `owner`'s sessions, tagged by a digest (no identity in key names)."""
    digest = hashlib.sha256(owner.encode()).hexdigest()[:32]
    return f"{prefix}{{owner:{digest}}}:sessions"


def cluster_client(url: str, **kwargs: Any) -> RedisCluster:
    """A RedisCluster for `redis-cluster://[user:password@]host:port[,host:port...][?options]`
    (`rediss-cluster://` for TLS): every listed node is a startup node; the query options are
    those of a redis:// URL (e.g. `ssl_ca_certs=...`); `kwargs` go to RedisCluster."""
    scheme, _, rest = url.partition("://")
    if scheme + "://" not in CLUSTER_SCHEMES:
        raise ValueError(f"a cluster URL starts with redis-cluster:// or rediss-cluster://, got {redact(url)!r}")
    rest, _, query = rest.partition("?")
    netloc, _, database = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if database not in ("", "0"):
        raise ValueError(f"a Redis Cluster has only database 0, got {redact(url)!r}")
    nodes = []
    for address in hosts.split(","):
        host, colon, port = address.strip().rpartition(":")
        if not colon or not host or not port.isdigit():
            raise ValueError(f"cluster nodes are host:port[,host:port...], got {address!r} in {redact(url)!r}")
        nodes.append(ClusterNode(host.strip("[]"), int(port)))
    # The options of the first node's redis:// URL: credentials, TLS, query arguments.
    plain = f"{'rediss' if scheme == 'rediss-cluster' else 'redis'}://{userinfo}{at}{hosts.split(',')[0]}"
    options = parse_url(plain + (f"/?{query}" if query else ""))
    options.pop("host", None)
    options.pop("port", None)
    if options.pop("connection_class", None) is SSLConnection:
        options["ssl"] = True
    return RedisCluster(startup_nodes=nodes, **{**kwargs, **options})  # as redis-py: the URL's options win


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

    def latest(self, session_id: str) -> tuple[bytes, SessionState] | None:
        """The version and state last put for the session, whether or not still Redis's."""
        entry = self._entries.get(session_id)
        if entry is None:
            return None
        self._entries.move_to_end(session_id)
        self.hits += 1
        return entry[0], entry[1]

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
    """AsyncStateStore on Redis or Redis Cluster; see the module docstring for the layout, the
    compare-and-set update, the session limits and the replication waits.

        store = RedisStateStore.from_url("redis-cluster://10.0.0.1:7000,10.0.0.2:7000",
                                         max_sessions=10_000, max_sessions_per_owner=100, wait_replicas=1)
    """

    def __init__(self, client: Client, *, ttl_s: int = DEFAULT_TTL_S, max_sessions: int = 0,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, prefix: str = DEFAULT_PREFIX, max_sessions_per_owner: int = 0,
                 wait_replicas: int = 0, wait_timeout_ms: int = DEFAULT_WAIT_TIMEOUT_MS) -> None:
        if ttl_s <= 0:
            raise ValueError(f"session TTL must be > 0 s, got {ttl_s}")
        for name, value in (("max_sessions", max_sessions), ("max_sessions_per_owner", max_sessions_per_owner),
                            ("wait_replicas", wait_replicas)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if wait_timeout_ms <= 0:  # WAIT with 0 would block forever
            raise ValueError(f"wait_timeout_ms must be > 0, got {wait_timeout_ms}")
        if "{" in prefix or "}" in prefix:  # a tag in the prefix would put every key on one slot
            raise ValueError(f"the key prefix must not contain {{ or }}, got {prefix!r}")
        self.client = client
        self.cluster = isinstance(client, RedisCluster)
        self.ttl_s = int(ttl_s)
        self.max_sessions = max_sessions  # 0 = no limit
        self.max_sessions_per_owner = max_sessions_per_owner  # 0 = no limit
        self.wait_replicas = wait_replicas  # 0 = no WAIT
        self.wait_timeout_ms = wait_timeout_ms
        self.prefix = prefix
        self.index_key = f"{prefix}sessions"
        self.cache = StateCache(cache_bytes)
        self.conflicts = 0  # steps run again because another writer won the race
        self.expired = 0  # expired session ids this replica pruned from the index
        self.observer: Callable[[str, float, bool], None] | None = None  # see the module docstring
        self._reserve = client.register_script(_RESERVE)
        self._count = client.register_script(_COUNT)

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, **options: Any) -> RedisStateStore:
        """A store on `redis://`, `rediss://`, `unix://` (one Redis) or `redis-cluster://`,
        `rediss-cluster://` (a cluster: host:port[,host:port...]); `options` are the
        constructor's keywords. Commands time out after `timeout_s`."""
        wait_timeout_ms = options.get("wait_timeout_ms", DEFAULT_WAIT_TIMEOUT_MS)
        if options.get("wait_replicas") and wait_timeout_ms >= timeout_s * 1000:
            raise ValueError(f"wait_timeout_ms ({wait_timeout_ms}) must be below the Redis timeout "
                             f"({timeout_s * 1000:g} ms), or every unacknowledged write times out instead")
        retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
        if url.startswith(CLUSTER_SCHEMES):
            client: Client = cluster_client(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                            retry=retry)
        else:
            client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                          retry=retry)
        return cls(client, **options)

    def key(self, session_id: str) -> str:
        return session_key(session_id, self.prefix)

    def owner_key(self, owner: str) -> str:
        return owner_key(owner, self.prefix)

    @staticmethod
    def encode(state: SessionState) -> bytes:
        """A state as stored under its key: a new random version, then the state's bytes."""
        return state.to_bytes(prefix=_new_version())

    async def ping(self) -> None:
        with self._unavailable("ping"):
            if self.cluster:  # every master must answer: any of them may hold the next report's session
                await self.client.ping(target_nodes=RedisCluster.PRIMARIES)
            else:
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
        """Reserves the id in the global index, then in the owner's, then stores the state (and
        waits for the replicas); a refusal or failure undoes what was done."""
        data = self.encode(state)
        session_id = state.session_id
        key = self.key(session_id)
        index_args = (self.ttl_s, session_id, self.ttl_s + INDEX_GRACE_S)
        done: list[str] = []  # keys to clean up if a later step refuses or fails
        with self._unavailable("create"):
            try:
                refused, pruned = await self._reserve(keys=[self.index_key], args=[
                    index_args[0], self.max_sessions, *index_args[1:]])
                self.expired += int(pruned)
                if refused >= 0:
                    raise ResourceExhausted(
                        f"max_sessions: the manager's limit of {self.max_sessions} open sessions is reached")
                done.append(self.index_key)
                owner_key = self.owner_key(state.owner)
                refused, _ = await self._reserve(keys=[owner_key], args=[
                    index_args[0], self.max_sessions_per_owner, *index_args[1:]])
                if refused >= 0:
                    raise ResourceExhausted(f"max_sessions_per_client: the client's limit of "
                                            f"{self.max_sessions_per_owner} open sessions is reached")
                done += [owner_key, key]
                self._check_replicas(await self._on_key_node(key, [("SET", key, data, "EX", self.ttl_s),
                                                                    *self._wait()]), "create")
            except BaseException:
                await self._undo(session_id, done)
                raise
        self.cache.put(session_id, data[:VERSION_BYTES], state, len(data))

    async def update(self, session_id: str, step: Step[R]) -> R:
        key = self.key(session_id)
        loop = asyncio.get_running_loop()
        for attempt in range(MAX_ATTEMPTS):
            with self._unavailable("update") as timer:
                # First, the cached state unread: the write's compare-and-set checks its version.
                cached = self.cache.latest(session_id) if attempt == 0 else None
                if cached is not None:
                    version, stored = cached
                else:
                    version, stored = await self._read(session_id, key)
                new_version = _new_version()
                stepped = time.perf_counter()
                try:
                    transition, seen, data = await loop.run_in_executor(None, _apply, step, stored, new_version)
                except ManagerError:
                    if cached is None or await self._current(key, version):
                        raise
                    transition = None  # refused on a state that was no longer the session's
                finally:
                    timer.excluded += time.perf_counter() - stepped
                if transition is not None:
                    if isinstance(stored, bytes):
                        self.cache.put(session_id, version, seen, len(stored))
                    if data is None:  # a retry or an error: nothing to write
                        if cached is None or await self._current(key, version):
                            if self.wait_replicas and version:  # the stored answer must be on the replicas too
                                self._check_replicas(await self._on_key_node(
                                    key, [("EVAL", _REAFFIRM, 1, key), *self._wait()]), "reaffirm")
                            return transition.result
                    elif await self._write(key, version, data, transition.state):
                        return transition.result
            self.conflicts += 1  # another writer won (or the cached state was not the last): again, read
            log_event(log, logging.INFO, "store.conflict", session_ref=session_ref(session_id), attempt=attempt + 1)
        raise Aborted("session_id: the session is being updated concurrently; retry")

    async def _read(self, session_id: str, key: str) -> tuple[bytes, SessionState | bytes | None]:
        """The stored version and the state: the cached copy of that version, else its bytes."""
        version = await self.client.getrange(key, 0, VERSION_BYTES - 1)
        if not version:
            return version, None
        stored = self.cache.get(session_id, version)
        if stored is not None:
            return version, stored
        data = await self.client.get(key)
        # The version of what was read (a write may have come after the GETRANGE).
        return (b"", None) if data is None else (data[:VERSION_BYTES], data)

    async def _current(self, key: str, version: bytes) -> bool:
        return await self.client.getrange(key, 0, VERSION_BYTES - 1) == version

    async def delete(self, session_id: str) -> SessionState | None:
        self.cache.discard(session_id)
        with self._unavailable("delete"):
            data, _ = await self._pipeline([("GETDEL", self.key(session_id)), ("ZREM", self.index_key, session_id)])
            if data is None:
                return None
            state = _decode(data)[1]
            await self.client.zrem(self.owner_key(state.owner), session_id)
        return state

    async def count(self) -> int:
        """Open sessions (every replica's, every owner's)."""
        with self._unavailable("count"):
            pruned, count = await self._count(keys=[self.index_key])
        self.expired += int(pruned)
        return int(count)

    async def close(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.client.aclose()

    async def _write(self, key: str, version: bytes, data: bytes, state: SessionState) -> bool:
        """The CAS of a new state, its index entries' expiries, the replication wait. Returns
        whether the state was stored (False: the version moved on, nothing was written)."""
        session_id = state.session_id
        staged = f"{key}:staged:{data[:VERSION_BYTES].hex()}"  # unique to this attempt
        cas = [("SET", staged, data, "EX", min(self.ttl_s, STAGED_TTL_S)),
               ("EVAL", _SWAP, 2, key, staged, version, data[:VERSION_BYTES], self.ttl_s)]
        indexes = (self.index_key, self.owner_key(state.owner))
        touches = [("EVAL", _TOUCH, 1, index, self.ttl_s, session_id, self.ttl_s + INDEX_GRACE_S) for index in indexes]
        if self.cluster and self.wait_replicas:  # WAIT pinned to the key's master; the touches in parallel
            on_key, touched = await _gather(self._on_key_node(key, [*cas, *self._wait()]), self._pipeline(touches))
            written, acks = on_key[1], on_key[2:]
        else:  # one pipeline: on one Redis, in order on one connection (CAS, touches, then WAIT,
            # which covers the touches too); on a cluster, one round trip to each node involved
            results = await self._pipeline([*cas, *touches, *self._wait()])
            written, touched, acks = results[1], results[2:4], results[4:]
        if not written:
            return False
        self.cache.put(session_id, data[:VERSION_BYTES], state, len(data))
        for index, present in zip(indexes, touched):
            if not present:  # its entry was pruned meanwhile (clock skew between nodes): index it again
                _, pruned = await self._reserve(keys=[index], args=[self.ttl_s, 0, session_id,
                                                                    self.ttl_s + INDEX_GRACE_S])
                if index == self.index_key:
                    self.expired += int(pruned)
        self._check_replicas(acks, "update")
        return True

    def _wait(self) -> list[tuple[Any, ...]]:
        return [("WAIT", self.wait_replicas, self.wait_timeout_ms)] if self.wait_replicas else []

    def _check_replicas(self, results: Sequence[Any], operation: str) -> None:
        """Raises ReplicasBehind if the WAIT ending `results` counted too few replicas."""
        if self.wait_replicas and int(results[-1]) < self.wait_replicas:
            raise ReplicasBehind(f"{results[-1]} of {self.wait_replicas} replicas acknowledged the {operation} "
                                 f"within {self.wait_timeout_ms} ms")

    async def _pipeline(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Commands in one round trip (per node, on a cluster); the first error is raised."""
        async with self.client.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            return await pipe.execute()

    async def _on_key_node(self, key: str, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Commands in order on ONE connection to the master of `key`'s slot, which is what
        WAIT needs: it counts the replicas that acknowledged this connection's writes. A
        pipeline does that, except on a cluster with a (keyless) WAIT in it: a cluster pipeline
        routes WAIT to its default node when it retries after a broken connection, so there the
        commands go straight to the key's master; if that fails, a routed command lets the
        cluster client see the failure (and re-read the slot map) for the next call."""
        if not (self.cluster and self.wait_replicas):
            return await self._pipeline(commands)
        await self.client.initialize()  # a no-op once the slot map is known
        node = self.client.get_node_from_key(key)
        queued = [PipelineCommand(i, *command) for i, command in enumerate(commands)]
        try:
            await node.execute_pipeline(queued)
            for command in queued:
                if isinstance(command.result, BaseException):
                    raise command.result
        except (RedisError, OSError, asyncio.TimeoutError):
            with contextlib.suppress(RedisError, RedisClusterException, OSError, asyncio.TimeoutError):
                await self.client.exists(key)
            raise
        return [command.result for command in queued]

    async def _undo(self, session_id: str, keys: Sequence[str]) -> None:
        """Best effort: what is left (Redis down) expires with the session's TTL."""
        for key in reversed(keys):
            try:
                if key == self.key(session_id):
                    await self.client.delete(key)
                else:
                    await self.client.zrem(key, session_id)
            except (RedisError, RedisClusterException, OSError, asyncio.TimeoutError) as error:
                log_event(log, logging.WARNING, "store.undo_failed", session_ref=session_ref(session_id),
                          error=f"{type(error).__name__}: {_describe(error)}")

    @contextlib.contextmanager
    def _unavailable(self, operation: str) -> Iterator[_Timer]:
        """Redis errors -> StoreUnavailable; tells the observer how long the block talked to Redis."""
        timer = _Timer()
        started = time.perf_counter()
        failed = False
        try:
            yield timer
        except (RedisError, RedisClusterException, OSError, asyncio.TimeoutError) as error:
            failed = True
            raise StoreUnavailable(f"redis {operation} failed: {type(error).__name__}: {_describe(error)}") from error
        finally:
            if self.observer is not None:
                self.observer(operation, max(0.0, time.perf_counter() - started - timer.excluded), failed)


def _describe(error: BaseException) -> str:
    """An error's message without the command a pipeline adds to it (key names, a state's bytes)."""
    message = str(error)
    if message.startswith("Command # "):
        message = message.rpartition(" of pipeline caused error: ")[2]
        with contextlib.suppress(ValueError, SyntaxError):  # redis-py quotes the original args tuple
            quoted = ast.literal_eval(message)
            if isinstance(quoted, tuple) and quoted:
                message = str(quoted[0])
    return message


async def _gather(*calls: Any) -> list[Any]:
    """Runs the calls concurrently, lets every one finish, then raises the first error."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


class _Timer:
    """Seconds of a timed block that were not spent on Redis (an update's decision step)."""

    __slots__ = ("excluded",)

    def __init__(self) -> None:
        self.excluded = 0.0
