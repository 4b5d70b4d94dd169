"""The CacheManagerService calls on protobuf messages, without any transport.

`ManagerCore` is synchronous over a StateStore (the worker's embedded client calls it directly,
with an InMemoryStateStore); `AsyncManagerCore` is the same over an AsyncStateStore (the gRPC
server, with Redis). Both only move states in and out of their store: validation and decisions
are the pure functions of `transitions`, so the two cannot drift apart. The gRPC servicer maps
the errors of kvevict.cache_manager.errors to status codes.

Every session call takes the caller's identity, `owner` (kvevict.auth; "" when the server
authenticates nobody): a session belongs to the identity that opened it, and any other is told
NOT_FOUND, as for an id that never existed. `max_state_bytes` (0 = none) caps one session's
tracked state (RESOURCE_EXHAUSTED naming the cap).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from kvevict.cache_manager import transitions
from kvevict.cache_manager.registry import ComponentInfo, describe_policies
from kvevict.cache_manager.state import AsyncStateStore, StateStore
from kvevict.v1 import cache_manager_pb2 as pb

if TYPE_CHECKING:
    from kvevict.cache_manager.metrics import ManagerMetrics


def new_session_id() -> str:
    return uuid.uuid4().hex


class ManagerCore:
    """Sessions, reports and decisions over a StateStore; stateless itself, so any replica
    sharing the store can serve any call."""

    def __init__(self, store: StateStore, new_session_id: Callable[[], str] = new_session_id,
                 max_state_bytes: int = 0) -> None:
        self.store = store
        self._new_session_id = new_session_id
        self.max_state_bytes = max_state_bytes

    def open_session(self, request: pb.OpenSessionRequest, owner: str = "") -> pb.OpenSessionResponse:
        response, state = transitions.open_session(request, self._new_session_id(), owner, self.max_state_bytes)
        self.store.create(state)
        return response

    def adopt_session(self, request: pb.OpenSessionRequest,
                      positions: Sequence[np.ndarray] | Sequence[Sequence[np.ndarray]]) -> pb.OpenSessionResponse:
        """Opens a session over the worker's current cache (fail-open from a remote manager).

        `positions[l]`: layer l's (num_kv_heads, L_l) integer array of cached absolute positions,
        in cache order; per-head sessions (adahead, global, lukv): a sequence of num_kv_heads
        1-D integer arrays, each head's positions in cache order. The new session (new id, sequence numbers from 1 again) tracks exactly
        these tokens; its accumulators start at zero (see transitions.adopt_session).
        InvalidArgument names the offending field (`positions[3].shape`, `policy.base`...).
        """
        response, state = transitions.adopt_session(request, positions, self._new_session_id())
        self.store.create(state)
        return response

    def report_block(self, request: pb.ReportBlockRequest, owner: str = "") -> pb.ReportBlockResponse:
        step = transitions.report_step(request, owner=owner, max_state_bytes=self.max_state_bytes)
        return self.store.update(request.session_id, step)

    def close_session(self, request: pb.CloseSessionRequest, owner: str = "") -> pb.CloseSessionResponse:
        session_id = transitions.check_session_id(request.session_id)
        # Checked before deleting: another identity's close must leave the session as it is.
        transitions.require(self.store.get(session_id), session_id, owner)
        return transitions.close_response(transitions.require(self.store.delete(session_id), session_id, owner))

    def get_session(self, request: pb.GetSessionRequest, owner: str = "") -> pb.GetSessionResponse:
        session_id = transitions.check_session_id(request.session_id)
        return transitions.session_response(transitions.require(self.store.get(session_id), session_id, owner))

    @staticmethod
    def list_policies(request: pb.ListPoliciesRequest | None = None, owner: str = "") -> pb.ListPoliciesResponse:
        return transitions.policies_response()

    @staticmethod
    def describe_policies() -> list[ComponentInfo]:
        return describe_policies()


class AsyncManagerCore:
    """ManagerCore for an asyncio server over an AsyncStateStore (Redis). Decisions run off the
    event loop (the store runs each report's step in the default executor). With `metrics`, it
    records sessions opened and closed and every report's outcome and decision."""

    def __init__(self, store: AsyncStateStore, new_session_id: Callable[[], str] = new_session_id,
                 metrics: ManagerMetrics | None = None, max_state_bytes: int = 0) -> None:
        self.store = store
        self._new_session_id = new_session_id
        self.metrics = metrics
        self.max_state_bytes = max_state_bytes

    async def open_session(self, request: pb.OpenSessionRequest, owner: str = "") -> pb.OpenSessionResponse:
        response, state = transitions.open_session(request, self._new_session_id(), owner, self.max_state_bytes)
        await self.store.create(state)
        if self.metrics is not None:
            self.metrics.sessions_opened.inc()
        return response

    async def report_block(self, request: pb.ReportBlockRequest, owner: str = "") -> pb.ReportBlockResponse:
        try:
            step = transitions.report_step(request, owner=owner, max_state_bytes=self.max_state_bytes)
            response = await self.store.update(request.session_id, step)
        except Exception as error:
            if self.metrics is not None:
                self.metrics.report_failed(request, error)
            raise
        if self.metrics is not None:
            self.metrics.report_answered(request, step.decision)
        return response

    async def close_session(self, request: pb.CloseSessionRequest, owner: str = "") -> pb.CloseSessionResponse:
        session_id = transitions.check_session_id(request.session_id)
        transitions.require(await self.store.get(session_id), session_id, owner)
        response = transitions.close_response(
            transitions.require(await self.store.delete(session_id), session_id, owner))
        if self.metrics is not None:
            self.metrics.sessions_closed.inc()
        return response

    async def get_session(self, request: pb.GetSessionRequest, owner: str = "") -> pb.GetSessionResponse:
        session_id = transitions.check_session_id(request.session_id)
        return transitions.session_response(transitions.require(await self.store.get(session_id), session_id, owner))

    @staticmethod
    async def list_policies(request: pb.ListPoliciesRequest | None = None, owner: str = "") -> pb.ListPoliciesResponse:
        return transitions.policies_response()

