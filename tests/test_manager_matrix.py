"""Every base policy x every wrapper x every statistics encoding, driven through ManagerCore: each
evicting layer keeps exactly the protected tokens plus the top tokens of a score the test
computes on its own from the statistics it sent."""

from __future__ import annotations

import numpy as np
import pytest

from kvevict.cache_manager.errors import InvalidArgument
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import tensor_pb2
from tests.test_manager_support import (
    assert_top_selection, open_request, reference_caote, reference_fast_caote, reference_max_pool, start,
)

# The output-aware window policies score output errors themselves: CAOTE over them is refused.
WINDOW_ERRORS = {"querycaote": pb.STATISTIC_QUERY_EVICT_ERROR, "obcv": pb.STATISTIC_QUERY_VALUE_ERROR,
                 "obck": pb.STATISTIC_QUERY_KEY_ERROR, "obcvk": pb.STATISTIC_QUERY_KEY_VALUE_ERROR,
                 "laprox": pb.STATISTIC_QUERY_PROJECTED_ERROR}
BASES = ["h2o", "tova", "tova-mean", "snapkv", "kvzip", "keydiff", "streaming", "random", "valuenorm", *WINDOW_ERRORS]
WRAPPERS = ["none", "caote", "fastcaote"]
BUDGET = 24
SINK = 2
OPTIONS = {"snapkv": dict(window=4, pool_kernel=3), "kvzip": dict(window=4), "random": dict(seed=7),
           **{base: dict(window=4, pool_kernel=3) for base in WINDOW_ERRORS}}
# H2O: half the budget; SnapKV and the window policies: their window.
DEFAULT_RECENT = {"h2o": BUDGET // 2, "snapkv": 4, **{base: 4 for base in WINDOW_ERRORS}}

S = pb
R = pb  # the references of value_dev_excluded
# (statistic, window, reference, pool kernel) as negotiated
BASE_STATISTICS = {
    "h2o": [(S.STATISTIC_ATTN_SUM, 0, 0, 0)],
    "tova": [(S.STATISTIC_ATTN_WINDOW, 1, 0, 0)],
    "tova-mean": [(S.STATISTIC_ATTN_WINDOW, 1, 0, 0)],
    "snapkv": [(S.STATISTIC_ATTN_WINDOW, 4, 0, 0)],
    "kvzip": [(S.STATISTIC_ATTN_WINDOW, 4, 0, 0)],
    "keydiff": [(S.STATISTIC_KEY_COSINE, 0, 0, 0)],
    "streaming": [],
    "random": [],
    "valuenorm": [(S.STATISTIC_VALUE_DEV_MEAN, 0, 0, 0)],
    **{base: [(statistic, 4, 0, 0)] for base, statistic in WINDOW_ERRORS.items()},
}
EXCLUDED = S.STATISTIC_VALUE_DEV_EXCLUDED
# Each base's own score, as the weights of CAOTE's virtual query.
CAOTE_REFERENCE = {
    "h2o": (EXCLUDED, 0, R.REFERENCE_ACCUMULATED_ATTENTION, 0),
    "tova": (EXCLUDED, 1, R.REFERENCE_WINDOW_ATTENTION, 1),
    "tova-mean": (EXCLUDED, 1, R.REFERENCE_WINDOW_ATTENTION, 1),
    "snapkv": (EXCLUDED, 4, R.REFERENCE_WINDOW_ATTENTION, 3),
    "kvzip": (EXCLUDED, 4, R.REFERENCE_WINDOW_ATTENTION, 1),
    "keydiff": (EXCLUDED, 0, R.REFERENCE_KEY_DISSIMILARITY, 0),
    "streaming": (EXCLUDED, 0, R.REFERENCE_POSITION, 0),
    "random": (EXCLUDED, 0, R.REFERENCE_UNIFORM, 0),
    "valuenorm": (EXCLUDED, 0, R.REFERENCE_VALUE_DEVIATION, 0),
}
MEAN_DEVIATION = (S.STATISTIC_VALUE_DEV_MEAN, 0, 0, 0)
# (new tokens, phase): below budget first, then over it in prefill and decode.
STEPS = [(20, pb.PHASE_PREFILL), (16, pb.PHASE_PREFILL), (4, pb.PHASE_DECODE), (4, pb.PHASE_DECODE),
         (8, pb.PHASE_DECODE), (1, pb.PHASE_DECODE), (3, pb.PHASE_DECODE)]


def expected_statistics(base: str, wrapper: str) -> list[tuple[int, int, int, int]]:
    extra = {"none": [], "caote": [CAOTE_REFERENCE.get(base)], "fastcaote": [MEAN_DEVIATION]}[wrapper]
    return BASE_STATISTICS[base] + [s for s in extra if s not in BASE_STATISTICS[base]]


def expected_scores(base, wrapper, stats, accumulated, positions, sequence, layer):
    """Score and attention-like weight of every cached token, from the definitions in METHODS.md."""
    if base == "h2o":
        score = accumulated
        attention = score
    elif base == "tova":
        score = attention = stats[(S.STATISTIC_ATTN_WINDOW, 1, 0, 0)]
    elif base == "tova-mean":  # every KV head ranks by the layer's mean over heads
        window = stats[(S.STATISTIC_ATTN_WINDOW, 1, 0, 0)]
        score = attention = np.repeat(window.mean(axis=0, keepdims=True), window.shape[0], axis=0)
    elif base == "snapkv":
        score = attention = reference_max_pool(stats[(S.STATISTIC_ATTN_WINDOW, 4, 0, 0)], 3)
    elif base == "kvzip":  # unpooled, and no window kept (DEFAULT_RECENT: 0)
        score = attention = stats[(S.STATISTIC_ATTN_WINDOW, 4, 0, 0)]
    elif base == "keydiff":
        cosine = stats[(S.STATISTIC_KEY_COSINE, 0, 0, 0)]
        score, attention = -cosine, (1.0 - cosine) / 2.0
    elif base == "streaming":
        score = positions.astype(np.float64)
        attention = score - score.min(axis=-1, keepdims=True) + 1.0
    elif base == "valuenorm":
        score = attention = stats[MEAN_DEVIATION]
    elif base in WINDOW_ERRORS:  # the window's summed per-query errors, pooled as SnapKV pools
        score = attention = reference_max_pool(stats[(WINDOW_ERRORS[base], 4, 0, 0)], 3)
    else:
        score = attention = np.random.default_rng([7, sequence, layer]).random(positions.shape)
    if wrapper == "none":
        return score
    if wrapper == "caote":
        return reference_caote(attention, stats[CAOTE_REFERENCE[base]])
    return reference_fast_caote(attention, stats[MEAN_DEVIATION])


@pytest.mark.parametrize("dtype", [tensor_pb2.DTYPE_UNSPECIFIED, tensor_pb2.DTYPE_FLOAT16, tensor_pb2.DTYPE_FLOAT32],
                         ids=["default", "f16", "f32"])
@pytest.mark.parametrize("wrapper", WRAPPERS)
@pytest.mark.parametrize("base", BASES)
def test_kept_tokens_are_protected_plus_top_scored(base: str, wrapper: str, dtype: int) -> None:
    seed = BASES.index(base) * 100 + WRAPPERS.index(wrapper) * 10 + dtype
    request = open_request(base, wrapper, BUDGET, sink=SINK, dtype=dtype, **OPTIONS.get(base, {}))
    if base in WINDOW_ERRORS and wrapper == "caote":
        with pytest.raises(InvalidArgument, match="scores output errors itself") as refused:
            start(request, seed)
        assert refused.value.field == "policy.wrapper"
        return
    session = start(request, seed)
    opened = session.opened
    negotiated = [(s.statistic, s.window, s.reference, s.pool_kernel) for s in opened.statistics]
    assert negotiated == expected_statistics(base, wrapper)
    # Unspecified: bfloat16 (float32's range) but for cosines, bounded, in float16.
    default = {S.STATISTIC_KEY_COSINE: tensor_pb2.DTYPE_FLOAT16}
    assert [s.dtype for s in opened.statistics] == [
        dtype or default.get(s.statistic, tensor_pb2.DTYPE_BFLOAT16) for s in opened.statistics]
    assert opened.report_every_block == (base == "h2o")
    assert list(opened.layer_budgets) == [BUDGET] * session.num_layers
    assert opened.statistics_dtype == dtype
    recent = DEFAULT_RECENT.get(base, 0)
    # H2O reference: attention summed per (layer, head, absolute position) over every report.
    totals = [[{} for _ in range(session.heads)] for _ in range(session.num_layers)]
    evicting_layers = 0

    for n, phase in STEPS:
        request, sent = session.build(n, phase)
        new = np.arange(session.next_position, session.next_position + n)
        cached = [np.concatenate([p, np.broadcast_to(new, (session.heads, n))], axis=1) for p in session.positions]
        response = session.core.report_block(request)
        masks = session.apply(request, response)

        assert response.sequence == request.sequence
        assert list(response.layer_budgets) == [BUDGET] * session.num_layers
        keeps = {k.layer: k for k in response.keeps}
        evicted = 0
        for layer, positions in enumerate(cached):
            stats = dict(zip(negotiated, sent[layer]))
            length = positions.shape[1]
            accumulated = None
            if base == "h2o":
                attn = stats[(S.STATISTIC_ATTN_SUM, 0, 0, 0)]
                accumulated = np.zeros(positions.shape, np.float32)
                for h in range(session.heads):
                    for j, p in enumerate(positions[h]):
                        totals[layer][h][p] = np.float32(totals[layer][h].get(p, np.float32(0)) + attn[h, j])
                        accumulated[h, j] = totals[layer][h][p]
            if length <= BUDGET:
                assert masks[layer] is None and layer not in keeps
                continue
            evicting_layers += 1
            keep = keeps[layer]
            assert (keep.cache_length, keep.kept_tokens) == (length, BUDGET)
            scores = expected_scores(base, wrapper, stats, accumulated, positions, request.sequence, layer)
            columns = np.arange(length)
            protected = (positions < SINK) | (columns >= length - recent)  # sinks = positions 0..SINK-1
            assert_top_selection(masks[layer], scores, protected, BUDGET)
            evicted += (length - BUDGET) * session.heads
        assert response.evicted_tokens == evicted
        state = session.core.store.get(session.id)
        for layer in range(session.num_layers):
            assert np.array_equal(state.positions[layer], session.positions[layer])
            assert (np.diff(session.positions[layer], axis=1) > 0).all(), "kept tokens lost their order"
    assert evicting_layers >= session.num_layers * (len(STEPS) - 1)
