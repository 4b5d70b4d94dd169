"""The compiled kernels (kvevict.cache_manager.kernels) against the numpy code they replace, on
every input shape that reaches them: every 16-bit pattern decoded and checked as numpy decodes
and checks it (with the CPU flushing subnormals too), thresholds and masks equal to a partition's
on random, tied, sorted and extreme keys on both sides (few or most tokens evicted), SnapKV's pool,
the compaction equal to boolean gathers and numpy's packbits, CAOTE's keys and row guards, and
the adaptive allocator's totals."""

from __future__ import annotations

import numpy as np
import pytest

from kvevict.cache_manager import kernels
from kvevict.cache_manager.batch import decode_statistic
from kvevict.cache_manager.policies.snapkv import max_pool
from kvevict.cache_manager.selection import select_keep
from kvevict.v1 import tensor_pb2

pytestmark = pytest.mark.skipif(not kernels.enabled, reason="numba is not installed (or KVEVICT_KERNELS=0)")

WIRE = {kernels.FLOAT16: tensor_pb2.DTYPE_FLOAT16, kernels.BFLOAT16: tensor_pb2.DTYPE_BFLOAT16,
        kernels.FLOAT32: tensor_pb2.DTYPE_FLOAT32}


def _exact(bits: np.ndarray, kind: int) -> np.ndarray:
    if kind == kernels.FLOAT16:
        return bits.view(np.float16).astype(np.float32)
    return (bits.astype(np.uint32) << 16).view(np.float32)


@pytest.mark.parametrize("kind", [kernels.FLOAT16, kernels.BFLOAT16])
@pytest.mark.parametrize("non_negative", [True, False])
def test_every_16_bit_pattern_decodes_and_checks_as_numpy(kind: int, non_negative: bool) -> None:
    bits = np.arange(2**16, dtype=np.uint16)
    exact = _exact(bits, kind)
    valid = np.isfinite(exact) & ((bits < 0x8000) if non_negative else True)
    decoded = kernels.decode(bits[valid].tobytes(), kind, non_negative)
    assert decoded is not None and decoded.flags.writeable
    np.testing.assert_array_equal(decoded.view(np.uint32), exact[valid].view(np.uint32))
    numpy_path = decode_statistic(bits[valid].tobytes(), WIRE[kind], non_negative)
    np.testing.assert_array_equal(decoded.view(np.uint32), numpy_path.view(np.uint32))
    statistic = kernels.Statistic.of([bits[valid][:1000].tobytes(), bits[valid][1000:].tobytes()], kind)
    assert statistic.check(non_negative)
    np.testing.assert_array_equal(statistic.layer(1).view(np.uint32), exact[valid][1000:].view(np.uint32))
    for pattern in np.flatnonzero(~valid)[::37]:
        refused = bits[[0, pattern, 1]].tobytes()
        assert kernels.decode(refused, kind, non_negative) is None
        assert not kernels.Statistic.of([bits[:5].tobytes(), refused], kind).check(non_negative)


def test_float32_statistics_decode_and_check_as_numpy() -> None:
    rng = np.random.default_rng(0)
    values = rng.standard_normal(1000).astype(np.float32)
    assert kernels.decode(values.tobytes(), kernels.FLOAT32, False).tobytes() == values.tobytes()
    assert kernels.decode(values.tobytes(), kernels.FLOAT32, True) is None
    positive = np.abs(values)
    assert kernels.decode(positive.tobytes(), kernels.FLOAT32, True).tobytes() == positive.tobytes()
    for bad in (np.nan, np.inf, -np.inf, -0.0):
        poked = positive.copy()
        poked[7] = bad
        assert not kernels.Statistic.of([poked.tobytes()], kernels.FLOAT32).check(True)
    assert kernels.Statistic.of([values.tobytes()], kernels.FLOAT32).check(False)


def test_float16_decodes_exactly_when_the_cpu_flushes_subnormals() -> None:
    torch = pytest.importorskip("torch")
    bits = np.arange(1, 1024, dtype=np.uint16)  # every positive float16 subnormal
    exact = bits.view(np.float16).astype(np.float32)
    torch.set_flush_denormal(True)
    try:
        decoded = kernels.decode(bits.tobytes(), kernels.FLOAT16, True)
    finally:
        torch.set_flush_denormal(False)
    np.testing.assert_array_equal(decoded.view(np.uint32), exact.view(np.uint32))


def _keys(rng: np.random.Generator, kind: str, shape: tuple[int, int]) -> np.ndarray:
    if kind == "random":
        return rng.random(shape, dtype=np.float32)
    if kind == "ties":
        return rng.integers(0, 4, shape).astype(np.float32)
    if kind == "sorted":
        return np.sort(rng.random(shape, dtype=np.float32), axis=-1)
    if kind == "reversed":
        return np.ascontiguousarray(np.sort(rng.random(shape, dtype=np.float32), axis=-1)[:, ::-1])
    if kind == "spread":  # many orders of magnitude, subnormals and zeros included
        keys = (rng.random(shape) ** 40).astype(np.float32)
        keys[:, ::17] = 0.0
        return keys
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["random", "ties", "sorted", "reversed", "spread"])
def test_thresholds_and_masks_are_a_partitions(kind: str) -> None:
    """select() writes the mask `keys >= the kth key` of each row's middle, and calls a layer clear
    exactly where the numpy path does (its neighbours more than `slack` away), whichever side of
    the row is smaller."""
    rng = np.random.default_rng(len(kind))
    for trial in range(400):
        sink, recent = int(rng.integers(0, 3)), int(rng.integers(0, 4))
        heads, n = int(rng.integers(1, 4)), int(rng.integers(sink + recent + 2, 400))
        budget = int(rng.integers(sink + recent + 1, n))
        slack = int(rng.choice([0, 8]))
        keys = _keys(rng, kind, (heads, n))
        lengths = np.array([n], np.intp)
        keep = np.ones(heads * n, bool)
        clear = kernels.select(keys.ravel(), kernels.offsets_of(lengths, heads), lengths, heads,
                               np.array([budget], np.intp), np.array([True]), sink, recent, slack, keep)
        middle = keys.view(np.uint32)[:, sink:n - recent]
        kth = middle.shape[1] - (budget - sink - recent)
        partitioned = np.partition(middle, kth, axis=-1)
        threshold = partitioned[:, kth]
        expected = partitioned[:, :kth].max(axis=-1).astype(np.int64) + slack < threshold
        if kth + 1 < middle.shape[1]:
            expected &= partitioned[:, kth + 1:].min(axis=-1) > threshold.astype(np.int64) + slack
        if slack:
            expected &= (threshold >= 0x0D800000) & (threshold < 0x72800000)
        assert bool(clear[0]) == bool(expected.all()), trial
        mask = np.ones((heads, n), bool)
        mask[:, sink:n - recent] = middle >= threshold[:, None]
        np.testing.assert_array_equal(keep.reshape(heads, n), mask)
        if expected.all():
            np.testing.assert_array_equal(mask, select_keep(keys.astype(np.float64), budget, sink, recent))


@pytest.mark.parametrize("kernel", [1, 3, 5, 7, 9])
def test_the_pool_is_snapkvs(kernel: int) -> None:
    rng = np.random.default_rng(kernel)
    for n in (1, 2, 3, 5, 8, 40, 333):
        values = rng.random((3, n), dtype=np.float32)
        lengths = np.array([n], np.intp)
        pooled = kernels.max_pool(values.ravel(), kernels.offsets_of(lengths, 3), lengths, 3, kernel)
        np.testing.assert_array_equal(pooled.reshape(3, n), max_pool(values, kernel))


def test_compaction_is_boolean_gathers_and_packbits() -> None:
    rng = np.random.default_rng(3)
    heads = 4
    tracked = np.array([0, 37, 100, 64], np.intp)
    new = np.arange(1000, 1023, dtype=np.int32)
    lengths = tracked + new.size
    budgets = np.array([23, 30, 200, 40], np.intp)  # layer 2 within its budget
    evicting = lengths > budgets
    kept = np.minimum(lengths, budgets)
    previous = [rng.integers(0, 999, (heads, t)).astype(np.int32) for t in tracked]
    accumulator = rng.random(int(lengths.sum()) * heads, dtype=np.float32)
    offsets = kernels.offsets_of(lengths, heads)
    keep = np.ones(accumulator.size, bool)
    for layer in np.flatnonzero(evicting):
        for head in range(heads):
            row = keep[offsets[layer] + head * lengths[layer]:offsets[layer] + (head + 1) * lengths[layer]]
            row[:] = False
            row[np.sort(rng.choice(lengths[layer], kept[layer], replace=False))] = True
    positions, accumulators, packed, packed_at = kernels.compact(
        keep, offsets, lengths, heads, kept, evicting, np.concatenate([p.ravel() for p in previous]), tracked, new,
        accumulator)
    at = kernels.offsets_of(kept, heads)
    for layer in range(4):
        n = lengths[layer]
        full = np.concatenate([previous[layer], np.broadcast_to(new, (heads, new.size))], axis=1)
        mask = keep[offsets[layer]:offsets[layer + 1]].reshape(heads, n)
        np.testing.assert_array_equal(positions[at[layer]:at[layer + 1]], full[mask])
        np.testing.assert_array_equal(accumulators[at[layer]:at[layer + 1]],
                                      accumulator[offsets[layer]:offsets[layer + 1]].reshape(heads, n)[mask])
        if evicting[layer]:
            assert packed[packed_at[layer]:packed_at[layer + 1]].tobytes() == \
                np.packbits(mask, axis=-1, bitorder="little").tobytes()
    keep[offsets[1]] = not keep[offsets[1]]  # a row keeping one token too many or too few
    with pytest.raises(AssertionError, match="budget"):
        kernels.compact(keep, offsets, lengths, heads, kept, evicting, np.concatenate([p.ravel() for p in previous]),
                        tracked, new, accumulator)


def test_caote_keys_sums_and_guards() -> None:
    rng = np.random.default_rng(5)
    heads, lengths = 2, np.array([50, 7], np.intp)
    attention = rng.random(int(lengths.sum()) * heads, dtype=np.float32)
    attention[50 * 2:50 * 2 + 7] = 0.0  # layer 1, head 0: a row of zeros
    attention[50:100] = 1e-30  # layer 0, head 1: one token holds all the weight
    attention[60] = 1.0
    deviation = rng.random(attention.size, dtype=np.float32)
    keys, sums, spread = kernels.caote_keys(attention, deviation, kernels.offsets_of(lengths, heads), lengths, heads)
    np.testing.assert_array_equal(keys, attention * deviation)
    rows = [attention[0:50], attention[50:100], attention[100:107], attention[107:114]]
    np.testing.assert_allclose(sums, [row.astype(np.float64).sum() for row in rows], rtol=1e-12)
    assert spread.tolist() == [True, False, False, True]


def test_head_totals_are_the_summed_estimates() -> None:
    rng = np.random.default_rng(6)
    heads, lengths, sink, recent = 3, np.array([20, 30, 25], np.intp), 2, 3
    keys = rng.random(int(lengths.sum()) * heads, dtype=np.float32)
    inverse = rng.random(lengths.size * heads, dtype=np.float32)
    competing = np.array([True, False, True])
    totals = kernels.head_totals(keys, inverse, kernels.offsets_of(lengths, heads), lengths, heads, competing,
                                 sink, recent)
    offsets = kernels.offsets_of(lengths, heads)
    expected = []
    for layer in np.flatnonzero(competing):
        n = lengths[layer]
        rows = keys[offsets[layer]:offsets[layer + 1]].reshape(heads, n) * inverse[layer * heads:(layer + 1) * heads,
                                                                                     None]
        expected.append(rows[:, sink:n - recent].sum(axis=0))
    np.testing.assert_array_equal(totals, np.concatenate(expected))


@pytest.mark.parametrize("kind", ["random", "ties", "sorted", "reversed", "constant", "organ pipe"])
def test_the_quickselect_finds_every_rank(kind: str) -> None:
    """_smallest (the selection's quickselect on compress-stores, a heap sort past 64 rounds) is
    np.partition's k-th value on inputs that defeat a median of three, at every rank."""
    rng = np.random.default_rng(len(kind))
    for size in (1, 2, 15, 16, 17, 33, 100, 1000):
        if kind == "random":
            values = rng.integers(0, 2**32, size, dtype=np.uint64).astype(np.uint32)
        elif kind == "ties":
            values = rng.integers(0, 3, size).astype(np.uint32)
        elif kind == "sorted":
            values = np.arange(size, dtype=np.uint32)
        elif kind == "reversed":
            values = np.arange(size, 0, -1).astype(np.uint32)
        elif kind == "constant":
            values = np.full(size, 7, np.uint32)
        else:
            values = np.concatenate([np.arange(size // 2), np.arange(size - size // 2, 0, -1)]).astype(np.uint32)
        expected = np.sort(values)
        first, second = np.empty(size, np.uint32), np.empty(size, np.uint32)
        for k in sorted({0, size // 3, size // 2, size - 1}):
            assert kernels._smallest(values.copy(), k, first, second) == expected[k], (size, k)


def test_the_allocators_threshold_and_band_are_numpys() -> None:
    """largest() is the partition's rank-th largest; band() counts and picks exactly what numpy's
    float64 comparisons do, bounds that are not float32 values and values at the bounds included."""
    rng = np.random.default_rng(9)
    pool = (rng.random(5000) ** 3).astype(np.float32)
    pool[::50] = pool[7]  # repeated values
    starts = np.array([0, 1000, 1003, 4000])
    for rank in (1, 17, 2500, 5000):
        assert kernels.largest(pool, rank) == float(np.partition(pool, pool.size - rank)[pool.size - rank])
    for estimate in (float(pool[7]), float(np.median(pool)), 0.3):
        for beta in (2.0**-12, 1e-3, 0.05):
            high, low = np.float64(estimate * (1 + beta)), np.float64(estimate * (1 - beta))
            above, band = kernels.band(pool, starts, low, high)
            np.testing.assert_array_equal(above, np.add.reduceat(pool > high, starts, dtype=np.int64))
            np.testing.assert_array_equal(band, np.flatnonzero((pool >= low) & ~(pool > high)))
    exact = np.float64(pool[7])
    above, band = kernels.band(pool, starts, exact, exact)  # bounds equal to values in the pool
    np.testing.assert_array_equal(band, np.flatnonzero(pool == pool[7]))


@pytest.mark.parametrize("base", ["h2o", "snapkv", "tova", "valuenorm"])
@pytest.mark.parametrize("wrapper,allocator", [("caote", "uniform"), ("caote", "adaptive"), ("none", "pyramid")])
def test_policies_with_a_kernel_source_decide_in_the_fused_kernel(base: str, wrapper: str, allocator: str,
                                                                   monkeypatch) -> None:
    """The policies the kernels can score decide without the numpy path (which is not silently
    taken), the budgets' estimates from the totals pass where budgets depend on scores; a report
    the bulk check leaves to the exact path (a -0.0) is decided by the numpy path."""
    from kvevict.cache_manager import decision
    from tests.test_manager_support import open_request, start

    taken = []
    for name in ("_decide_fused", "_decide_batched"):
        original = getattr(decision, name)
        monkeypatch.setattr(decision, name, lambda *a, _f=original, _n=name: taken.append(_n) or _f(*a))
    totals = []
    original_totals = kernels.totals
    monkeypatch.setattr(kernels, "totals", lambda *a, **k: totals.append(1) or original_totals(*a, **k))
    session = start(open_request(base, wrapper, 24, sink=2, recent=3, allocator=allocator, num_layers=3,
                                 num_kv_heads=2, num_query_heads=4, **({"window": 4, "pool_kernel": 3}
                                                                       if base == "snapkv" else {})), seed=4)
    for new in (30, 8, 8):
        session.report(new)
    assert taken == ["_decide_fused"] * 3
    assert bool(totals) == (allocator == "adaptive")

    def negative_zero(layer, requirement, shape):
        return np.where(np.arange(shape[1]) == 3, -0.0, 0.5 + np.arange(shape[1]) / 100.0) * np.ones(shape)

    session.report(8, values=negative_zero)
    assert taken[-1] == "_decide_batched"


def test_the_pairwise_sum_is_numpys_bit_for_bit() -> None:
    """_pairwise reproduces numpy's float64 sum of a row (the sum caote_scores normalises by), on
    rows of every length class and magnitudes that make the order of additions show."""
    rng = np.random.default_rng(10)
    for n in list(range(1, 300)) + [1000, 4095, 4096, 4224, 8191, 20000]:
        rows = (rng.random((3, n)) * 10.0 ** rng.integers(-12, 12, (3, n))).astype(np.float32).astype(np.float64)
        expected = rows.sum(axis=-1, keepdims=True)[:, 0]
        got = np.array([kernels._pairwise(row, n) for row in rows])
        np.testing.assert_array_equal(got.view(np.uint64), expected.view(np.uint64), err_msg=f"length {n}")


@pytest.mark.parametrize("source,kind", [("h2o", kernels.FLOAT16), ("snapkv", kernels.BFLOAT16),
                                         ("tova", kernels.FLOAT32)])
def test_exact_totals_are_the_exact_scores_summed(source: str, kind: int) -> None:
    """exact_totals() at a few columns equals wrappers.caote_totals and the full exact scores'
    head sums (what the adaptive allocator ranks), rows of zeros and a token holding all the
    weight included."""
    from kvevict.cache_manager.wrappers import caote_scores, caote_totals

    rng = np.random.default_rng(len(source))
    heads, lengths, tracked = 3, np.array([40, 25, 33], np.intp), np.array([30, 15, 23], np.intp)
    scoring = {"h2o": kernels.Scoring(kernels.SOURCE_ACCUMULATED, 1, kernels.KEYS_CAOTE, 8),
               "snapkv": kernels.Scoring(kernels.SOURCE_POOLED, 3, kernels.KEYS_CAOTE, 8),
               "tova": kernels.Scoring(kernels.SOURCE_PLAIN, 1, kernels.KEYS_CAOTE, 8)}[source]
    encode = {kernels.FLOAT16: lambda x: x.astype(np.float16).tobytes(),
              kernels.BFLOAT16: lambda x: (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes(),
              kernels.FLOAT32: lambda x: x.astype(np.float32).tobytes()}[kind]
    attention = [rng.random((heads, n)) for n in lengths]
    attention[1][0] = 0.0  # a row of zeros
    attention[2][1] = 1e-30  # a token with (nearly) all the weight
    attention[2][1, 7] = 1.0
    deviation = [rng.random((heads, n)) for n in lengths]
    score = kernels.Statistic.of([encode(a) for a in attention], kind)
    dev = kernels.Statistic.of([encode(d) for d in deviation], kind)
    previous = (rng.random(int((tracked * heads).sum())) * 5).astype(np.float32)
    layers = np.array([0, 0, 1, 2, 2, 2], np.intp)
    columns = np.array([3, 17, 0, 7, 8, 30], np.intp)
    got = kernels.exact_totals(scoring, score, dev, heads, lengths, tracked,
                               previous if source == "h2o" else None, layers, columns)
    for layer in range(3):
        rows = kernels.prepare(scoring, score, dev, heads, lengths, tracked,
                               previous if source == "h2o" else None, range(layer, layer + 1))[0]
        rows = rows.reshape(heads, lengths[layer])
        devs = dev.layer(layer).reshape(heads, lengths[layer])
        mine = layers == layer
        np.testing.assert_array_equal(got[mine], caote_totals(rows, devs, columns[mine]))
        np.testing.assert_array_equal(got[mine], caote_scores(rows, devs).sum(axis=0)[columns[mine]])


def test_recycled_buffers_are_handed_out_again_only_once_nothing_refers_to_them() -> None:
    pool = kernels.Recycled(per_size=2, sizes=2)
    first = pool.empty(1000, np.int32)
    view = first[10:20]
    first.flags.writeable = False
    del first
    second = pool.empty(1000, np.int32)
    assert not np.shares_memory(second, view), "a buffer a view still refers to was handed out"
    address = second.ctypes.data
    del second
    again = pool.empty(1000, np.int32)
    assert again.ctypes.data == address and again.flags.writeable  # free: reused, writable again
    other = pool.empty(1000, np.float32)
    assert other.dtype == np.float32 and other.ctypes.data != address
    for size in (1, 2, 3):  # older sizes are forgotten, never more than `sizes` kept
        pool.empty(size, np.int8)
    assert len(pool._buffers) == 2
