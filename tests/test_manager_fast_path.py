"""The batched fast path decides exactly as the per-layer path did (tests/manager_reference.py):
the same answer bytes (keep masks, budgets, counts), the same next state byte for byte, the same
evicted CAOTE errors, on random reports of several shapes for every base x wrapper x allocator and
every statistics encoding, on data built to hit its exact fallbacks (ties, a token holding all
the weight, rows of zeros, -0.0, subnormals), and the same InvalidArgument, naming the same field,
for NaN, infinities and out-of-range statistics. Every test runs twice: with the compiled kernels
(kvevict.cache_manager.kernels: the fused decision where the policy has one, the kernels inside
the numpy path elsewhere) and with the numpy path alone (the kernels disabled)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kvevict import wire
from kvevict.cache_manager import InvalidArgument, kernels
from kvevict.cache_manager.batch import decode_statistic
from kvevict.cache_manager.budgets import ALLOCATORS
from kvevict.cache_manager.policies import BASE_POLICIES
from kvevict.cache_manager.request_digest import report_digest
from kvevict.cache_manager.transitions import report_step
from kvevict.cache_manager.wrappers import WRAPPERS
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import tensor_pb2
from tests.manager_reference import reference_report
from tests.test_manager_support import on_the_wire, open_request, random_statistic, start

DTYPES = {"f16": tensor_pb2.DTYPE_FLOAT16, "bf16": tensor_pb2.DTYPE_BFLOAT16, "f32": tensor_pb2.DTYPE_FLOAT32,
          "default": tensor_pb2.DTYPE_UNSPECIFIED}
OPTIONS = {"snapkv": dict(window=4, pool_kernel=3), "random": dict(seed=7)}


def _accepted(base: str, wrapper: str) -> bool:
    """False where the manager refuses the pair at OpenSession (CAOTE over the output-aware
    window policies, which score output errors themselves)."""
    try:
        WRAPPERS[wrapper](BASE_POLICIES[base]()).required_statistics()
    except InvalidArgument:
        return False
    return True


def _combinations():
    for base in BASE_POLICIES:
        for wrapper in WRAPPERS:
            if not _accepted(base, wrapper):
                continue
            for allocator in ALLOCATORS:
                if ALLOCATORS[allocator].wrappers is None or wrapper in ALLOCATORS[allocator].wrappers:
                    yield base, wrapper, allocator


COMBINATIONS = list(_combinations())


@pytest.fixture(autouse=True, params=["kernels", "numpy"])
def decision_path(request, monkeypatch):
    """Each test with the compiled kernels, then with the numpy path alone."""
    if request.param == "kernels" and not kernels.enabled:
        pytest.skip("numba is not installed (or KVEVICT_KERNELS=0)")
    monkeypatch.setattr(kernels, "enabled", request.param == "kernels")
    return request.param


def assert_same_decision(session, request: pb.ReportBlockRequest) -> pb.ReportBlockResponse:
    """The product's step and the reference on the stored state: same answer, same next state."""
    stored = session.core.store.get(session.id)
    step = report_step(request)
    try:
        expected, expected_state, expected_errors = reference_report(request, stored)
    except InvalidArgument as error:
        with pytest.raises(InvalidArgument) as raised:
            step(stored)
        assert (raised.value.field, str(raised.value)) == (error.field, str(error))
        return None
    transition = step(stored)
    assert transition.result.SerializeToString() == expected.SerializeToString()
    # The product also stores the request's digest, for retries to be checked against.
    assert transition.state.to_bytes() == expected_state.evolve(last_request_digest=report_digest(request)).to_bytes()
    got_errors = step.decision.evicted_output_errors
    assert len(got_errors) == len(expected_errors)
    for got, want in zip(got_errors, expected_errors):
        assert got.shape == want.shape
        np.testing.assert_array_equal(np.sort(got, axis=-1), np.sort(want, axis=-1))
    session.core.store.put(transition.state)
    session.apply(request, transition.result)
    return transition.result


def drive(session, steps, values=None) -> int:
    """Sends reports of `steps` new tokens, each checked against the reference; counts evictions."""
    evictions = 0
    for step, new in enumerate(steps):
        phase = pb.PHASE_PREFILL if step == 0 else pb.PHASE_DECODE
        request, _ = session.build(new, phase, values)
        response = assert_same_decision(session, request)
        evictions += len(response.keeps) if response is not None else 0
    return evictions


@pytest.mark.parametrize("base,wrapper,allocator", COMBINATIONS, ids=["/".join(c) for c in COMBINATIONS])
@pytest.mark.parametrize("shape", ["small", "gqa"])
def test_random_reports_decide_as_the_reference(base: str, wrapper: str, allocator: str, shape: str) -> None:
    geometry = {"small": dict(num_layers=3, num_kv_heads=2, num_query_heads=4),
                "gqa": dict(num_layers=5, num_kv_heads=4, num_query_heads=16)}[shape]
    budget = {"small": 24, "gqa": 40}[shape]
    dtype = list(DTYPES.values())[(len(base) + len(wrapper) + len(allocator) + len(shape)) % len(DTYPES)]
    seed = hash((base, wrapper, allocator, shape)) % 2**32
    session = start(open_request(base, wrapper, budget, sink=2, recent=5, dtype=dtype, allocator=allocator,
                                 **OPTIONS.get(base, {}), **geometry), seed=seed)
    evictions = drive(session, [budget + 9, 8, 8, 3, 1, 16, 8])
    assert evictions > 0


@pytest.mark.parametrize("base", ["h2o", "snapkv", "tova"])
def test_caches_shorter_than_their_protected_tokens_decide_as_the_reference(base: str) -> None:
    """First reports of fewer tokens than sink 2 + recent 5, under budgets that depend on the
    scores (the totals pass once sized its output by a negative width and failed), then
    enough to evict."""
    session = start(open_request(base, "caote", 16, sink=2, recent=5, allocator="adaptive", **OPTIONS.get(base, {}),
                                 num_layers=3, num_kv_heads=2, num_query_heads=4), seed=9)
    assert drive(session, [1, 1, 4, 30, 8, 1, 8]) > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("base,wrapper,allocator", [
    ("h2o", "caote", "uniform"), ("h2o", "caote", "adaptive"), ("snapkv", "caote", "adaptive"),
    ("tova", "caote", "pyramid"), ("tova", "none", "uniform"), ("h2o", "fastcaote", "adaptive"),
    ("keydiff", "caote", "adaptive"), ("streaming", "caote", "uniform"),
])
def test_a_llama_shaped_layer_stack_decides_as_the_reference(base: str, wrapper: str, allocator: str, dtype: str) -> None:
    """Long rows (the float32 keys' partition, the adaptive band) and equal layers grouped."""
    session = start(open_request(base, wrapper, 512, sink=4, recent=32, dtype=DTYPES[dtype], allocator=allocator,
                                 block_size=64, **OPTIONS.get(base, {}), num_layers=6, num_kv_heads=8,
                                 num_query_heads=32), seed=len(dtype) + len(base))
    assert drive(session, [512, 64, 64, 64, 17]) > 0


def _adversarial(kind: str, rng: np.random.Generator):
    """Statistics that send the fast path to its exact fallbacks."""
    def values(layer, requirement, shape):
        plain = random_statistic(rng, requirement.statistic, shape)
        if requirement.statistic == pb.STATISTIC_KEY_COSINE:
            return np.round(plain * 2) / 2 if kind == "ties" else plain
        if kind == "ties":  # few distinct values: ties at every threshold
            return rng.integers(0, 3, shape).astype(np.float64)
        if kind == "zeros":  # whole rows of zeros, and zero deviations
            out = plain.copy()
            out[layer % shape[0]] = 0.0
            return out
        if kind == "sink":  # one token holds all the weight (or all but a trace)
            out = np.zeros(shape)
            out[:, 0] = 1.0
            out[:, 1:] = 1e-30 if layer % 2 else 0.0
            return out if requirement.statistic in (pb.STATISTIC_ATTN_SUM, pb.STATISTIC_ATTN_WINDOW) else plain * (layer % 2)
        if kind == "negative zero":
            out = plain.copy()
            out[:, 1::3] = -0.0
            return out
        if kind == "subnormal":  # float16 subnormals and bfloat16's tiny range
            return plain * 10.0 ** rng.uniform(-9, -4, shape)
        if kind == "huge":
            return plain * 10.0 ** rng.uniform(0, 4, shape)
        raise AssertionError(kind)
    return values


@pytest.mark.parametrize("kind", ["ties", "zeros", "sink", "negative zero", "subnormal", "huge"])
@pytest.mark.parametrize("dtype", ["f16", "bf16", "f32"])
@pytest.mark.parametrize("base,wrapper,allocator", [
    ("h2o", "caote", "uniform"), ("h2o", "caote", "adaptive"), ("tova", "caote", "adaptive"),
    ("snapkv", "none", "uniform"), ("tova", "none", "pyramid"), ("snapkv", "fastcaote", "adaptive"),
    ("keydiff", "none", "uniform"), ("random", "caote", "adaptive"),
])
def test_degenerate_statistics_decide_as_the_reference(base: str, wrapper: str, allocator: str, dtype: str,
                                                        kind: str) -> None:
    rng = np.random.default_rng(len(kind) * 31 + len(dtype))
    session = start(open_request(base, wrapper, 24, sink=2, recent=3, dtype=DTYPES[dtype], allocator=allocator,
                                 **OPTIONS.get(base, {}), num_layers=4, num_kv_heads=2, num_query_heads=4), seed=3)
    values = _adversarial(kind, rng)
    drive(session, [33, 8, 8, 1, 8], values)


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize("signed", [False, True])
def test_the_bulk_decode_is_numpys_cast_bit_for_bit(dtype: str, signed: bool) -> None:
    """Every 16-bit pattern the bulk check accepts decodes exactly as numpy's cast; the ones it
    leaves to the exact path (NaN, infinities, negatives where none may be, -0.0) are refused."""
    bits = np.arange(2**16, dtype=np.uint16)
    if dtype == "f16":
        exact = bits.view(np.float16).astype(np.float32)
    else:
        exact = (bits.astype(np.uint32) << 16).view(np.float32)
    valid = np.isfinite(exact) & ((exact >= 0) & (bits < 0x8000) if not signed else True)
    decoded = decode_statistic(bits[valid].tobytes(), DTYPES[dtype], non_negative=not signed)
    assert decoded is not None and decoded.flags.writeable
    np.testing.assert_array_equal(decoded.view(np.uint32), exact[valid].view(np.uint32))
    for pattern in np.flatnonzero(~valid):
        assert decode_statistic(bits[[0, pattern, 1]].tobytes(), DTYPES[dtype], non_negative=not signed) is None


# --- malformed statistics: INVALID_ARGUMENT naming the field, the first one in layer order ----


def _report_with(session, poke):
    request, _ = session.build(4)
    for layer, k, row, column, value in poke:
        tensor = request.layers[layer].values[k]
        array = wire.decode(tensor, "x").astype(np.float32) if tensor.dtype != tensor_pb2.DTYPE_FLOAT16 else \
            wire.decode(tensor, "x").copy()
        array[row, column] = value
        replacement, _ = on_the_wire(array, tensor.dtype)
        tensor.CopyFrom(replacement)
    return request


BAD_VALUES = {
    "NaN": [(1, 0, 1, 3, np.nan)],
    "+Inf": [(0, 1, 0, 0, np.inf)],
    "-Inf": [(2, 1, 1, 5, -np.inf)],
    "negative attention": [(2, 0, 0, 7, -0.5)],
    "negative deviation": [(1, 1, 1, 2, -1.0)],
    "tiny negative": [(0, 0, 0, 9, -1e-7)],
    "two faults, the first layer wins": [(2, 0, 0, 1, np.nan), (1, 1, 1, 1, -2.0)],
    "NaN before a later shape error": [(0, 1, 1, 1, np.nan)],
}


@pytest.mark.parametrize("dtype", ["f16", "bf16", "f32"])
@pytest.mark.parametrize("case", BAD_VALUES)
def test_bad_statistics_are_invalid_argument_naming_the_field(case: str, dtype: str) -> None:
    session = start(open_request("h2o", "caote", budget=12, sink=1, dtype=DTYPES[dtype]), seed=5)
    session.report(10)
    session.report(10)
    request = _report_with(session, BAD_VALUES[case])
    if case == "NaN before a later shape error":
        request.layers[2].values[0].data = request.layers[2].values[0].data[:-2]
    expected_field = f"layers[{BAD_VALUES[case][-1][0] if case.startswith('two') else BAD_VALUES[case][0][0]}]"
    expected_field += f".values[{BAD_VALUES[case][-1][1] if case.startswith('two') else BAD_VALUES[case][0][1]}]"
    before = session.state_bytes()
    with pytest.raises(InvalidArgument) as raised:
        session.core.report_block(request)
    assert raised.value.field == expected_field, str(raised.value)
    assert str(raised.value).startswith(f"{expected_field}: ")
    reason = "holds NaN or Inf" if ("Inf" in case or "NaN" in case) else "must be non-negative"
    assert reason in str(raised.value)
    assert session.state_bytes() == before
    assert_same_decision(session, request)  # the reference raises the very same error


def test_signed_cosines_may_be_negative_but_not_infinite() -> None:
    session = start(open_request("keydiff", "caote", budget=12, sink=1, dtype=tensor_pb2.DTYPE_FLOAT16), seed=2)
    session.report(10)
    request = _report_with(session, [(1, 0, 0, 2, -1.0)])
    assert_same_decision(session, request)
    request = _report_with(session, [(2, 0, 1, 1, -np.inf)])
    with pytest.raises(InvalidArgument) as raised:
        session.core.report_block(request)
    assert raised.value.field == "layers[2].values[0]" and "NaN or Inf" in str(raised.value)


def test_the_adaptive_band_is_exercised() -> None:
    """Adaptive sessions of the benchmark's shape reach the band logic (not only the fallback):
    the allocation answers without computing every layer's exact scores."""
    from kvevict.cache_manager.budgets import Adaptive
    from kvevict.cache_manager.selection import Ranking
    from kvevict.cache_manager.batch import Layout

    rng = np.random.default_rng(0)
    heads, lengths = 8, (600, 700, 650, 620)
    layout = Layout(heads, lengths)
    scores = rng.random(layout.size) ** 4
    computed = []

    def exact(layer):
        computed.append(layer)
        return layout.layer(scores, layer)

    keys = scores.astype(np.float32)
    ranking = Ranking(layout, exact, keys, approximate=lambda: keys, approx_error=2.0**-24)
    allocator = Adaptive(512, sink=4, recent=32)
    budgets = allocator.allocate_flat([512] * 4, list(lengths), ranking)
    assert len(set(computed)) < len(lengths), "every layer's exact scores were computed"
    assert budgets == allocator.allocate([512] * 4, list(lengths), layout.layers(scores))
    assert sum(budgets) == 4 * 512 and min(budgets) >= math.ceil(512 / 4)


@pytest.mark.parametrize("dtype", ["bf16", "f32"])
@pytest.mark.parametrize("base,allocator", [("tova", "uniform"), ("h2o", "uniform"), ("tova", "adaptive")])
def test_a_token_with_all_the_weight_and_no_deviation_is_kept(base: str, allocator: str, dtype: str) -> None:
    """CAOTE scores a token holding all but 1e-20 of the weight +inf (1 - a rounds to 0), even
    with a zero deviation; its float32 key (weight x deviation = 0) would evict it: the row guard
    sends such layers to the exact scores."""
    def values(layer, requirement, shape):
        if requirement.statistic in (pb.STATISTIC_ATTN_SUM, pb.STATISTIC_ATTN_WINDOW):
            out = np.full(shape, 1e-20)
            out[:, 5] = 1.0
            return out
        out = np.random.default_rng(layer).uniform(0.5, 1.0, shape)
        out[:, 5] = 0.0
        return out

    session = start(open_request(base, "caote", 24, sink=2, recent=3, dtype=DTYPES[dtype], allocator=allocator,
                                 num_layers=3, num_kv_heads=2, num_query_heads=4), seed=1)
    drive(session, [33], values)
    assert all((session.positions[layer] == 5).any(axis=-1).all() for layer in range(3)), "the full token was evicted"
    drive(session, [8, 8], values)


def test_keys_within_the_slack_of_the_threshold_defer_to_the_exact_scores() -> None:
    """Keys that order two tokens one way by less than `slack` ulps while the exact scores order
    them the other way: the row is selected on the exact scores."""
    from kvevict.cache_manager.batch import Layout
    from kvevict.cache_manager.selection import Ranking, select_keep, select_keep_flat

    layout = Layout(1, (6,))
    exact = np.array([5.0, 1.0, 2.0, 2.0 + 1e-9, 3.0, 4.0])  # token 2 below token 3
    keys = exact.astype(np.float32)
    keys[2] = np.nextafter(keys[3], np.float32(np.inf))  # keys: token 2 one ulp above token 3
    ranking = Ranking(layout, lambda layer: exact[None, :], keys, slack=8)
    keep = select_keep_flat(ranking, [4], sink=0, recent=0)
    np.testing.assert_array_equal(keep, select_keep(exact[None, :], 4, 0, 0)[0])
    assert keep.tolist() == [True, False, False, True, True, True]
    # With no slack the keys' order would have been taken as the scores'.
    trusting = select_keep_flat(Ranking(layout, lambda layer: exact[None, :], keys, slack=0), [4], 0, 0)
    assert trusting.tolist() == [True, False, True, False, True, True]
