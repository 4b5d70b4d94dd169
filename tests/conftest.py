"""Shared fixtures: real redis-server processes on free ports and manager server processes.

Never the machine's own Redis: every fixture starts a private redis-server (see tests/servers.py).
Tests that need one are skipped, saying so, only when redis-server is not installed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.servers import REDIS_SERVER, ManagerProcess, RedisServer, start_manager

NO_REDIS = "redis-server is not installed (CI installs it: scripts/install_system_deps.sh or apt-get install redis-server)"


def _require_redis() -> None:
    if REDIS_SERVER is None:
        pytest.skip(NO_REDIS)


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisServer]:
    """A fresh redis-server for one test: `.url`, `.stop()`, `.start()` (same port), `.restart()`,
    `.save()` (snapshot loaded by the next start), `.pause()` / `.resume()`, `.client()`."""
    _require_redis()
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture(scope="module")
def module_redis(tmp_path_factory) -> Iterator[RedisServer]:
    """One redis-server shared by the tests of a module (do not stop it in a test)."""
    _require_redis()
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def manager_factory() -> Iterator[Callable[..., ManagerProcess]]:
    """`start(redis_url="memory://", *flags) -> ManagerProcess` (`.address` once ready); every
    manager started is killed at teardown."""
    started: list[ManagerProcess] = []

    def start(redis_url: str = "memory://", *flags: str) -> ManagerProcess:
        manager = start_manager(redis_url, *flags)
        started.append(manager)
        return manager

    yield start
    for manager in started:
        manager.kill()


@pytest.fixture
def manager_server(redis_server: RedisServer, manager_factory) -> ManagerProcess:
    """One manager replica on its own fresh Redis (`redis_server`)."""
    return manager_factory(redis_server.url)
