"""ManagerCore: the CacheManagerService calls on protobuf messages, without any transport.

The worker's embedded client calls it directly; the gRPC servicer wraps it and maps
InvalidArgument / NotFound / Aborted (kvevict.cache_manager.errors) to status codes.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from kvevict.cache_manager.decision import decide
from kvevict.cache_manager.errors import Aborted, InvalidArgument, NotFound
from kvevict.cache_manager.registry import ComponentInfo, describe_policies
from kvevict.cache_manager.settings import settings_from_request
from kvevict.cache_manager.state import SessionState, StateStore
from kvevict.cache_manager.validation import validate_report
from kvevict.v1 import cache_manager_pb2 as pb


class ManagerCore:
    """Sessions, reports and decisions over a StateStore; stateless itself, so any replica
    sharing the store can serve any call."""

    def __init__(self, store: StateStore, new_session_id: Callable[[], str] = lambda: uuid.uuid4().hex) -> None:
        self.store = store
        self._new_session_id = new_session_id

    def open_session(self, request: pb.OpenSessionRequest) -> pb.OpenSessionResponse:
        settings = settings_from_request(request)
        policy = settings.policy()
        budgets = settings.allocator().initial_budgets(settings.geometry)
        state = SessionState.new(self._new_session_id(), settings, budgets, policy.accumulates)
        self.store.put(state)
        return pb.OpenSessionResponse(
            session_id=state.session_id,
            statistics=[req.to_proto() for req in settings.statistics],
            report_every_block=policy.accumulates,
            layer_budgets=budgets,
            statistics_dtype=settings.statistics_dtype,
        )

    def report_block(self, request: pb.ReportBlockRequest) -> pb.ReportBlockResponse:
        state = self._state(request.session_id)
        sequence = request.sequence
        if sequence == state.last_sequence and state.last_response:
            # A retry: the stored answer, nothing recomputed, nothing changed.
            return pb.ReportBlockResponse.FromString(state.last_response)
        if sequence == 0:
            raise InvalidArgument("sequence", "starts at 1")
        if sequence != state.last_sequence + 1:
            raise Aborted(f"sequence: got {sequence}, expected {state.last_sequence + 1} (or {state.last_sequence} to retry)")
        report = validate_report(request, state)
        response, next_state = decide(state, report, sequence)
        self.store.put(next_state)  # state and answer in one write
        return response

    def close_session(self, request: pb.CloseSessionRequest) -> pb.CloseSessionResponse:
        state = self._state(request.session_id)
        self.store.delete(state.session_id)
        return pb.CloseSessionResponse(reports=state.reports, evicted_tokens=state.evicted_tokens)

    @staticmethod
    def describe_policies() -> list[ComponentInfo]:
        return describe_policies()

    def _state(self, session_id: str) -> SessionState:
        state = self.store.get(session_id)
        if state is None:
            raise NotFound(f"session_id: unknown or expired session {session_id!r}")
        return state
