"""The CacheManagerService calls on protobuf messages, without any transport.

`ManagerCore` is synchronous over a StateStore (the worker's embedded client calls it directly,
with an InMemoryStateStore); `AsyncManagerCore` is the same over an AsyncStateStore (the gRPC
server, with Redis). Both only move states in and out of their store: validation and decisions
are the pure functions of `transitions`, so the two cannot drift apart. The gRPC servicer maps
the errors of kvevict.cache_manager.errors to status codes.
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

    def __init__(self, store: StateStore, new_session_id: Callable[[], str] = new_session_id) -> None:
        self.store = store
        self._new_session_id = new_session_id

    def open_session(self, request: pb.OpenSessionRequest) -> pb.OpenSessionResponse:
        response, state = transitions.open_session(request, self._new_session_id())
        self.store.create(state)
        return response

    def adopt_session(self, request: pb.OpenSessionRequest, positions: Sequence[np.ndarray]) -> pb.OpenSessionResponse:
        """Opens a session over the worker's current cache (fail-open from a remote manager).

        `positions[l]`: layer l's (num_kv_heads, L_l) integer array of cached absolute positions,
        in cache order. The new session (new id, sequence numbers from 1 again) tracks exactly
        these tokens; its accumulators start at zero (see transitions.adopt_session).
        InvalidArgument names the offending field (`positions[3].shape`, `policy.base`...).
        """
        response, state = transitions.adopt_session(request, positions, self._new_session_id())
        self.store.create(state)
        return response

    def report_block(self, request: pb.ReportBlockRequest) -> pb.ReportBlockResponse:
        return self.store.update(request.session_id, transitions.report_step(request))

    def close_session(self, request: pb.CloseSessionRequest) -> pb.CloseSessionResponse:
        session_id = transitions.check_session_id(request.session_id)
        return transitions.close_response(transitions.require(self.store.delete(session_id), session_id))

    def get_session(self, request: pb.GetSessionRequest) -> pb.GetSessionResponse:
        session_id = transitions.check_session_id(request.session_id)
        return transitions.session_response(transitions.require(self.store.get(session_id), session_id))

    @staticmethod
    def list_policies(request: pb.ListPoliciesRequest | None = None) -> pb.ListPoliciesResponse:
        return transitions.policies_response()

    @staticmethod
    def describe_policies() -> list[ComponentInfo]:
        return describe_policies()


class AsyncManagerCore:
    """ManagerCore for an asyncio server over an AsyncStateStore (Redis). Decisions run off the
    event loop (the store runs each report's step in the default executor). With `metrics`, it
    records sessions opened and closed and every report's outcome and decision."""

    def __init__(self, store: AsyncStateStore, new_session_id: Callable[[], str] = new_session_id,
                 metrics: ManagerMetrics | None = None) -> None:
        self.store = store
        self._new_session_id = new_session_id
        self.metrics = metrics

    async def open_session(self, request: pb.OpenSessionRequest) -> pb.OpenSessionResponse:
        response, state = transitions.open_session(request, self._new_session_id())
        await self.store.create(state)
        if self.metrics is not None:
            self.metrics.sessions_opened.inc()
        return response

    async def report_block(self, request: pb.ReportBlockRequest) -> pb.ReportBlockResponse:
        if self.metrics is None:
            return await self.store.update(request.session_id, transitions.report_step(request))
        try:
            step = transitions.report_step(request, digest=self.metrics.digest)
            response = await self.store.update(request.session_id, step)
        except Exception as error:
            self.metrics.report_failed(request, error)
            raise
        self.metrics.report_answered(request, step.decision, step.digested)
        return response

    async def close_session(self, request: pb.CloseSessionRequest) -> pb.CloseSessionResponse:
        session_id = transitions.check_session_id(request.session_id)
        response = transitions.close_response(transitions.require(await self.store.delete(session_id), session_id))
        if self.metrics is not None:
            self.metrics.sessions_closed.inc()
        return response

    async def get_session(self, request: pb.GetSessionRequest) -> pb.GetSessionResponse:
        session_id = transitions.check_session_id(request.session_id)
        return transitions.session_response(transitions.require(await self.store.get(session_id), session_id))

    @staticmethod
    async def list_policies(request: pb.ListPoliciesRequest | None = None) -> pb.ListPoliciesResponse:
        return transitions.policies_response()

