"""Processes that die and come back on the same port, for the restart tests (no tests here):

    redis = DurableRedis(tmp_dir).start()        # AOF, fsync on every write: SIGKILL loses nothing
    manager = ManagerOnPort(redis.url).start()   # `kvevict manager serve` on a port it keeps
    hooked = OutageBeforeReport(client, when, kill=manager.kill, restart=manager.start, after_s=2.0)
    EvictingGenerator(model, hooked, settings).generate(...)   # the kill happens mid-generation
    hooked.join()                                # the restart is done (or its error raised)
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from typing import Callable

from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.worker.manager_client import ManagerClient
from tests.servers import REDIS_SERVER, ManagerProcess, RedisServer, free_port, start_manager, wait_until


class DurableRedis(RedisServer):
    """A RedisServer that appends every write to its AOF and fsyncs it before answering
    (`--appendonly yes --appendfsync always`): a SIGKILL loses nothing, and start() on the same
    directory loads everything back."""

    def start(self, timeout_s: float = 10.0) -> DurableRedis:
        assert self.process is None or self.process.poll() is not None, "already running"
        self._log = open(self.directory / "redis.log", "ab")
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(self.directory), "--daemonize", "no"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
        )
        wait_until(self._answers, timeout_s, what=f"redis-server on port {self.port}")
        return self

    def kill(self) -> None:
        """SIGKILL: nothing flushed beyond what every write already fsynced."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None


class ManagerOnPort:
    """`kvevict manager serve` on one port for its whole life: kill() (SIGKILL) and start() it
    again there. `ready_at`: time.monotonic() when the last start's ready line was seen."""

    def __init__(self, redis_url: str, *flags: str, port: int | None = None) -> None:
        self.redis_url = redis_url
        self.flags = flags
        self.port = port or free_port()
        self.process: ManagerProcess | None = None
        self.ready_at: float | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ManagerOnPort:
        assert self.process is None, "already running"
        self.process = start_manager(self.redis_url, "--port", str(self.port), *self.flags)
        self.ready_at = time.monotonic()
        return self

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process = None


class OutageBeforeReport:
    """A ManagerClient around `inner` that, before sending the first ReportBlock for which
    `when(request)` is true, calls `kill()`, then sends it (the client retries it through the
    outage) while a thread calls `restart()` `after_s` later. `waited_s`: how long that report
    took."""

    def __init__(self, inner: ManagerClient, when: Callable[[pb.ReportBlockRequest], bool],
                 kill: Callable[[], object], restart: Callable[[], object], after_s: float) -> None:
        self.inner = inner
        self.when = when
        self.kill, self.restart, self.after_s = kill, restart, after_s
        self.fired = False
        self.waited_s: float | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def open_session(self, request: pb.OpenSessionRequest) -> pb.OpenSessionResponse:
        return self.inner.open_session(request)

    def report_block(self, request: pb.ReportBlockRequest) -> pb.ReportBlockResponse:
        if self.fired or not self.when(request):
            return self.inner.report_block(request)
        self.fired = True
        self.kill()
        self._thread = threading.Thread(target=self._restart_later, daemon=True)
        self._thread.start()
        started = time.monotonic()
        try:
            return self.inner.report_block(request)
        finally:
            self.waited_s = time.monotonic() - started

    def close_session(self, request: pb.CloseSessionRequest) -> pb.CloseSessionResponse:
        return self.inner.close_session(request)

    def _restart_later(self) -> None:
        time.sleep(self.after_s)
        try:
            self.restart()
        except BaseException as error:  # raised again by join(), in the test's thread
            self._error = error

    def join(self, timeout_s: float = 60.0) -> None:
        """Waits for the restart; raises what it raised."""
        if self._thread is not None:
            self._thread.join(timeout_s)
            assert not self._thread.is_alive(), "the restart did not finish"
        if self._error is not None:
            raise self._error
