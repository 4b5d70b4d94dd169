"""Session lifecycle: negotiation and defaults at open, idempotent retries, ordering, unknown
sessions, counters at close, and state that survives serialisation (another replica)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from kvevict.cache_manager import (
    Aborted, FailedPrecondition, InMemoryStateStore, ManagerCore, NotFound, SessionState, describe_policies,
)
from kvevict.cache_manager.policies import BASE_POLICIES
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import tensor_pb2
from tests.test_manager_support import open_request, start


def test_open_answers_session_statistics_budgets_and_dtype() -> None:
    core = ManagerCore(InMemoryStateStore())
    first = core.open_session(open_request("h2o", "caote", budget=32, num_layers=4))
    second = core.open_session(open_request("h2o", "caote", budget=32, num_layers=4))
    assert len(first.session_id) == 32 and first.session_id != second.session_id
    assert [(s.statistic, s.window, s.reference) for s in first.statistics] == [
        (pb.STATISTIC_ATTN_SUM, 0, 0), (pb.STATISTIC_VALUE_DEV_EXCLUDED, 0, pb.REFERENCE_ACCUMULATED_ATTENTION)]
    assert first.report_every_block
    assert list(first.layer_budgets) == [32] * 4
    assert first.statistics_dtype == tensor_pb2.DTYPE_UNSPECIFIED  # chosen per statistic:
    assert [s.dtype for s in first.statistics] == [tensor_pb2.DTYPE_BFLOAT16] * 2
    f32 = core.open_session(open_request("tova", budget=8, dtype=tensor_pb2.DTYPE_FLOAT32))
    assert f32.statistics_dtype == tensor_pb2.DTYPE_FLOAT32 and not f32.report_every_block
    assert [s.dtype for s in f32.statistics] == [tensor_pb2.DTYPE_FLOAT32]


@pytest.mark.parametrize("base,budget,sink,recent", [
    ("h2o", 40, 0, 20), ("h2o", 41, 0, 20), ("tova", 40, 0, 0), ("snapkv", 64, 0, 32),
    ("keydiff", 40, 0, 0), ("streaming", 40, 4, 0), ("random", 40, 0, 0),
])
def test_unset_sink_and_recent_take_the_policy_defaults(base: str, budget: int, sink: int, recent: int) -> None:
    session = start(open_request(base, budget=budget))
    settings = session.core.store.get(session.id).settings
    assert (settings.sink, settings.recent) == (sink, recent)


def test_explicit_zero_overrides_a_default() -> None:
    session = start(open_request("streaming", budget=16, sink=0, recent=0))
    settings = session.core.store.get(session.id).settings
    assert (settings.sink, settings.recent) == (0, 0)
    session.report(20)
    for positions in session.positions:  # no sinks: only the 16 newest remain
        np.testing.assert_array_equal(positions, np.broadcast_to(np.arange(4, 20), positions.shape))


def test_snapkv_window_and_kernel_shape_the_statistics() -> None:
    opened = start(open_request("snapkv", "caote", budget=64, window=16, pool_kernel=5)).opened
    assert [(s.statistic, s.window, s.reference, s.pool_kernel) for s in opened.statistics] == [
        (pb.STATISTIC_ATTN_WINDOW, 16, 0, 0), (pb.STATISTIC_VALUE_DEV_EXCLUDED, 16, pb.REFERENCE_WINDOW_ATTENTION, 5)]


def test_a_retried_sequence_returns_the_stored_answer_and_changes_nothing() -> None:
    session = start(open_request("h2o", "caote", budget=12, sink=1), seed=2)
    session.report(10)
    request, _ = session.build(8)
    answer = session.core.report_block(request)
    assert answer.keeps  # the retried decision evicts, so a recomputation would show
    session.apply(request, answer)
    before = session.state_bytes()
    again = session.core.report_block(request)
    assert again.SerializeToString() == answer.SerializeToString()
    # A "retry" with different content is refused: the decision is made once, and a forged
    # report cannot make the real one receive its decision.
    changed, _ = session.build(8)
    changed.sequence = request.sequence
    with pytest.raises(FailedPrecondition, match="^sequence: "):
        session.core.report_block(changed)
    assert session.state_bytes() == before
    assert session.report(4).sequence == 3


def test_out_of_order_sequences_are_aborted_without_changing_state() -> None:
    session = start(open_request("tova", budget=12))
    session.report(8)
    session.report(8)
    before = session.state_bytes()
    for sequence in (4, 1, 100):
        request, _ = session.build(4)
        request.sequence = sequence
        with pytest.raises(Aborted, match="^sequence: out of order"):
            session.core.report_block(request)
    assert session.state_bytes() == before
    assert session.report(4).sequence == 3


def test_unknown_sessions_are_not_found() -> None:
    session = start(open_request("tova", budget=12))
    request, _ = session.build(4)
    request.session_id = "nope"
    with pytest.raises(NotFound):
        session.core.report_block(request)
    with pytest.raises(NotFound):
        session.core.close_session(pb.CloseSessionRequest(session_id="nope"))


def test_close_returns_counters_and_forgets_the_session() -> None:
    session = start(open_request("keydiff", budget=10), seed=9)
    evicted = sum(session.report(n).evicted_tokens for n in (8, 8, 2, 5))
    assert evicted == (6 + 2 + 5) * 3 * 2  # tokens over budget x layers x KV heads
    closed = session.core.close_session(pb.CloseSessionRequest(session_id=session.id))
    assert (closed.reports, closed.evicted_tokens) == (4, evicted)
    assert len(session.core.store) == 0
    with pytest.raises(NotFound):
        session.report(1)


def test_state_survives_bytes_and_another_replica_decides_the_same() -> None:
    session = start(open_request("h2o", "fastcaote", budget=12, sink=2), seed=5)
    session.report(9)
    session.report(7)
    state = session.core.store.get(session.id)
    data = state.to_bytes()
    restored = SessionState.from_bytes(data)
    assert restored.to_bytes() == data
    assert restored.settings == state.settings and restored.layer_budgets == state.layer_budgets
    for mine, theirs in zip(state.positions + state.accumulators, restored.positions + restored.accumulators):
        np.testing.assert_array_equal(mine, theirs)
        assert mine.dtype == theirs.dtype
    # 16 + 9 tokens: positions int32 + accumulators float32 per (layer, head, token), plus a header.
    assert len(data) < 3 * 2 * 12 * 8 + 1200

    replica = ManagerCore(InMemoryStateStore())
    replica.store.put(restored)
    request, _ = session.build(6)
    assert replica.report_block(request).SerializeToString() == session.core.report_block(request).SerializeToString()
    assert replica.store.get(session.id).to_bytes() == session.core.store.get(session.id).to_bytes()


@pytest.mark.parametrize("request_", [open_request("h2o", "caote", budget=12, sink=2),
                                      open_request("snapkv", budget=24, allocator="pyramid")], ids=["h2o", "snapkv"])
def test_the_stored_header_is_the_sorted_json_of_meta_settings_and_arrays(request_) -> None:
    """The encoding is unchanged by the settings' JSON being encoded once: byte for byte what
    json.dumps(sort_keys=True) of the whole header gives."""
    session = start(request_, seed=4)
    session.report(14)
    state = session.core.store.get(session.id)
    data = state.to_bytes()
    (length,) = struct.unpack_from("<I", data, 5)
    header = json.loads(data[9:9 + length])
    assert set(header) == {"arrays", "last_response", "meta", "settings"}
    assert header["settings"] == json.loads(json.dumps(state.settings.to_dict()))  # tuples as lists
    assert data[9:9 + length] == json.dumps(header, separators=(",", ":"), sort_keys=True).encode()


def test_stored_state_is_immutable() -> None:
    session = start(open_request("h2o", budget=12), seed=1)
    session.report(16)
    state = session.core.store.get(session.id)
    for array in state.positions + state.accumulators:
        with pytest.raises(ValueError):
            array[0, 0] = 1  # a state is replaced whole, never edited in place


def test_describe_policies_lists_every_component() -> None:
    infos = describe_policies()
    by_kind = {kind: [i.name for i in infos if i.kind == kind] for kind in ("base", "wrapper", "allocator")}
    assert by_kind == {"base": list(BASE_POLICIES), "wrapper": ["none", "caote", "fastcaote"], "allocator": ["uniform", "pyramid", "adaptive", "epicache", "adahead", "global", "lukv"]}
    snapkv = next(i for i in infos if i.name == "snapkv")
    assert {o.name: o.default for o in snapkv.options} == {
        "sink_tokens": "0", "recent_tokens": "min(window, budget // 2)", "window": "32", "pool_kernel": "7"}
    assert next(i for i in infos if i.name == "h2o").accumulates
