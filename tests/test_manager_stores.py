"""The in-memory store's atomic update (a write between read and commit makes the step run
again, so racing threads store one decision), its TTL and session limit, and the async core
deciding byte for byte as the sync one (one validate/decide code path)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from kvevict.cache_manager import InMemoryStateStore, ManagerCore, SessionState
from kvevict.cache_manager.errors import FailedPrecondition, NotFound, ResourceExhausted
from kvevict.cache_manager.service import AsyncManagerCore
from kvevict.cache_manager.state import AsyncInMemoryStateStore
from kvevict.cache_manager.transitions import report_step
from kvevict.v1 import cache_manager_pb2 as pb
from tests.test_manager_support import open_request, start


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_write_between_read_and_commit_makes_the_step_run_again() -> None:
    session = start(open_request("h2o", "caote", budget=12, sink=1), seed=3)
    first, _ = session.build(16)
    second, _ = session.build(16)
    store = session.core.store
    mine = report_step(first)
    seen: list[int] = []

    def step(stored: SessionState | None):
        seen.append(stored.last_sequence)
        if len(seen) == 1:
            competitor = store.update(session.id, report_step(second))  # commits first
            assert competitor.sequence == 1
        return mine(stored)

    # Run again on the competitor's state, the step finds its number decided for another
    # request: refused, and the competitor's decision stays.
    with pytest.raises(FailedPrecondition):
        store.update(session.id, step)
    assert seen == [0, 1] and store.conflicts == 1
    stored = store.get(session.id)
    assert stored.last_sequence == 1
    winner = start(open_request("h2o", "caote", budget=12, sink=1))
    second.session_id = winner.id
    assert stored.last_response == winner.core.report_block(second).SerializeToString()


def test_threads_racing_one_sequence_number_store_one_decision() -> None:
    session = start(open_request("snapkv", "caote", budget=64, num_layers=6, num_kv_heads=4, num_query_heads=8), seed=5)
    for round_ in range(5):
        reports = [session.build(96)[0] for _ in range(4)]  # same number, different statistics
        previous = session.core.store.get(session.id)
        candidates = [report_step(r)(previous).result.SerializeToString() for r in reports]
        assert len(set(candidates)) == len(reports)  # each content decides differently
        barrier = threading.Barrier(len(reports))

        def send(report):
            barrier.wait()
            try:
                return session.core.report_block(report).SerializeToString()
            except FailedPrecondition:  # another content won this number
                return None

        with ThreadPoolExecutor(len(reports)) as pool:
            outcomes = list(pool.map(send, reports))
        answers = [outcome for outcome in outcomes if outcome is not None]
        assert len(answers) == 1  # one decided, the three others refused
        state = session.core.store.get(session.id)
        assert (state.reports, state.last_response) == (round_ + 1, answers[0])
        winner = reports[candidates.index(answers[0])]  # one of the four decisions, made once
        session.apply(winner, pb.ReportBlockResponse.FromString(answers[0]))


def test_sessions_expire_after_the_ttl_and_writes_refresh_it() -> None:
    clock = FakeClock()
    core = ManagerCore(InMemoryStateStore(ttl_s=10, clock=clock))
    session = start(open_request("tova", budget=8), core=core)
    clock.now = 9
    session.report(4)  # refreshed: lives until 19
    clock.now = 18
    core.get_session(pb.GetSessionRequest(session_id=session.id))  # a read does not refresh
    clock.now = 19
    with pytest.raises(NotFound):
        core.get_session(pb.GetSessionRequest(session_id=session.id))
    with pytest.raises(NotFound):
        session.report(1)
    assert len(core.store) == 0


def test_the_session_limit_counts_live_sessions() -> None:
    clock = FakeClock()
    core = ManagerCore(InMemoryStateStore(ttl_s=10, max_sessions=2, clock=clock))
    request = open_request("tova", budget=8)
    first = core.open_session(request).session_id
    core.open_session(request)
    with pytest.raises(ResourceExhausted, match="max_sessions: "):
        core.open_session(request)
    core.close_session(pb.CloseSessionRequest(session_id=first))
    core.open_session(request)
    clock.now = 10  # both expire
    core.open_session(request)
    core.open_session(request)
    assert len(core.store) == 2


def test_the_async_core_decides_byte_for_byte_as_the_sync_core() -> None:
    request = open_request("h2o", "fastcaote", budget=12, sink=1)
    session = start(request, seed=8)

    async def replay() -> list[bytes]:
        core = AsyncManagerCore(AsyncInMemoryStateStore())
        session_id = (await core.open_session(request)).session_id
        answers = []
        for new_tokens in (10, 6, 9, 1):
            report, _ = session.build(new_tokens)
            answers.append(session.core.report_block(report).SerializeToString())
            session.apply(report, pb.ReportBlockResponse.FromString(answers[-1]))
            report.session_id = session_id
            assert (await core.report_block(report)).SerializeToString() == answers[-1]
        info = await core.get_session(pb.GetSessionRequest(session_id=session_id))
        closed = await core.close_session(pb.CloseSessionRequest(session_id=session_id))
        assert (info.reports, closed.reports) == (4, 4)
        return answers

    assert len(asyncio.run(replay())) == 4
