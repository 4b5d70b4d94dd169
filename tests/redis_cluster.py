"""A real local Redis Cluster for tests and benchmarks: three masters, each with one replica,
redis-server processes on free ports with their files in a temporary directory.

    with local_cluster() as cluster:            # pytest.skip if redis-server / redis-cli are missing
        RedisStateStore.from_url(cluster.url)   # redis-cluster://127.0.0.1:p1,127.0.0.1:p2,...
        node = cluster.master_of("kvevict:{s1}:state")
        cluster.kill(node)                      # SIGKILL: a master lost mid-run
        cluster.wait_failover(node)             # its replica took over its slots
        cluster.restart(node)                   # back, as the new master's replica

Nothing is persisted (`--save ""`, no AOF): a node restarted after a kill comes back empty
and resynchronises from the master that replaced it. A short `--cluster-node-timeout` makes
a failover take about two seconds.

`python -m tests.redis_cluster` times a report's state write with and without a replication
wait, on one Redis with a replica and on a local cluster (main(); quoted in docs/REDIS.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from tests.servers import redis_answers, wait_until

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
NODE_TIMEOUT_MS = 1000
BUS_OFFSET = 10_000  # a node's cluster bus listens on its port + 10000


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_node_port(taken: set[int]) -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port + BUS_OFFSET < 65536 and port not in taken and port + BUS_OFFSET not in taken \
                and _free(port + BUS_OFFSET):
            return port
    raise RuntimeError("no free port pair for a cluster node")


class ClusterNode:
    """One redis-server of the cluster; `port`, `alive`, `client()` (a plain client to it)."""

    def __init__(self, port: int, directory: Path, node_timeout_ms: int) -> None:
        self.port = port
        self.directory = directory
        self.node_timeout_ms = node_timeout_ms
        self.process: subprocess.Popen | None = None
        self.directory.mkdir(parents=True, exist_ok=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def client(self, **kwargs: object) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, **kwargs)

    def start(self) -> None:
        assert not self.alive, "already running"
        log = open(self.directory / "redis.log", "ab")
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--daemonize", "no",
             "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             "--cluster-node-timeout", str(self.node_timeout_ms), "--appendonly", "no", "--save", "",
             "--dir", str(self.directory),
             # The first sync starts at once (the default waits 5 s for more replicas to share it).
             "--repl-diskless-sync-delay", "0"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        wait_until(self._answers, 10, what=f"redis-server on port {self.port}")

    def _answers(self) -> bool:
        return redis_answers(self)

    def info(self, section: str) -> dict:
        with self.client() as client:
            return client.info(section)

    def cluster_info(self) -> dict[str, str]:
        with self.client() as client:
            text = client.execute_command("CLUSTER", "INFO")
        text = text.decode() if isinstance(text, bytes) else text
        return dict(line.split(":", 1) for line in text.split() if ":" in line)

    def kill(self) -> None:
        if self.alive:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
        if self.process is not None:
            self.process.wait()

    def pause(self) -> None:
        """SIGSTOP: the node hangs (its replication too) without losing anything."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def __repr__(self) -> str:
        return f"ClusterNode({self.address})"


class LocalCluster:
    """`masters` masters with `replicas` replicas each, on free ports, under `directory`."""

    def __init__(self, directory: Path, masters: int = 3, replicas: int = 1,
                 node_timeout_ms: int = NODE_TIMEOUT_MS) -> None:
        if REDIS_SERVER is None or REDIS_CLI is None:
            raise RuntimeError("redis-server and redis-cli are needed for a local cluster")
        self.directory = Path(directory)
        self.replicas = replicas
        self._lost: dict[int, list[tuple[int, int]]] = {}  # killed port -> the slot ranges it served
        taken: set[int] = set()
        self.nodes: list[ClusterNode] = []
        for _ in range(masters * (1 + replicas)):
            port = _free_node_port(taken)
            taken |= {port, port + BUS_OFFSET}
            self.nodes.append(ClusterNode(port, self.directory / str(port), node_timeout_ms))

    @property
    def url(self) -> str:
        return "redis-cluster://" + ",".join(node.address for node in self.nodes)

    def start(self, timeout_s: float = 30.0) -> LocalCluster:
        for node in self.nodes:
            node.start()
        created = subprocess.run(
            [REDIS_CLI, "--cluster", "create", *(node.address for node in self.nodes),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout_s,
        )
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{created.stdout}\n{created.stderr}")
        self.wait_healthy(timeout_s)
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()

    # --- topology ---------------------------------------------------------------------------

    def _node(self, port: int) -> ClusterNode:
        return next(node for node in self.nodes if node.port == port)

    def _live(self) -> list[ClusterNode]:
        return [node for node in self.nodes if node.alive]

    def masters(self) -> list[ClusterNode]:
        """The nodes that serve slots now (as the first live node sees it)."""
        return [self._node(port) for port in sorted(set(self._slot_owners().values()))]

    def _slot_owners(self) -> dict[tuple[int, int], int]:
        """(first slot, last slot) -> port of the master serving that range."""
        with self._live()[0].client() as client:
            ranges = client.execute_command("CLUSTER", "SLOTS")
        return {(int(r[0]), int(r[1])): int(r[2][1]) for r in ranges}

    def keyslot(self, key: str) -> int:
        with self._live()[0].client() as client:
            return int(client.execute_command("CLUSTER", "KEYSLOT", key))

    def master_of(self, key: str) -> ClusterNode:
        """The master that holds `key`'s slot."""
        slot = self.keyslot(key)
        return next(self._node(port) for (first, last), port in self._slot_owners().items() if first <= slot <= last)

    def replicas_of(self, master: ClusterNode) -> list[ClusterNode]:
        """Live replicas linked to `master` (from its INFO replication)."""
        info = master.info("replication")
        ports = [int(info[f"slave{i}"]["port"]) for i in range(int(info.get("connected_slaves", 0)))]
        return [self._node(port) for port in ports]

    # --- failures ---------------------------------------------------------------------------

    def kill(self, node: ClusterNode) -> None:
        """SIGKILL: nothing flushed, nothing said to the other nodes."""
        self._lost[node.port] = [slots for slots, port in self._slot_owners().items() if port == node.port]
        node.kill()

    def wait_failover(self, failed: ClusterNode, timeout_s: float = 20.0) -> ClusterNode:
        """Waits until a live master serves the slots `failed` served when it was killed and
        every live node says cluster_state:ok; returns that master."""
        lost = self._lost[failed.port]

        def taken_over() -> ClusterNode | None:
            try:
                owners = self._slot_owners()
                heirs = {owners.get(slots) for slots in lost}
                if len(heirs) != 1 or None in heirs or failed.port in heirs:
                    return None
                heir = self._node(heirs.pop())
                if not heir.alive or any(node.cluster_info().get("cluster_state") != "ok" for node in self._live()):
                    return None
                return heir
            except Exception:  # a node in the middle of changing roles
                return None

        return wait_until(taken_over, timeout_s, interval_s=0.05, what=f"the failover of {failed}")

    def restart(self, node: ClusterNode, timeout_s: float = 30.0) -> None:
        """Starts a killed node again on its port with its cluster config: it rejoins, as a
        replica when another master took its slots, and resynchronises."""
        node.start()
        self.wait_healthy(timeout_s)

    def wait_healthy(self, timeout_s: float = 30.0) -> None:
        """Every node up and agreeing on cluster_state:ok, every master with its replicas linked."""
        def healthy() -> bool:
            try:
                if not all(node.alive for node in self.nodes):
                    return False
                if any(node.cluster_info().get("cluster_state") != "ok" for node in self.nodes):
                    return False
                owners = set(self._slot_owners().values())
                for node in self.nodes:
                    info = node.info("replication")
                    if node.port in owners:
                        if info["role"] != "master" or int(info.get("connected_slaves", 0)) < self.replicas:
                            return False
                    elif info["role"] != "slave" or info.get("master_link_status") != "up" \
                            or info.get("master_sync_in_progress", 0):
                        return False
                return True
            except Exception:  # not answering yet, or roles still settling
                return False

        wait_until(healthy, timeout_s, interval_s=0.05, what="a healthy cluster")

    def __enter__(self) -> LocalCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def local_cluster(masters: int = 3, replicas: int = 1, node_timeout_ms: int = NODE_TIMEOUT_MS) -> Iterator[LocalCluster]:
    """A started LocalCluster in a temporary directory, stopped and removed on exit; inside
    pytest, a missing redis-server or redis-cli skips the test."""
    if REDIS_SERVER is None or REDIS_CLI is None:
        import pytest

        pytest.skip("redis-server and redis-cli are not installed (apt-get install redis-server)")
    directory = Path(tempfile.mkdtemp(prefix="kvevict-cluster-"))
    try:
        with LocalCluster(directory, masters, replicas, node_timeout_ms) as cluster:
            yield cluster
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# --- what a replication wait costs: python -m tests.redis_cluster [--updates N] ------------------


def _bench_state(layers: int, kv_heads: int, tokens: int):
    """An H2O session state holding `tokens` per KV head in every layer (positions + accumulators)."""
    import numpy as np

    from kvevict.cache_manager.transitions import open_session
    from tests.test_manager_support import open_request

    request = open_request("h2o", budget=tokens, num_layers=layers, num_kv_heads=kv_heads, num_query_heads=4 * kv_heads)
    state = open_session(request, "bench")[1]
    positions = [np.tile(np.arange(tokens, dtype=np.int32), (kv_heads, 1)) for _ in range(layers)]
    accumulators = [np.ones((kv_heads, tokens), np.float32) for _ in range(layers)]
    return state.evolve(positions=positions, accumulators=accumulators, last_position=tokens - 1)


def _time_updates(url: str, state, updates: int, wait_replicas: int) -> list[float]:
    """Seconds of Redis time (the store's observer: the decision step excluded) of each update
    of one session whose states the store has cached, as a sticky manager replica sees them."""
    from kvevict.cache_manager.redis_store import RedisStateStore
    from kvevict.cache_manager.state import Transition

    async def scenario() -> list[float]:
        store = RedisStateStore.from_url(url, wait_replicas=wait_replicas, wait_timeout_ms=1000)
        await store.create(state)
        seconds: list[float] = []
        store.observer = lambda operation, spent, failed: seconds.append(spent) if operation == "update" else None
        for _ in range(updates):
            await store.update(state.session_id, lambda stored: Transition(None, stored.evolve(
                last_sequence=stored.last_sequence + 1)))
        await store.delete(state.session_id)
        await store.close()
        return seconds

    return asyncio.run(scenario())


# The compare-and-set with the value as a script argument (what _SWAP avoids), for comparison.
_CAS_THROUGH_LUA = """
if redis.call('GETRANGE', KEYS[1], 0, 7) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return 1
end
return 0
"""


def _time_writes(port: int, data: bytes, times: int) -> dict[str, tuple[float, float]]:
    """(median seconds at the client, microseconds of Redis's thread per write) of storing
    `data` by a plain SET, by the store's staged SET + swap, and by a CAS script taking the value."""
    from kvevict.cache_manager import redis_store

    def plain(client, version: bytes, value: bytes) -> None:
        client.set("bench:{s}:state", value, ex=60)

    def staged(client, version: bytes, value: bytes) -> None:
        pipe = client.pipeline(transaction=False)
        pipe.set("bench:{s}:staged", value, ex=60)
        pipe.eval(redis_store._SWAP, 2, "bench:{s}:state", "bench:{s}:staged", version, value[:8], 60)
        assert pipe.execute()[1] == 1

    def through_lua(client, version: bytes, value: bytes) -> None:
        assert client.eval(_CAS_THROUGH_LUA, 1, "bench:{s}:state", version, value, 60) == 1

    spent = {}
    with redis.Redis(port=port, socket_timeout=60) as client:
        for name, write in (("SET", plain), ("staged SET + swap script (the store)", staged),
                            ("CAS script taking the value", through_lua)):
            client.set("bench:{s}:state", data)
            client.config_resetstat()
            seconds = []
            for _ in range(times):
                version = client.getrange("bench:{s}:state", 0, redis_store.VERSION_BYTES - 1)
                value = os.urandom(redis_store.VERSION_BYTES) + data[redis_store.VERSION_BYTES:]
                started = time.perf_counter()
                write(client, version, value)
                seconds.append(time.perf_counter() - started)
            stats = client.info("commandstats")
            busy = sum(stats[f"cmdstat_{c}"]["usec"] for c in ("set", "eval") if f"cmdstat_{c}" in stats)
            spent[name] = (statistics.median(seconds), busy / times)
        client.delete("bench:{s}:state")
    return spent


def main(argv: list[str] | None = None) -> int:
    """Prints the Redis time of a report's state write with and without `WAIT 1`, on one Redis
    with one replica and on a local cluster, for a small and a Llama-3.1-8B-sized H2O state."""
    import argparse

    from tests.servers import RedisServer

    parser = argparse.ArgumentParser(prog="python -m tests.redis_cluster", description=main.__doc__)
    parser.add_argument("--updates", type=int, default=200, help="updates timed per row (a tenth for the large state)")
    args = parser.parse_args(argv)
    states = {"small (3 layers x 2 heads x 128 tokens)": _bench_state(3, 2, 128),
              "Llama-3.1-8B, 4K tokens (32 x 8 x 4096)": _bench_state(32, 8, 4096)}
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvevict-bench-") as tmp:
        with RedisServer(Path(tmp) / "master") as master, RedisServer(Path(tmp) / "replica") as replica:
            with replica.client() as client:
                client.replicaof("127.0.0.1", master.port)
                wait_until(lambda: client.info("replication")["master_link_status"] == "up", 10, what="the replica")
            targets = {"one Redis + 1 replica": master.url.replace("/0", "")}
            writes = _time_writes(master.port, states["Llama-3.1-8B, 4K tokens (32 x 8 x 4096)"].to_bytes(), 20)
            with local_cluster() as cluster:
                targets["cluster, 3 masters x 1 replica"] = cluster.url
                for target, url in targets.items():
                    for size, state in states.items():
                        updates = args.updates if size.startswith("small") else max(5, args.updates // 10)
                        for wait in (0, 1):
                            seconds = sorted(_time_updates(url, state, updates, wait))
                            rows.append((target, size, len(state.to_bytes()), wait, updates,
                                         statistics.median(seconds), seconds[int(0.9 * (len(seconds) - 1))]))
    print(f"{'store':32} {'state':42} {'bytes':>10} {'WAIT':>4} {'n':>4} {'p50 ms':>8} {'p90 ms':>8}")
    for target, size, nbytes, wait, n, p50, p90 in rows:
        print(f"{target:32} {size:42} {nbytes:>10} {wait:>4} {n:>4} {p50 * 1e3:>8.3f} {p90 * 1e3:>8.3f}")
    print("\nstoring the 8B state on one Redis (median of 20 at the client; mean of Redis's own time per write):")
    for name, (seconds, busy_us) in writes.items():
        print(f"  {name:40} {seconds * 1e3:8.2f} ms   Redis busy {busy_us / 1e3:7.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
