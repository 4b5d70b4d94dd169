"""Real server processes for integration tests (no tests here): a generic "start a subprocess and
wait for its ready line" helper, a redis-server on a free port that can be stopped, restarted on
the same port, paused and resumed, and the `kvevict manager serve` command line.

    with start_server([...argv], READY_RE) as server:   # output captured, killed on exit
        server.match.group(1)                            # what the ready pattern captured
    manager = start_manager(redis.url, "--max-sessions", "2")
    manager.address                                      # "127.0.0.1:<port>"
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MANAGER_READY = re.compile(r"event=manager\.ready .*\bport=(\d+)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition, timeout_s: float, interval_s: float = 0.05, what: str = "condition"):
    """Polls `condition()` until it returns something truthy (returned); AssertionError on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


class ServerProcess:
    """A server subprocess whose stdout and stderr (merged) are collected line by line."""

    def __init__(self, argv: list[str], ready: re.Pattern[str], env: dict[str, str] | None = None,
                 cwd: Path = REPO, name: str | None = None) -> None:
        self.argv = argv
        self.ready = ready
        self.name = name or Path(argv[0]).name
        self.match: re.Match[str] | None = None
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self.process = subprocess.Popen(
            argv, cwd=cwd, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            with self._cond:
                self._lines.append(line.rstrip("\n"))
                if self.match is None:
                    self.match = self.ready.search(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_ready(self, timeout_s: float = 30.0) -> re.Match[str]:
        """Blocks until the ready pattern appears; fails with the output if the process exits first."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self.match is None:
                if self.process.poll() is not None and not self._reader.is_alive():
                    raise RuntimeError(f"{self.name} exited with {self.process.returncode} before ready:\n{self.output}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{self.name} not ready after {timeout_s} s:\n{self.output}")
                self._cond.wait(min(remaining, 0.1))
            return self.match

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self._lines)

    def lines(self, pattern: str) -> list[str]:
        """Output lines that contain `pattern` (a regular expression)."""
        regex = re.compile(pattern)
        with self._cond:
            return [line for line in self._lines if regex.search(line)]

    def send_signal(self, sig: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> int:
        """Sends `sig`, waits for the exit (SIGKILL after `timeout_s`); returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(5)
        return self.process.returncode

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a paused process cannot die of SIGKILL late
            self.process.kill()
        self.process.wait()
        self._reader.join(5)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


def start_server(argv: list[str], ready: re.Pattern[str], timeout_s: float = 30.0, **kwargs) -> ServerProcess:
    """Starts `argv` and returns once a line matches `ready` (the process is killed if it never does)."""
    server = ServerProcess(argv, ready, **kwargs)
    try:
        server.wait_ready(timeout_s)
    except BaseException:
        server.kill()
        raise
    return server


class ManagerProcess(ServerProcess):
    """`kvevict manager serve --port 0`; `address` once ready."""

    @property
    def port(self) -> int:
        assert self.match is not None, "not ready"
        return int(self.match.group(1))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_port(self) -> int:
        return metrics_port(self)


def metrics_port(server: ServerProcess) -> int:
    """The `metrics_port=N` of a ready server's ready line (manager or worker)."""
    assert server.match is not None, "not ready"
    found = re.search(r"\bmetrics_port=(\d+)", server.match.string)
    assert found, f"no metrics_port in the ready line: {server.match.string}"
    return int(found.group(1))


def manager_argv(redis_url: str = "memory://", *extra: str) -> list[str]:
    return [sys.executable, "-m", "kvevict.cli", "manager", "serve", "--port", "0", "--metrics-port", "0",
            "--redis-url", redis_url, *extra]


def start_manager(redis_url: str = "memory://", *extra: str, timeout_s: float = 30.0) -> ManagerProcess:
    """A manager replica on a free port, its state in `redis_url`; extra flags as given."""
    manager = ManagerProcess(manager_argv(redis_url, *extra), MANAGER_READY, name="manager")
    try:
        manager.wait_ready(timeout_s)
    except BaseException:
        manager.kill()
        raise
    return manager


def start_managers(count: int, redis_url: str = "memory://", *extra: str, timeout_s: float = 30.0) -> list[ManagerProcess]:
    """`count` replicas sharing `redis_url`, started concurrently."""
    managers = [ManagerProcess(manager_argv(redis_url, *extra), MANAGER_READY, name=f"manager[{i}]") for i in range(count)]
    try:
        for manager in managers:
            manager.wait_ready(timeout_s)
    except BaseException:
        for manager in managers:
            manager.kill()
        raise
    return managers


# --- redis-server ------------------------------------------------------------------------------

REDIS_SERVER = shutil.which("redis-server")


def redis_answers(server) -> bool:
    """Whether a started redis-server (`process`, `directory` with its redis.log, `client()`)
    answers a PING; RuntimeError with its log's tail if it exited."""
    if server.process.poll() is not None:
        raise RuntimeError(f"redis-server exited with {server.process.returncode}: "
                           f"{(server.directory / 'redis.log').read_text()[-2000:]}")
    try:
        with server.client(socket_connect_timeout=0.2) as client:
            return bool(client.ping())
    except Exception:
        return False


class RedisServer:
    """A private redis-server on a free port with its files in `directory`.

    Nothing is saved automatically (`--save ""`, no AOF): `stop()` + `start()` is a restart that
    loses every key unless `save()` wrote a snapshot first (loaded from `directory` on start).
    `pause()` / `resume()` (SIGSTOP / SIGCONT) make it hang without losing anything: clients
    connect but get no answer, like a stalled or partitioned Redis.
    """

    def __init__(self, directory: Path, port: int | None = None) -> None:
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server is not installed")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kwargs):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, **kwargs)

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        assert self.process is None or self.process.poll() is not None, "already running"
        self._log = open(self.directory / "redis.log", "ab")
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory), "--dbfilename", "dump.rdb", "--daemonize", "no"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
        )
        wait_until(self._answers, timeout_s, what=f"redis-server on port {self.port}")
        return self

    def _answers(self) -> bool:
        return redis_answers(self)

    def save(self) -> None:
        """Writes a snapshot that the next start() loads."""
        with self.client() as client:
            client.save()

    def stop(self) -> None:
        """Terminates the server (no automatic snapshot: keys not save()d are lost)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self) -> RedisServer:
        self.stop()
        return self.start()

    def pause(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --- clients -----------------------------------------------------------------------------------


def channel(address: str, max_message_bytes: int | None = None):
    """A sync gRPC channel with the clients' standard options (close it, or use `with`)."""
    import grpc

    from kvevict.grpc_options import DEFAULT_MAX_MESSAGE_BYTES, channel_options

    return grpc.insecure_channel(address, options=channel_options(max_message_bytes or DEFAULT_MAX_MESSAGE_BYTES))


def manager_stub(channel_):
    from kvevict.v1 import cache_manager_pb2_grpc

    return cache_manager_pb2_grpc.CacheManagerServiceStub(channel_)
