"""One model, one request at a time: a FIFO queue in front of a single model thread.

The model is blocking CPU/GPU work and is not safe to run from two threads, so every job runs on
one dedicated thread, in arrival order (the executor's queue is FIFO): a request waits for the
ones before it and nothing overtakes it. Fairness is arrival order; throughput is one sequence at
a time (batching several sequences per forward is a later step). At most `max_queue` jobs wait
behind the running one; more are refused with `QueueFull` rather than queued without bound.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, TypeVar

T = TypeVar("T")


class QueueFull(Exception):
    """`max_queue` jobs already wait for the model."""


class ModelScheduler:
    """Runs jobs one at a time on one thread, first come first served."""

    def __init__(self, max_queue: int, initializer: Callable[[], None] | None = None) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.max_queue = max_queue
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvevict-model",
                                            initializer=initializer)
        self._lock = threading.Lock()
        self._admitted = 0  # running + waiting
        self._running = 0
        self._closed = False

    @property
    def in_flight(self) -> int:
        """Jobs running or waiting."""
        with self._lock:
            return self._admitted

    @property
    def waiting(self) -> int:
        """Jobs waiting behind the running one (the queue depth)."""
        with self._lock:
            return self._admitted - self._running

    def submit(self, job: Callable[[], T]) -> Future[T]:
        """Queues `job`; raises QueueFull when max_queue jobs already wait behind a running one.

        Cancelling the returned future before the job starts removes it from the queue.
        """
        with self._lock:
            if self._closed:
                raise QueueFull("the worker is shutting down")
            if self._admitted > self.max_queue:
                raise QueueFull(f"{self._admitted - 1} requests already wait for the model "
                                f"(max queue {self.max_queue})")
            self._admitted += 1
        try:
            future = self._executor.submit(self._run, job)
        except RuntimeError as error:  # the executor shut down between the check and the submit
            self._job_done(None)
            raise QueueFull("the worker is shutting down") from error
        future.add_done_callback(self._job_done)
        return future

    def _run(self, job: Callable[[], T]) -> T:
        with self._lock:
            self._running += 1
        return job()

    def _job_done(self, future: Future | None) -> None:
        with self._lock:
            self._admitted -= 1
            if future is not None and not future.cancelled():  # it ran (a future not cancelled did)
                self._running -= 1

    def close(self, wait: bool = True) -> None:
        """Refuses new jobs, drops the waiting ones and (with wait) waits for the running one."""
        with self._lock:
            self._closed = True
        self._executor.shutdown(wait=wait, cancel_futures=True)
