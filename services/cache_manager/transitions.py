"""The manager's calls as pure functions of (request, stored state) -> (answer, state to store).

Both cores (`ManagerCore`, sync over an in-memory store; `AsyncManagerCore`, async over Redis)
call these and only move states in and out of their store, so the validation and decision code
exists once. A store runs `report_step(request)` inside its atomic read-modify-write: the step
sees the state as stored, and what it returns is written only if nobody wrote in between.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from kvevict.cache_manager.decision import DecisionStats, decide
from kvevict.cache_manager.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from kvevict.cache_manager.per_head import decide_per_head, initial_head_budgets, layer_totals
from kvevict.cache_manager.policies import make_base
from kvevict.cache_manager.registry import describe_policies
from kvevict.cache_manager.request_digest import report_digest
from kvevict.cache_manager.settings import SessionSettings, settings_from_request
from kvevict.cache_manager.state import SessionState, Transition
from kvevict.cache_manager.validation import MAX_POSITION, validate_per_head_report, validate_report
from kvevict.v1 import cache_manager_pb2 as pb

# Session ids are 32 hex digits; anything longer is not one of ours (and would make a large key).
MAX_SESSION_ID = 128


def check_session_id(session_id: str) -> str:
    """InvalidArgument for ids that cannot be a session's; unknown well-formed ids are NotFound later."""
    if not session_id:
        raise InvalidArgument("session_id", "missing")
    if len(session_id) > MAX_SESSION_ID:
        raise InvalidArgument("session_id", f"longer than {MAX_SESSION_ID} characters")
    return session_id


def require(state: SessionState | None, session_id: str, owner: str = "") -> SessionState:
    """The session if it exists and belongs to `owner`. Another identity's session is reported
    exactly as an unknown one, so ids cannot be probed."""
    if state is None or state.owner != owner:
        raise NotFound("session_id: unknown or expired session")
    return state


def open_session(request: pb.OpenSessionRequest, session_id: str, owner: str = "",
                 max_state_bytes: int = 0) -> tuple[pb.OpenSessionResponse, SessionState]:
    """Validates an OpenSessionRequest and builds the new session's state and answer, owned by
    `owner`. With `max_state_bytes` (0 = no cap), a session whose state at its budget would
    exceed the cap is refused (ResourceExhausted naming the cap)."""
    settings = settings_from_request(request)
    policy = settings.policy()
    head_budgets: list[int] = []
    if settings.per_head:
        head_budgets = initial_head_budgets(settings)
        budgets = layer_totals(head_budgets, settings.geometry.num_kv_heads)
    else:
        budgets = settings.allocator().initial_budgets(settings.geometry)
    if max_state_bytes:
        check_state_bytes(_bytes_at_budget(settings, budgets, policy.accumulates), max_state_bytes, "budget.tokens")
    state = SessionState.new(session_id, settings, budgets, policy.accumulates, owner=owner, head_budgets=head_budgets)
    return _opened(state, policy.accumulates), state


def _bytes_at_budget(settings: SessionSettings, budgets: Sequence[int], accumulates: bool) -> int:
    """The tracked arrays' bytes of a session holding its budget plus one block per layer (per
    KV head: every head caches the block). Per-head sessions' `budgets` are the layers' totals
    over heads, which stay at most the total of tokens x heads whatever the heads' shares."""
    heads = settings.geometry.num_kv_heads
    per_layer = sum(budgets) if settings.per_head else sum(budgets) * heads
    tokens = per_layer + settings.block_size * settings.geometry.num_layers * heads
    return tokens * (8 if accumulates else 4)  # int32 positions (+ float32 accumulators)


def check_state_bytes(size: int, limit: int, field: str) -> None:
    if size > limit:
        raise ResourceExhausted(f"{field}: the session's state would take {size} bytes, above this manager's "
                                f"max_session_bytes of {limit}")


def adopt_session(
    request: pb.OpenSessionRequest, positions: Sequence[np.ndarray] | Sequence[Sequence[np.ndarray]],
    session_id: str, owner: str = ""
) -> tuple[pb.OpenSessionResponse, SessionState]:
    """A new session that starts from a worker's existing cache instead of an empty one.

    `positions[l]` is layer l's (num_kv_heads, L_l) integer array of the absolute positions the
    worker caches, each head's row in cache order (strictly increasing). Per-head sessions
    (allocators adahead, global, lukv): `positions[l]` is a sequence of num_kv_heads 1-D integer
    arrays, head h's positions in cache order, each head its own length (a (num_kv_heads, L)
    array is such a sequence too). The session's last position is their maximum, its sequence
    numbers start again at 1, and accumulators (H2O) start at zero for every cached token: an
    approximation, since the scores they had accumulated at the remote manager are lost.
    Everything else is as after OpenSession (per-head sessions: every head's budget `tokens`).
    """
    response, state = open_session(request, session_id, owner)
    geometry = state.settings.geometry
    if len(positions) != geometry.num_layers:
        raise InvalidArgument("positions", f"expected {geometry.num_layers} layers, got {len(positions)}")
    if state.settings.per_head:
        adopted = [row for i, p in enumerate(positions) for row in _adopted_heads(p, i, geometry.num_kv_heads)]
    else:
        adopted = [_adopted_layer(np.asarray(p), i, geometry.num_kv_heads) for i, p in enumerate(positions)]
    last = max((int(p[:, -1].max()) for p in adopted if p.size), default=-1)
    accumulators = [np.zeros(p.shape, np.float32) for p in adopted] if state.accumulators else []
    return response, state.evolve(positions=adopted, accumulators=accumulators, last_position=last)


def _adopted_heads(heads_positions: Sequence[np.ndarray], layer: int, heads: int) -> list[np.ndarray]:
    """A per-head session's layer: its heads' 1-D positions as (1, L_h) int32 rows (checked)."""
    if isinstance(heads_positions, np.ndarray) and heads_positions.ndim != 2:
        raise InvalidArgument(f"positions[{layer}]", f"must be {heads} 1-D arrays (one per KV head), got an array "
                                                     f"of shape {list(heads_positions.shape)}")
    if len(heads_positions) != heads:
        raise InvalidArgument(f"positions[{layer}]", f"expected {heads} KV heads, got {len(heads_positions)}")
    rows = []
    for head, row in enumerate(heads_positions):
        row = np.asarray(row)
        if row.ndim != 1:
            raise InvalidArgument(f"positions[{layer}][{head}].shape", f"must be 1-D (cache_length,), got "
                                                                       f"{list(row.shape)}")
        rows.append(_adopted_layer(row[None, :], layer, 1, f"positions[{layer}][{head}]"))
    return rows


def _adopted_layer(positions: np.ndarray, layer: int, heads: int, field: str = "") -> np.ndarray:
    field = field or f"positions[{layer}]"
    if positions.dtype.kind not in "iu":
        raise InvalidArgument(f"{field}.dtype", f"must be an integer array, got {positions.dtype}")
    if positions.ndim != 2 or positions.shape[0] != heads:
        raise InvalidArgument(f"{field}.shape", f"must be ({heads}, cache_length), got {list(positions.shape)}")
    if positions.size:
        low, high = int(positions.min()), int(positions.max())
        if low < 0 or high > MAX_POSITION:
            raise InvalidArgument(field, f"positions must lie in [0, {MAX_POSITION}], got [{low}, {high}]")
        if positions.shape[1] > 1 and not (np.diff(positions, axis=1) > 0).all():
            raise InvalidArgument(field, "each head's positions must be strictly increasing (cache order)")
    return positions.astype(np.int32)  # a copy: the worker keeps its array


def _opened(state: SessionState, accumulates: bool) -> pb.OpenSessionResponse:
    settings = state.settings
    return pb.OpenSessionResponse(
        session_id=state.session_id,
        statistics=[req.to_proto(settings.statistics_dtype) for req in settings.statistics],
        # A per-head session's heads hold different counts: the worker cannot tell by itself
        # when no head is over budget, so it reports every block.
        report_every_block=accumulates or settings.per_head,
        layer_budgets=state.layer_budgets,
        statistics_dtype=settings.statistics_dtype,
        per_head_budgets=settings.per_head,
        head_budgets=state.head_budgets,
    )


def report_step(request: pb.ReportBlockRequest, owner: str = "", max_state_bytes: int = 0) -> ReportStep:
    """The read-modify-write of one report by `owner`. A retried sequence number answers the
    stored decision and stores nothing (FailedPrecondition if the request is not the one that
    was decided); an out-of-order one is Aborted; a malformed report InvalidArgument; one that
    would grow the state past `max_state_bytes` (0 = no cap) ResourceExhausted."""
    return ReportStep(request, owner, max_state_bytes)


class ReportStep:
    """A report's Step (state -> answer and next state). After the store ran it, `decision` tells
    what its last run, the one whose answer the store returned, did: the DecisionStats of a new
    decision, or None for a retried sequence number (the stored answer, nothing decided)."""

    def __init__(self, request: pb.ReportBlockRequest, owner: str = "", max_state_bytes: int = 0) -> None:
        self.session_id = check_session_id(request.session_id)
        self.request = request
        self.owner = owner
        self.max_state_bytes = max_state_bytes
        self._digest: str | None = None  # computed once: the store may run the step again
        self.decision: DecisionStats | None = None

    def __call__(self, stored: SessionState | None) -> Transition[pb.ReportBlockResponse]:
        # A store may run the step again (a concurrent write): only the last run counts.
        self.decision = None
        state = require(stored, self.session_id, self.owner)
        request = self.request
        sequence = request.sequence
        if sequence == state.last_sequence and state.last_response:
            if self._digest is None:
                self._digest = report_digest(request)
            if state.last_request_digest and state.last_request_digest != self._digest:
                raise FailedPrecondition("sequence: this sequence number was already decided for another request")
            # A retry: the stored answer, nothing recomputed, nothing changed.
            return Transition(pb.ReportBlockResponse.FromString(state.last_response), None)
        if sequence == 0:
            raise InvalidArgument("sequence", "starts at 1")
        if sequence != state.last_sequence + 1:
            # The expected number stays out of the message: errors reveal no state.
            raise Aborted("sequence: out of order (each report's follows the last decided one, or repeats it to retry)")
        started = time.perf_counter()
        if state.settings.per_head:
            per_head_report = validate_per_head_report(request, state)
            if self._digest is None:
                self._digest = report_digest(request)
            response, next_state, decision = decide_per_head(state, per_head_report, sequence)
        else:
            report = validate_report(request, state)
            if self._digest is None:  # from the bytes validation read, not read again
                self._digest = report_digest(request, report.buffers)
            response, next_state, decision = decide(state, report, sequence)
        if self.max_state_bytes:
            check_state_bytes(next_state.array_bytes, self.max_state_bytes, "layers")
        next_state = next_state.evolve(last_request_digest=self._digest)
        self.decision = replace(decision, seconds=time.perf_counter() - started)
        return Transition(response, next_state)  # state and answer in one write


def close_response(state: SessionState) -> pb.CloseSessionResponse:
    return pb.CloseSessionResponse(reports=state.reports, evicted_tokens=state.evicted_tokens)


def session_response(state: SessionState) -> pb.GetSessionResponse:
    """GetSession's answer: settings (defaults resolved), counters, budgets and tracked lengths."""
    settings = state.settings
    # The budget as opened, its floor resolved; the profile itself is not echoed (up to 1 MiB).
    budget = pb.BudgetSpec(tokens=settings.budget_tokens, allocator=settings.allocator_name)
    if settings.floor is not None:
        budget.floor = settings.floor
    response = pb.GetSessionResponse(
        session_id=state.session_id,
        geometry=settings.geometry.to_proto(),
        policy=_policy_spec(settings),
        budget=budget,
        block_size=settings.block_size,
        reports=state.reports,
        last_sequence=state.last_sequence,
        evicted_tokens=state.evicted_tokens,
        layer_budgets=state.layer_budgets,
        cache_lengths=state.cache_lengths,
    )
    if settings.per_head:
        response.head_budgets[:] = state.head_budgets
        response.head_cache_lengths[:] = state.head_cache_lengths.ravel().tolist()
    return response


def _policy_spec(settings: SessionSettings) -> pb.PolicySpec:
    options = make_base(settings.base, window=settings.window, pool_kernel=settings.pool_kernel, seed=settings.seed).options()
    return pb.PolicySpec(
        base=settings.base, wrapper=settings.wrapper, sink_tokens=settings.sink, recent_tokens=settings.recent,
        window=options.get("window", settings.window), pool_kernel=options.get("pool_kernel", settings.pool_kernel),
        seed=settings.seed,
    )


def policies_response() -> pb.ListPoliciesResponse:
    """describe_policies() as ListPoliciesResponse."""
    return pb.ListPoliciesResponse(policies=[
        pb.PolicyInfo(
            kind=info.kind, name=info.name, description=info.description, statistics=info.statistics,
            accumulates=info.accumulates,
            options=[pb.PolicyOption(name=o.name, default_value=o.default, description=o.description) for o in info.options],
        )
        for info in describe_policies()
    ])
