"""ManagerCore.adopt_session (the worker's fail-open): a new session tracks exactly the worker's
cached positions, continues from them as the remote session would (exactly, for policies without
accumulators), and rejects malformed positions naming the field."""

from __future__ import annotations

import numpy as np
import pytest

from kvevict import wire
from kvevict.cache_manager import InMemoryStateStore, InvalidArgument, ManagerCore
from kvevict.cache_manager.validation import MAX_POSITION
from kvevict.v1 import cache_manager_pb2 as pb
from tests.test_manager_support import Session, open_request, start


def adopted_session(request: pb.OpenSessionRequest, positions: list[np.ndarray], seed: int = 0) -> Session:
    """A Session driver continuing from `positions` on a fresh core's adopted session."""
    core = ManagerCore(InMemoryStateStore())
    opened = core.adopt_session(request, positions)
    geometry = request.geometry
    session = Session(core, opened, np.random.default_rng(seed), num_layers=geometry.num_layers, heads=geometry.num_kv_heads)
    session.positions = [np.asarray(p, np.int64) for p in positions]
    session.next_position = max(int(p.max()) for p in positions if p.size) + 1
    return session


@pytest.mark.parametrize("base,wrapper", [("tova", "caote"), ("snapkv", "fastcaote"), ("keydiff", ""), ("streaming", "")])
def test_an_adopted_session_decides_as_the_session_it_replaces(base: str, wrapper: str) -> None:
    """Policies without accumulated state: after adoption, the same reports get the same decisions."""
    request = open_request(base, wrapper, budget=12, sink=2)
    remote = start(request, seed=7)
    for new_tokens in (10, 9, 5):
        remote.report(new_tokens)
    local = adopted_session(request, [p.copy() for p in remote.positions])
    assert local.opened.statistics == remote.opened.statistics
    assert local.opened.layer_budgets == remote.opened.layer_budgets
    for new_tokens in (7, 1, 3):
        report, _ = remote.build(new_tokens)
        expected = remote.core.report_block(report)
        remote.apply(report, expected)
        mine = pb.ReportBlockRequest()
        mine.CopyFrom(report)  # the same tokens and statistics, to the adopted session
        mine.session_id, mine.sequence = local.id, local.sequence + 1  # numbering starts again at 1
        answer = local.core.report_block(mine)
        local.apply(mine, answer)
        expected.sequence = answer.sequence
        assert answer.SerializeToString() == expected.SerializeToString()
    for mine_positions, theirs in zip(local.positions, remote.positions):
        np.testing.assert_array_equal(mine_positions, theirs)


def test_adoption_tracks_the_given_positions_with_zero_accumulators() -> None:
    request = open_request("h2o", "caote", budget=12, sink=1)
    positions = [np.array([[0, 3, 7, 9], [1, 2, 8, 9]]), np.zeros((2, 0), np.int64), np.array([[5, 40], [6, 41]], np.int32)]
    core = ManagerCore(InMemoryStateStore())
    opened = core.adopt_session(request, positions)
    assert opened.report_every_block and list(opened.layer_budgets) == [12] * 3
    positions[0][0, 0] = 99  # the worker's array is copied, not aliased
    state = core.store.get(opened.session_id)
    assert state.cache_lengths == [4, 0, 2] and state.last_position == 41 and state.last_sequence == 0
    np.testing.assert_array_equal(state.positions[0], [[0, 3, 7, 9], [1, 2, 8, 9]])
    assert all(a.dtype == np.float32 and not a.any() and a.shape == p.shape
               for a, p in zip(state.accumulators, state.positions))
    info = core.get_session(pb.GetSessionRequest(session_id=opened.session_id))
    assert (info.reports, list(info.cache_lengths)) == (0, [4, 0, 2])

    session = Session(core, opened, np.random.default_rng(0))
    session.positions = [state.positions[i].astype(np.int64) for i in range(3)]
    session.next_position = 42
    answer = session.report(11)  # layer 0: 4 + 11 > 12 evicts; layer 1: 0 + 11 keeps all
    assert [k.layer for k in answer.keeps] == [0, 2] and answer.sequence == 1
    early, _ = session.build(2)
    early.positions.CopyFrom(wire.encode(np.array([41, 60])))
    with pytest.raises(InvalidArgument, match="^positions: "):
        core.report_block(early)


BAD_POSITIONS = {
    "too few layers": (lambda p: p[:2], "positions"),
    "float positions": (lambda p: [p[0].astype(np.float32), *p[1:]], "positions[0].dtype"),
    "1-D layer": (lambda p: [p[0], p[1][0], p[2]], "positions[1].shape"),
    "wrong head count": (lambda p: [p[0], p[1], np.vstack([p[2], p[2]])], "positions[2].shape"),
    "negative position": (lambda p: [p[0] - 5, *p[1:]], "positions[0]"),
    "position too large": (lambda p: [p[0], p[1] + MAX_POSITION, p[2]], "positions[1]"),
    "not in cache order": (lambda p: [p[0], p[1][:, ::-1], p[2]], "positions[1]"),
    "repeated position": (lambda p: [p[0], p[1], np.array([[1, 1, 2], [1, 2, 3]])], "positions[2]"),
}


@pytest.mark.parametrize("case", BAD_POSITIONS)
def test_malformed_positions_are_invalid_argument_naming_the_field(case: str) -> None:
    mutate, field = BAD_POSITIONS[case]
    good = [np.tile(np.arange(0, 8, 2), (2, 1)), np.tile(np.arange(1, 9, 2), (2, 1)), np.tile(np.arange(3), (2, 1))]
    core = ManagerCore(InMemoryStateStore())
    with pytest.raises(InvalidArgument) as raised:
        core.adopt_session(open_request("h2o", budget=12), mutate(good))
    assert raised.value.field == field, str(raised.value)
    assert len(core.store) == 0
    core.adopt_session(open_request("h2o", budget=12), good)
    assert len(core.store) == 1


def test_a_bad_open_request_is_rejected_before_the_positions() -> None:
    core = ManagerCore(InMemoryStateStore())
    with pytest.raises(InvalidArgument) as raised:
        core.adopt_session(open_request("lru", budget=12), [])
    assert raised.value.field == "policy.base"
