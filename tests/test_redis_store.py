"""RedisStateStore against a real redis-server: the optimistic transaction (a write between read
and commit makes the step run again on the new state, so one decision is stored), the TTL set
on create and refreshed on every write, the session limit shared by replicas, and Redis errors
as StoreUnavailable."""

from __future__ import annotations

import asyncio
import time

import pytest

from kvevict.cache_manager.errors import Aborted, FailedPrecondition, NotFound, ResourceExhausted, StoreUnavailable
from kvevict.cache_manager.redis_store import RedisStateStore, redact
from kvevict.cache_manager.state import SessionState
from kvevict.cache_manager.transitions import open_session, report_step
from tests.servers import RedisServer, wait_until
from tests.test_manager_support import open_request, start


def run(coroutine):
    return asyncio.run(coroutine)


def new_state(session_id: str = "s1", owner: str = "", **options) -> SessionState:
    return open_session(open_request("h2o", "caote", budget=12, sink=1, **options), session_id, owner)[1]


def two_reports(session_id: str):
    """Two different reports with sequence number 1 for a session opened by new_state()."""
    driver = start(open_request("h2o", "caote", budget=12, sink=1), seed=1)
    first, _ = driver.build(16)
    second, _ = driver.build(16)
    first.session_id = second.session_id = session_id
    return first, second


def sequential_reports(session_id: str, count: int):
    """Reports 1..count for a session opened by new_state(), and each one's decision."""
    driver = start(open_request("h2o", "caote", budget=12, sink=1), seed=3)
    requests, answers = [], []
    for _ in range(count):
        request, _ = driver.build(8)
        answer = driver.core.report_block(request)
        driver.apply(request, answer)
        request.session_id = session_id
        requests.append(request)
        answers.append(answer.SerializeToString())
    return requests, answers


def test_a_replica_starting_from_a_stale_cached_state_answers_as_from_the_stored_one(redis_server) -> None:
    """A replica's first attempt uses its cached state unread; when another replica has moved the
    session on, what it answers is still what the stored state gives: a report the stale state
    calls out of order is decided, a retry the stale state would answer is refused as out of
    order, and a session deleted elsewhere is NOT_FOUND (not written back)."""
    reports, answers = sequential_reports("s1", 5)

    async def scenario():
        mine, other = RedisStateStore.from_url(redis_server.url), RedisStateStore.from_url(redis_server.url)
        await mine.create(new_state())
        outcomes = [(await mine.update("s1", report_step(reports[0]))).SerializeToString()]
        await other.update("s1", report_step(reports[1]))
        try:  # a retry of 1: the cached state would answer it; the stored one has decided 2
            await mine.update("s1", report_step(reports[0]))
        except Aborted as error:
            outcomes.append(str(error))
        await other.update("s1", report_step(reports[2]))
        outcomes.append((await mine.update("s1", report_step(reports[3]))).SerializeToString())
        await other.delete("s1")
        try:
            await mine.update("s1", report_step(reports[4]))
        except NotFound as error:
            outcomes.append(type(error).__name__)
        conflicts = mine.conflicts
        await mine.close()
        await other.close()
        return outcomes, conflicts

    outcomes, conflicts = run(scenario())
    assert outcomes[0] == answers[0]
    assert "out of order" in outcomes[1]
    assert outcomes[2] == answers[3]  # decided on the stored state (after 3), as the driver did
    assert outcomes[3] == "NotFound"
    assert conflicts == 3  # each stale start ran again on the stored state
    with redis_server.client() as client:
        assert client.keys("*s1*") == []


@pytest.mark.parametrize("mine", ["the same request", "another request"])
def test_a_write_between_read_and_commit_makes_the_step_run_again(redis_server, mine: str) -> None:
    """The compare-and-set refuses a state read before another replica's write: the step runs
    again on the winner's state, which answers a retry of the same request with the stored
    decision and refuses another request under that number (the stored state stays the winner's)."""
    state = new_state()
    first, second = two_reports("s1")
    competitor = report_step(second)(state)  # another replica decides `second` meanwhile

    async def scenario():
        store = RedisStateStore.from_url(redis_server.url)
        await store.create(state)
        decide = report_step(second if mine == "the same request" else first)
        seen: list[int] = []

        def step(stored):
            seen.append(stored.last_sequence)
            if len(seen) == 1:
                with redis_server.client() as client:  # the competitor commits first
                    client.set(store.key("s1"), store.encode(competitor.state))
            return decide(stored)

        try:
            answer = await store.update("s1", step)
        except FailedPrecondition as error:
            answer = error
        stored = await store.get("s1")
        await store.close()
        return answer, stored, seen, store.conflicts, store.cache

    answer, stored, seen, conflicts, cache = run(scenario())
    assert seen == [0, 1] and conflicts == 1  # ran on the old state, lost, ran on the new one
    assert stored.to_bytes() == competitor.state.to_bytes()  # the loser wrote nothing
    with redis_server.client() as client:
        assert client.keys("*staged*") == []  # nor left its staged value behind
    if mine == "the same request":
        assert answer.SerializeToString() == competitor.result.SerializeToString()  # the stored decision
        # Its own state came from the cache; the competitor's was read once, then served from the cache.
        assert (cache.hits, cache.misses) == (2, 1)
    else:
        assert isinstance(answer, FailedPrecondition)


def test_ttl_is_set_on_create_refreshed_by_writes_only_and_expiry_is_not_found(redis_server) -> None:
    first, second = two_reports("s1")
    second.sequence = 2
    with redis_server.client() as client:

        async def scenario():
            store = RedisStateStore.from_url(redis_server.url, ttl_s=50)
            await store.create(new_state())
            assert 0 < client.pttl(store.key("s1")) <= 50_000
            client.pexpire(store.key("s1"), 5_000)
            await store.update("s1", report_step(first))
            assert 45_000 < client.pttl(store.key("s1")) <= 50_000  # refreshed with the write
            client.pexpire(store.key("s1"), 5_000)
            await store.update("s1", report_step(first))  # a retry writes nothing
            await store.get("s1")
            assert client.pttl(store.key("s1")) <= 5_000
            client.pexpire(store.key("s1"), 1)  # expire it now
            await asyncio.sleep(0.01)
            with pytest.raises(NotFound):
                await store.update("s1", report_step(second))
            assert await store.get("s1") is None
            await store.close()

        run(scenario())


def test_the_session_limit_is_shared_by_replicas_and_freed_by_close_and_expiry(redis_server) -> None:
    async def scenario():
        one = RedisStateStore.from_url(redis_server.url, max_sessions=2)
        two = RedisStateStore.from_url(redis_server.url, max_sessions=2)
        await one.create(new_state("a"))
        await two.create(new_state("b"))
        with pytest.raises(ResourceExhausted, match="^max_sessions: the manager's limit of 2 open sessions is reached$"):
            await one.create(new_state("c"))
        assert await two.count() == 2
        deleted = await two.delete("a")
        assert deleted.session_id == "a" and await one.delete("a") is None
        await one.create(new_state("c"))
        with redis_server.client() as client:
            client.pexpire(one.key("b"), 1)
            client.zadd(one.index_key, {"b": 0})  # its index entry expired with it
        await two.create(new_state("d"))
        assert await one.count() == 2
        await one.close()
        await two.close()

    run(scenario())


def test_a_resent_write_is_stored_once_and_a_stale_one_not_at_all(redis_server) -> None:
    """What a client resending a write after a lost reply does: the swap finds its own version
    stored and answers "written"; a write prepared on an old version is refused. Neither leaves
    its staged value behind."""
    first, second = two_reports("s1")

    async def scenario():
        store = RedisStateStore.from_url(redis_server.url, ttl_s=100)
        await store.create(new_state())
        with redis_server.client() as client:
            seen = client.getrange(store.key("s1"), 0, 7)
            mine = report_step(first)(new_state()).state
            data = store.encode(mine)
            assert await store._write(store.key("s1"), seen, data, mine)
            assert await store._write(store.key("s1"), seen, data, mine)  # the same pipeline again
            stale = report_step(second)(new_state()).state
            assert not await store._write(store.key("s1"), seen, store.encode(stale), stale)
            assert client.get(store.key("s1")) == data and 99 <= client.ttl(store.key("s1")) <= 100
            assert client.keys("*staged*") == []
        await store.close()

    run(scenario())


def test_the_per_owner_limit_counts_each_owners_live_sessions_and_a_refusal_reserves_nothing(redis_server) -> None:
    async def scenario():
        store = RedisStateStore.from_url(redis_server.url, max_sessions=4, max_sessions_per_owner=2)
        other = RedisStateStore.from_url(redis_server.url, max_sessions=4, max_sessions_per_owner=2)  # a replica
        await store.create(new_state("a1", "alice"))
        await other.create(new_state("a2", "alice"))
        with pytest.raises(ResourceExhausted) as refused:
            await store.create(new_state("a3", "alice"))
        # The message names the limit only: nothing about the sessions or the other clients.
        assert str(refused.value) == "max_sessions_per_client: the client's limit of 2 open sessions is reached"
        assert await store.count() == 2  # the refused id's global reservation was undone
        await store.create(new_state("b1", "bob"))  # another owner has its own count
        await other.create(new_state("n1"))  # "" (nobody authenticated) is an owner like any other
        with pytest.raises(ResourceExhausted, match="^max_sessions: the manager's limit of 4 open sessions is reached$"):
            await store.create(new_state("b2", "bob"))
        with redis_server.client() as client:
            assert client.zrange(store.owner_key("bob"), 0, -1) == [b"b1"]  # not reserved for b2 either
            assert all(b"alice" not in key and b"bob" not in key for key in client.keys("*"))  # digests only
            await other.delete("a1")  # closing frees a place in alice's count...
            await store.create(new_state("a3", "alice"))
            client.pexpire(store.key("a2"), 1)  # ...and so does expiring
            client.zadd(store.owner_key("alice"), {"a2": 0})
            client.zadd(store.index_key, {"a2": 0})
            await store.create(new_state("a4", "alice"))
            assert sorted(client.zrange(store.owner_key("alice"), 0, -1)) == [b"a3", b"a4"]
            await store.delete("n1")  # room in the global count, none in alice's
            with pytest.raises(ResourceExhausted, match="^max_sessions_per_client: "):
                await other.create(new_state("a5", "alice"))
            assert await store.count() == 3
        await store.close()
        await other.close()

    run(scenario())


def test_a_session_deleted_during_a_report_is_not_indexed_again(redis_server) -> None:
    """The index refresh pipelined with the CAS only moves entries that exist: a report racing
    a close does not bring the closed session back into the counts."""
    first, _ = two_reports("s1")

    async def scenario():
        store = RedisStateStore.from_url(redis_server.url)
        await store.create(new_state("s1", "alice"))
        decide = report_step(first, owner="alice")

        def step(stored):
            if stored is not None:
                with redis_server.client() as client:  # another replica closes the session meanwhile
                    client.delete(store.key("s1"))
                    client.zrem(store.index_key, "s1")
                    client.zrem(store.owner_key("alice"), "s1")
            return decide(stored)

        with pytest.raises(NotFound):
            await store.update("s1", step)
        with redis_server.client() as client:
            assert client.zscore(store.index_key, "s1") is None
            assert client.zscore(store.owner_key("alice"), "s1") is None
        assert await store.count() == 0 and store.conflicts == 1
        await store.close()

    run(scenario())


def test_a_write_indexes_again_a_live_session_whose_entry_was_pruned(redis_server) -> None:
    first, _ = two_reports("s1")

    async def scenario():
        store = RedisStateStore.from_url(redis_server.url, ttl_s=100)
        await store.create(new_state("s1", "alice"))
        with redis_server.client() as client:
            client.zrem(store.index_key, "s1")  # e.g. pruned by a node whose clock runs ahead
            client.zrem(store.owner_key("alice"), "s1")
            await store.update("s1", report_step(first, owner="alice"))
            now = float(client.time()[0])
            for index in (store.index_key, store.owner_key("alice")):
                assert now + 99 < client.zscore(index, "s1") <= now + 101
        assert await store.count() == 1
        await store.close()

    run(scenario())


def test_wait_replicas_acknowledges_every_write_or_is_unavailable(redis_server, tmp_path) -> None:
    """With `wait_replicas`, a state write is answered only once a replica holds it: a stalled
    replica makes it UNAVAILABLE (the write stays: a retried report gets the stored decision,
    once the replica holds it); a create nobody acknowledged leaves nothing behind."""
    first, _ = two_reports("s1")
    with RedisServer(tmp_path / "replica") as replica, replica.client() as on_replica, \
            redis_server.client() as on_master:

        async def scenario():
            lonely = RedisStateStore.from_url(redis_server.url, wait_replicas=1, wait_timeout_ms=100, max_sessions=5)
            with pytest.raises(StoreUnavailable, match="^redis create failed: ReplicasBehind: 0 of 1 replicas"):
                await lonely.create(new_state("x"))  # no replica yet
            assert on_master.keys("*") == [] and await lonely.count() == 0  # undone
            on_replica.replicaof("127.0.0.1", redis_server.port)
            wait_until(lambda: on_replica.info("replication")["master_link_status"] == "up", 10, what="the replica")

            store = RedisStateStore.from_url(redis_server.url, wait_replicas=1, wait_timeout_ms=300)
            await store.create(new_state())
            assert on_replica.get(store.key("s1")) == on_master.get(store.key("s1"))  # there when acknowledged
            replica.pause()
            try:
                started = time.monotonic()
                with pytest.raises(StoreUnavailable, match="^redis update failed: ReplicasBehind: 0 of 1"):
                    await store.update("s1", report_step(first))
                assert time.monotonic() - started >= 0.3
                # Still stalled: the retry finds its decision stored, but cannot confirm it either.
                with pytest.raises(StoreUnavailable, match="ReplicasBehind"):
                    await store.update("s1", report_step(first))
            finally:
                replica.resume()
            answer = await store.update("s1", report_step(first))
            decided = (await store.get("s1")).last_response
            assert answer.SerializeToString() == decided and (await store.get("s1")).reports == 1  # decided once
            assert on_replica.get(store.key("s1")) == on_master.get(store.key("s1"))
            await lonely.close()
            await store.close()

        run(scenario())


def test_cluster_urls_and_options_are_checked() -> None:
    store = RedisStateStore.from_url("rediss-cluster://user:secret@10.0.0.1:7000,[::1]:7001/0?ssl_cert_reqs=none",
                                     timeout_s=1.5)
    assert store.cluster
    assert [(n.host, n.port) for n in store.client.startup_nodes] == [("10.0.0.1", 7000), ("::1", 7001)]
    kwargs = store.client.get_connection_kwargs()
    assert (kwargs["username"], kwargs["password"], kwargs["socket_timeout"]) == ("user", "secret", 1.5)
    assert kwargs["connection_class"].__name__ == "SSLConnection" and kwargs["ssl_cert_reqs"] == "none"
    assert not RedisStateStore.from_url("redis://127.0.0.1:1/0").cluster
    assert redact("redis-cluster://user:secret@a:1,b:2") == "redis-cluster://user:***@a:1,b:2"
    assert store.key("s1") == "kvevict:{s1}:state"
    assert store.owner_key("alice") != store.owner_key("bob") and "alice" not in store.owner_key("alice")
    for url, wrong in (("redis-cluster://a:1/3", "database 0"), ("redis-cluster://a:1,b", "host:port")):
        with pytest.raises(ValueError, match=wrong):
            RedisStateStore.from_url(url)
    with pytest.raises(ValueError, match="wait_timeout_ms"):
        RedisStateStore.from_url("redis://127.0.0.1:1/0", timeout_s=1.0, wait_replicas=1, wait_timeout_ms=1000)
    with pytest.raises(ValueError, match="prefix"):
        RedisStateStore.from_url("redis://127.0.0.1:1/0", prefix="app:{x}:")


def test_redis_down_is_store_unavailable(redis_server) -> None:
    first, _ = two_reports("s1")

    async def scenario():
        store = RedisStateStore.from_url(redis_server.url, timeout_s=0.5)
        await store.create(new_state())
        redis_server.stop()
        for call in (store.ping(), store.get("s1"), store.create(new_state("x")), store.delete("s1"),
                     store.update("s1", report_step(first))):
            with pytest.raises(StoreUnavailable, match="^redis "):
                await call
        redis_server.start()  # no snapshot: an empty Redis
        await store.ping()
        with pytest.raises(NotFound):
            await store.update("s1", report_step(first))
        await store.close()

    run(scenario())


def test_a_refused_write_is_unavailable_and_its_message_names_no_key_or_state(redis_server) -> None:
    """Redis refusing writes (here: no replica for min-replicas-to-write) fails the write;
    the error says why without the command a pipeline would quote (the key, the state's bytes)."""
    first, _ = two_reports("s1")

    async def scenario():
        store = RedisStateStore.from_url(redis_server.url)
        await store.create(new_state("secret-id"))
        with redis_server.client() as client:
            client.config_set("min-replicas-to-write", 1)
            for call in (store.update("secret-id", report_step(first)), store.create(new_state("other-id")),
                         store.delete("secret-id")):
                with pytest.raises(StoreUnavailable, match="NOREPLICAS") as refused:
                    await call
                assert "-id" not in str(refused.value) and "kvevict:" not in str(refused.value)
            client.config_set("min-replicas-to-write", 0)
        assert (await store.get("secret-id")).last_sequence == 0  # nothing was written, nor deleted
        await store.close()

    run(scenario())


def test_redact_hides_the_password() -> None:
    assert redact("redis://user:secret@db:6380/1") == "redis://user:***@db:6380/1"
    assert redact("redis://db:6379/0") == "redis://db:6379/0"


def test_a_cached_state_is_used_only_while_it_is_the_stored_version(redis_server) -> None:
    """A replica's cached state for sequence 1 is not reused when Redis holds another state with
    the same sequence number (e.g. a Redis restored from an older snapshot, then reported to)."""
    first, second = two_reports("s1")
    other = report_step(second)(new_state())

    async def scenario():
        store = RedisStateStore.from_url(redis_server.url)
        await store.create(new_state())
        await store.update("s1", report_step(first))
        mine = await store.get("s1")
        assert store.cache.hits == 2  # the update and the read used the cached states
        with redis_server.client() as client:
            client.set(store.key("s1"), store.encode(other.state), keepttl=True)
        seen = await store.get("s1")
        assert seen.last_sequence == mine.last_sequence == 1
        assert seen.to_bytes() == other.state.to_bytes() != mine.to_bytes()
        _, third = two_reports("s1")  # `second` again: the stored state's request, not the cached one's
        assert (await store.update("s1", report_step(third))).SerializeToString() == other.result.SerializeToString()
        await store.close()

    run(scenario())


def test_the_state_cache_is_a_bounded_lru() -> None:
    from kvevict.cache_manager.redis_store import StateCache

    cache = StateCache(max_bytes=100)
    states = {name: new_state(name) for name in "abcd"}
    for name in "abc":
        cache.put(name, b"v", states[name], 40)  # c evicts a
    assert cache.get("a", b"v") is None and cache.get("b", b"v") is states["b"]
    cache.put("d", b"v", states["d"], 40)  # evicts c, the least recently used
    assert cache.get("c", b"v") is None and cache.get("b", b"w") is None  # another version: a miss
    cache.put("big", b"v", states["a"], 101)  # larger than the cache: not kept
    assert cache.get("big", b"v") is None and cache.bytes == 80
