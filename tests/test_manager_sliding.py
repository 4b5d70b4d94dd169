"""The manager's side of sliding-window layers, without a model: the tokens no later query can
see are dropped from the tracked state (reference: counted per head, brute force), a report must
send the lengths left, budgets go to visible tokens, and bad windows name the field."""

from __future__ import annotations

import numpy as np
import pytest

from kvevict import wire
from kvevict.cache_manager import InMemoryStateStore, InvalidArgument, ManagerCore, SessionState
from kvevict.v1 import cache_manager_pb2 as pb
from tests.test_manager_support import on_the_wire, open_request, random_statistic

WINDOWS = [6, 0, 9]  # sliding, full, sliding


def _open(base: str = "keydiff", wrapper: str = "", budget: int = 5, **policy) -> tuple[ManagerCore, pb.OpenSessionResponse]:
    request = open_request(base, wrapper, budget=budget, sink=policy.pop("sink", 1), recent=policy.pop("recent", 1),
                           sliding_windows=WINDOWS, **policy)
    core = ManagerCore(InMemoryStateStore())
    return core, core.open_session(request)


def _reference_drop(positions: np.ndarray, last: int, window: int) -> int:
    """Leading columns unseen by every head: per head, count positions no query after `last` sees."""
    if not window:
        return 0
    return min(sum(1 for p in row if p <= last - window + 1) for row in positions.tolist())


def _report(core: ManagerCore, opened: pb.OpenSessionResponse, sequence: int, new: np.ndarray,
            lengths: list[int], rng: np.random.Generator) -> pb.ReportBlockRequest:
    request = pb.ReportBlockRequest(session_id=opened.session_id, sequence=sequence, phase=pb.PHASE_PREFILL,
                                    positions=wire.encode(new.astype(np.int64)))
    for layer, length in enumerate(lengths):
        values = [on_the_wire(random_statistic(rng, req.statistic, (2, length)), req.dtype)[0]
                  for req in opened.statistics]
        request.layers.add(layer=layer, cache_length=length, values=values)
    return request


@pytest.mark.parametrize("base,wrapper", [("keydiff", ""), ("h2o", "caote"), ("streaming", ""), ("tova", "fastcaote")])
def test_tracked_state_drops_what_no_query_can_see_and_keeps_budgets_for_the_rest(base, wrapper):
    core, opened = _open(base, wrapper)
    rng = np.random.default_rng(3)
    tracked = [np.zeros((2, 0), np.int64) for _ in WINDOWS]
    next_position = dropped = sliding_keeps = 0
    for sequence, new_tokens in enumerate((4, 7, 3, 1, 1, 5, 2, 8), start=1):
        new = np.arange(next_position, next_position + new_tokens)
        last = int(new[-1])
        cached = [np.concatenate([t, np.broadcast_to(new, (2, new.size))], axis=1) for t in tracked]
        drops = [_reference_drop(c, last, w) for c, w in zip(cached, WINDOWS)]
        dropped += sum(drops)
        request = _report(core, opened, sequence, new, [c.shape[1] - d for c, d in zip(cached, drops)], rng)
        response = core.report_block(request)
        keeps = {keep.layer: wire.decode_bits(keep.keep, "keep") for keep in response.keeps}
        for layer, window in enumerate(WINDOWS):
            left = cached[layer][:, drops[layer]:]
            if layer in keeps:
                kept = left[keeps[layer]].reshape(2, -1)
                if window:  # tokens no query sees go before any it sees, head by head
                    sliding_keeps += 1
                    unseen = left <= last - window + 1
                    evicted_visible = (~keeps[layer] & ~unseen).any(axis=1)
                    assert not (evicted_visible & (keeps[layer] & unseen).any(axis=1)).any()
                left = kept
            tracked[layer] = left
        state = core.store.get(opened.session_id)
        for mine, theirs in zip(tracked, state.positions):
            np.testing.assert_array_equal(mine, theirs)
        assert all(length <= 5 for length in state.cache_lengths)
        assert all(p.shape[1] <= w - 1 for p, w in zip(state.positions, WINDOWS) if w)
        next_position = last + 1
    assert dropped > 0 and sliding_keeps > 0  # guard: both happened


def test_a_report_that_ignores_the_drop_is_invalid_and_names_the_layer():
    core, opened = _open()
    rng = np.random.default_rng(0)
    new = np.arange(10)  # layer 0 (window 6) can drop positions 0..4, layer 2 (window 9) 0..1
    request = _report(core, opened, 1, new, [10, 10, 10], rng)
    # Named, with the request's own numbers only: the session's tracked length stays out.
    with pytest.raises(InvalidArgument, match=r"^layers\[0\]\.cache_length: got 10, .*the 10 new ones - those out of "
                                              r"the sliding window$"):
        core.report_block(request)
    core.report_block(_report(core, opened, 1, new, [5, 10, 8], rng))  # the lengths left are accepted


def test_windows_are_kept_in_the_stored_state_and_in_get_session():
    core, opened = _open()
    state = core.store.get(opened.session_id)
    assert state.settings.geometry.sliding_windows == tuple(WINDOWS)
    assert SessionState.from_bytes(state.to_bytes()).settings.geometry.sliding_windows == tuple(WINDOWS)
    got = core.get_session(pb.GetSessionRequest(session_id=opened.session_id))
    assert list(got.geometry.sliding_windows) == WINDOWS
    plain = ManagerCore(InMemoryStateStore())
    session = plain.open_session(open_request("keydiff", budget=5))
    assert plain.store.get(session.session_id).settings.geometry.sliding_windows == (0, 0, 0)


@pytest.mark.parametrize("windows,field", [([6, 0], "geometry.sliding_windows"),
                                           ([6, 0, 2**31], r"geometry.sliding_windows\[2\]")])
def test_bad_windows_name_the_field(windows, field):
    with pytest.raises(InvalidArgument, match=field):
        ManagerCore(InMemoryStateStore()).open_session(open_request("keydiff", budget=5, sliding_windows=windows))
