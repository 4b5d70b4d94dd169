"""The Redis state store on a real local Redis Cluster (tests/redis_cluster.py: three masters,
each with a replica): sessions spread over the slots with each session's key on its own
master, the session limits, the scripts reloaded where a node lost them, the replication wait,
and a generation through `kvevict manager serve --redis-url redis-cluster://...` whose
session's master is killed mid-run, giving exactly the tokens of an uninterrupted run."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from kvevict.cache_manager.errors import ResourceExhausted, StoreUnavailable
from kvevict.cache_manager.redis_store import RedisStateStore, session_key
from kvevict.cache_manager.transitions import report_step
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.worker.cache_session import EvictionSettings
from kvevict.worker.generator import EvictingGenerator
from kvevict.worker.manager_client import EmbeddedManagerClient
from kvevict.worker.model_loader import model_from_config
from kvevict.worker.remote_manager import RemoteManagerClient
from tests.redis_cluster import LocalCluster, local_cluster
from tests.servers import start_manager
from tests.test_redis_store import new_state, two_reports
from tests.tiny_models import tiny_config

PROMPT = torch.randint(3, 97, (60,), generator=torch.Generator().manual_seed(11))


@pytest.fixture(scope="module")
def cluster():
    """One cluster for the module; a test that kills a node restarts it (healthy again after)."""
    with local_cluster() as started:
        yield started


def run(coroutine):
    return asyncio.run(coroutine)


def test_sessions_spread_over_the_masters_each_on_its_own_slot_with_limits_shared(cluster: LocalCluster) -> None:
    first, _ = two_reports("s0")
    ids = [f"s{i}" for i in range(12)]

    async def scenario():
        store = RedisStateStore.from_url(cluster.url, max_sessions=13, max_sessions_per_owner=12)
        other = RedisStateStore.from_url(cluster.url, max_sessions=13, max_sessions_per_owner=12)  # a replica
        assert store.cluster
        await store.ping()
        for session_id in ids:
            await store.create(new_state(session_id, "alice"))
        with pytest.raises(ResourceExhausted, match="^max_sessions_per_client: the client's limit of 12 open"):
            await other.create(new_state("s12", "alice"))
        await other.create(new_state("b0", "bob"))
        with pytest.raises(ResourceExhausted, match="^max_sessions: the manager's limit of 13 open sessions"):
            await other.create(new_state("b1", "bob"))
        assert await other.count() == 13

        homes = {cluster.master_of(store.key(session_id)).port for session_id in ids}
        assert len(homes) == 3  # 12 sessions on all three masters
        for session_id in ids:  # each key is on the master of its slot (another node would answer MOVED)
            with cluster.master_of(store.key(session_id)).client() as node:
                assert node.exists(store.key(session_id)) == 1
        with cluster.master_of(store.index_key).client() as node:
            assert node.zcard(store.index_key) == 13
        with cluster.master_of(store.owner_key("alice")).client() as node:
            assert node.zcard(store.owner_key("alice")) == 12

        answer = await other.update("s0", report_step(first, owner="alice"))  # a write through the CAS script
        assert (await store.get("s0")).last_response == answer.SerializeToString()
        assert (await store.update("s0", report_step(first, owner="alice"))).SerializeToString() == \
            answer.SerializeToString()  # a retry, on another replica: the stored decision
        assert (await store.delete("s0")).reports == 1 and await other.get("s0") is None
        await other.create(new_state("s12", "alice"))  # s0's places in both counts are free again
        assert await store.count() == 13
        for session_id in [*ids[1:], "s12", "b0"]:
            await store.delete(session_id)
        assert await other.count() == 0
        await store.close()
        await other.close()

    run(scenario())


def test_scripts_are_loaded_again_where_a_node_lost_them(cluster: LocalCluster) -> None:
    """A replica promoted to master has no script cache: registered scripts load themselves."""
    async def scenario():
        store = RedisStateStore.from_url(cluster.url, max_sessions=5)
        await store.create(new_state("flushed"))
        for master in cluster.masters():
            with master.client() as node:
                node.script_flush()
        assert await store.count() == 1
        await store.create(new_state("flushed2"))
        assert await store.count() == 2
        await store.delete("flushed")
        await store.delete("flushed2")
        await store.close()

    run(scenario())


def test_wait_replicas_on_a_cluster_waits_for_the_sessions_own_replica(cluster: LocalCluster) -> None:
    """WAIT goes to the session's master on the connection that wrote: a stalled replica of
    that master (and only that) makes the write UNAVAILABLE until it catches up."""
    first, _ = two_reports("w")

    async def scenario():
        store = RedisStateStore.from_url(cluster.url, wait_replicas=1, wait_timeout_ms=300)
        await store.create(new_state("w"))
        master = cluster.master_of(store.key("w"))
        (replica,) = cluster.replicas_of(master)
        replica.pause()
        try:
            with pytest.raises(StoreUnavailable, match="^redis update failed: ReplicasBehind: 0 of 1"):
                await store.update("w", report_step(first))
            # Sessions on the other masters are not held up.
            elsewhere = next(f"w{i}" for i in range(100) if cluster.master_of(store.key(f"w{i}")) != master)
            await store.create(new_state(elsewhere))
        finally:
            replica.resume()
        answer = await store.update("w", report_step(first))  # the stored decision, acknowledged now
        stored = await store.get("w")
        assert stored.reports == 1 and stored.last_response == answer.SerializeToString()  # decided once
        with replica.client(single_connection_client=True) as on_replica, master.client() as on_master:
            on_replica.execute_command("READONLY")
            assert on_replica.get(store.key("w")) == on_master.get(store.key("w"))
        await store.delete("w")
        await store.delete(elsewhere)
        await store.close()

    run(scenario())


class SessionRecordingClient(RemoteManagerClient):
    """A RemoteManagerClient that remembers the ids of the sessions it opened and when each
    report was answered."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.session_ids: list[str] = []
        self.answered: list[float] = []  # time.monotonic() of each answered report

    def open_session(self, request: pb.OpenSessionRequest) -> pb.OpenSessionResponse:
        response = super().open_session(request)
        self.session_ids.append(response.session_id)
        return response

    def report_block(self, request: pb.ReportBlockRequest) -> pb.ReportBlockResponse:
        response = super().report_block(request)
        self.answered.append(time.monotonic())
        return response


def _generate(manager, base: str, **kwargs):
    torch.manual_seed(0)
    settings = EvictionSettings(policy=pb.PolicySpec(base=base, wrapper="caote", sink_tokens=2),
                                budget=pb.BudgetSpec(tokens=20), block_size=8, fail_open=False)
    model = model_from_config(tiny_config("llama"), seed=5)
    return EvictingGenerator(model, manager, settings).generate(PROMPT, 40, **kwargs)


@pytest.mark.parametrize("base", ["h2o", "snapkv"])
def test_a_generation_survives_the_loss_of_its_sessions_master(cluster: LocalCluster, base: str) -> None:
    """The manager waits for a replica on every write (--redis-wait-replicas 1): when the master
    holding the session is killed mid-generation, its replica takes over with every decision
    the worker received (H2O's accumulators included), and the worker's retries carry the same
    sequence numbers over the failover. A decision lost with the master would show as a
    different token stream, or as a refused (out-of-order) report: the worker does not fail open."""
    expected = _generate(EmbeddedManagerClient(), base)
    manager = start_manager(cluster.url, "--redis-wait-replicas", "1", "--max-sessions", "8")
    client = SessionRecordingClient(manager.address, timeout_s=5, retries=60, backoff_s=0.25)
    tokens: list[int] = []
    killed: list[float] = []  # when
    healer: list[threading.Thread] = []

    def on_token(token: int) -> None:
        tokens.append(token)
        if len(tokens) == 12:  # mid-generation: prefill and the first decode blocks are stored
            node = cluster.master_of(session_key(client.session_ids[0]))
            cluster.kill(node)
            killed.append(time.monotonic())

            def heal() -> None:  # what an orchestrator does: the node comes back, as a replica
                cluster.wait_failover(node)
                cluster.restart(node)

            healer.append(threading.Thread(target=heal, daemon=True))
            healer[0].start()

    try:
        result = _generate(client, base, on_token=on_token)
    finally:
        client.close()
        for thread in healer:
            thread.join(30)
        manager.kill()
        cluster.wait_healthy()
    assert killed, "the master was never killed"
    assert len(client.session_ids) == 1
    assert sum(t > killed[0] for t in client.answered) >= 2  # reports went on after the kill...
    assert client.retries_made > 0  # ...which was noticed...
    assert not result.summary.manager_fallback  # ...and the remote manager decided every block
    assert result.summary.reports == expected.summary.reports
    assert result.token_ids == expected.token_ids
    assert result.summary.evicted_per_layer == expected.summary.evicted_per_layer
    assert min(expected.summary.evicted_per_layer) > 0  # the policy really evicted
