"""Compiled kernels (numba) for the decision's hot path, each equal to the numpy code it
replaces, bit for bit.

A Llama-3.1-8B-shaped report holds 2 x 1.08 M statistics; numpy spends most of a decision on
temporaries and passes over them. The fused decision (`fused`) instead takes each layer once,
its rows in cache while they are used: per row, the statistics decoded from the wire's bytes
where protobuf keeps them (float16 by the CPU's exact conversion, bfloat16, float32), the score
(as decoded, accumulated with H2O's previous accumulators, or max-pooled as SnapKV), CAOTE's
float32 keys with the row's float64 sum and guard, the threshold (`_around`) and keep mask, then
the kept positions and accumulators compacted in cache order and the mask bit-packed. A layer
it cannot decide from its keys (a token holding nearly all of a row's weight, a threshold
within the keys' slack of a neighbour) is left to the caller's exact scores (`Decided.status`).
Where budgets depend on every layer's scores (adaptive), `totals` first gives the allocator
its estimates in a pass that keeps nothing but them (the fused pass recomputes the rows), and
`largest` / `band` its threshold and band. Validation checks the raw bytes (`Statistic.check`).
The numpy path of policies without a kernel source uses the single steps: `decode`,
`accumulate`, `max_pool`, `caote_keys`, `select`, `compact`, `head_totals`.

Every float operation that feeds a decision is the one numpy performs (no fast-math, no
contraction), so it gives the same bits. The only exception is each row's attention sum: a
guard compared with a margin, and a scale of the adaptive allocator's estimates, whose error
bounds (wrappers.caote_ranking) hold for a float64 sum in any order. Index expressions are loop
counters over slices (never `i + offset`, which numba must check for wrap-around): that is what
lets LLVM vectorise the loops. LLVM intrinsics do what numba cannot express: the float16
conversion, bit casts and unaligned loads, and compress-stores of the 16 lanes a mask or a
comparison selects (AVX-512's vpcompressd; LLVM expands it on other CPUs) with their population
count: the selection's filters and quickselect, and the compaction.

The dispatchers are compiled for explicit signatures when this module is imported (the
manager's start-up: ~20 s the first time on a machine, then ~0.6 s from numba's on-disk cache:
NUMBA_CACHE_DIR, else __pycache__ or the user's cache); none compiles on a report. `nogil` lets
decisions of different sessions run in parallel threads. `enabled` is False when numba is
missing or KVEVICT_KERNELS=0 (then not even imported): the manager runs the numpy path, which
tests/test_manager_fast_path.py holds to the same reference as the kernels.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

numba = None
if os.environ.get("KVEVICT_KERNELS", "1") != "0":  # 0: not even imported (nor compiled)
    try:
        import numba
        from llvmlite import ir
        from numba import types
        from numba.core import cgutils
        from numba.extending import intrinsic
    except ImportError:  # pragma: no cover - numba is a dependency; the numpy path stays correct
        numba = None

enabled: bool = numba is not None

# Wire encodings `decode` reads.
FLOAT16, BFLOAT16, FLOAT32 = 0, 1, 2
# What a fused decision scores a row by: a statistic as decoded, accumulated over reports (H2O)
# or max-pooled along tokens (SnapKV); and what it ranks: those scores, or CAOTE's keys.
SOURCE_PLAIN, SOURCE_ACCUMULATED, SOURCE_POOLED = 0, 1, 2
KEYS_SCORE, KEYS_CAOTE = 0, 1

# selection._SMALLEST_KEY_BITS and _LARGEST_KEY_BITS: keys whose `slack` ulps bound their error.
_SMALLEST_KEY, _LARGEST_KEY = 0x0D800000, 0x72800000

if numba is not None:
    _JIT = dict(nogil=True, cache=True, boundscheck=False, error_model="numpy")

    # --- LLVM intrinsics --------------------------------------------------------------------

    _I32 = ir.IntType(32)
    _LANES = ir.VectorType(_I32, 16)

    def _splat(builder, value):
        vector = builder.insert_element(ir.Constant(_LANES, ir.Undefined), value, ir.Constant(_I32, 0))
        return builder.shuffle_vector(vector, vector, ir.Constant(_LANES, None))

    def _compress_store(builder, value, destination, lanes):
        kind = ir.FunctionType(ir.VoidType(), [_LANES, _I32.as_pointer(), lanes.type])
        store = cgutils.get_or_insert_function(builder.module, kind, "llvm.masked.compressstore.v16i32")
        builder.call(store, [value, builder.inttoptr(destination, _I32.as_pointer()), lanes])

    def _popcount(builder, lanes):
        i16 = ir.IntType(16)
        count = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i16, [i16]), "llvm.ctpop.i16")
        return builder.zext(builder.call(count, [builder.bitcast(lanes, i16)]), ir.IntType(64))

    @intrinsic
    def _pointer(typingctx, address):
        """An integer address as a void pointer (for numba.carray)."""
        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], cgutils.voidptr_t)
        return types.voidptr(types.intp), codegen

    @intrinsic
    def _half_to_float(typingctx, bits):
        """float16 bits -> float32, exactly (F16C's vcvtph2ps where the CPU has it)."""
        def codegen(context, builder, signature, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
        return types.float32(types.uint16), codegen

    @intrinsic
    def _bits_to_float(typingctx, bits):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.FloatType())
        return types.float32(types.uint32), codegen

    @intrinsic
    def _load_u64(typingctx, address):
        """The 8 bytes at `address` (any alignment) as a little-endian uint64."""
        def codegen(context, builder, signature, args):
            i64 = ir.IntType(64)
            return builder.load(builder.inttoptr(args[0], i64.as_pointer()), align=1)
        return types.uint64(types.intp), codegen

    @intrinsic
    def _filter16(typingctx, source, destination, pivot, flip):
        """The 16 uint32 at `source`, each xor `flip`, that are <= `pivot`, stored one after
        the other at `destination`; returns how many."""
        def codegen(context, builder, signature, args):
            source, destination, pivot, flip = args
            value = builder.xor(builder.load(builder.inttoptr(source, _LANES.as_pointer()), align=4),
                                _splat(builder, flip))
            lanes = builder.icmp_unsigned("<=", value, _splat(builder, pivot))
            _compress_store(builder, value, destination, lanes)
            return _popcount(builder, lanes)
        return types.intp(types.intp, types.intp, types.uint32, types.uint32), codegen

    @intrinsic
    def _above16(typingctx, source, destination, bound):
        """The 16 uint32 at `source` that are > `bound`, stored one after the other at
        `destination`; returns how many."""
        def codegen(context, builder, signature, args):
            source, destination, bound = args
            value = builder.load(builder.inttoptr(source, _LANES.as_pointer()), align=4)
            lanes = builder.icmp_unsigned(">", value, _splat(builder, bound))
            _compress_store(builder, value, destination, lanes)
            return _popcount(builder, lanes)
        return types.intp(types.intp, types.intp, types.uint32), codegen

    @intrinsic
    def _inside16(typingctx, source, low, width):
        """Bit i set where the i-th of the 16 uint32 at `source` lies in [low, low + width]."""
        def codegen(context, builder, signature, args):
            source, low, width = args
            value = builder.load(builder.inttoptr(source, _LANES.as_pointer()), align=4)
            lanes = builder.icmp_unsigned("<=", builder.sub(value, _splat(builder, low)), _splat(builder, width))
            return builder.zext(builder.bitcast(lanes, ir.IntType(16)), ir.IntType(64))
        return types.uint64(types.intp, types.uint32, types.uint32), codegen

    @intrinsic
    def _compress16(typingctx, source, destination, mask):
        """The 32-bit elements of the 16 at `source` whose bit is set in `mask` (bit i: element
        i), stored one after the other at `destination`; returns how many."""
        def codegen(context, builder, signature, args):
            source, destination, mask = args
            value = builder.load(builder.inttoptr(source, _LANES.as_pointer()), align=4)
            lanes = builder.bitcast(builder.trunc(mask, ir.IntType(16)), ir.VectorType(ir.IntType(1), 16))
            _compress_store(builder, value, destination, lanes)
            return _popcount(builder, lanes)
        return types.intp(types.intp, types.intp, types.uint64), codegen

    def _array(dtype, readonly: bool = False):
        return types.Array(dtype, 1, "C", readonly=readonly)

    _READ_BITS16, _READ_BITS32 = _array(types.uint16, True), _array(types.uint32, True)
    _READ_FLOATS, _READ_INTS = _array(types.float32, True), _array(types.int32, True)
    _FLOATS, _DOUBLES, _INTS = _array(types.float32), _array(types.float64), _array(types.int32)
    _BYTES, _FLAGS, _INDEX = _array(types.uint8), _array(types.boolean), _array(types.intp)
    _INT, _BOOL = types.int64, types.boolean

    # --- decode -----------------------------------------------------------------------------

    @numba.njit(_BOOL(_READ_BITS16, _BOOL, _FLOATS), **_JIT)
    def _decode_half(source, non_negative, out):
        worst = np.uint16(0)
        if non_negative:  # valid: every pattern below infinity's (a set sign bit is above it)
            for i in range(source.size):
                bits = source[i]
                worst = max(worst, bits)
                out[i] = _half_to_float(bits)
        else:
            for i in range(source.size):
                bits = source[i]
                worst = max(worst, np.uint16(bits & np.uint16(0x7FFF)))
                out[i] = _half_to_float(bits)
        return worst < 0x7C00

    @numba.njit(_BOOL(_READ_BITS16, _BOOL, _FLOATS), **_JIT)
    def _decode_bfloat(source, non_negative, out):
        worst = np.uint16(0)
        if non_negative:
            for i in range(source.size):
                bits = source[i]
                worst = max(worst, bits)
                out[i] = _bits_to_float(np.uint32(np.uint32(bits) << np.uint32(16)))
        else:
            for i in range(source.size):
                bits = source[i]
                worst = max(worst, np.uint16(bits & np.uint16(0x7FFF)))
                out[i] = _bits_to_float(np.uint32(np.uint32(bits) << np.uint32(16)))
        return worst < 0x7F80

    @numba.njit(_BOOL(_READ_BITS32, _BOOL, _FLOATS), **_JIT)
    def _decode_single(source, non_negative, out):
        worst = np.uint32(0)
        if non_negative:
            for i in range(source.size):
                bits = source[i]
                worst = max(worst, bits)
                out[i] = _bits_to_float(bits)
        else:
            for i in range(source.size):
                bits = source[i]
                worst = max(worst, np.uint32(bits & np.uint32(0x7FFFFFFF)))
                out[i] = _bits_to_float(bits)
        return worst < 0x7F800000

    @numba.njit(_BOOL(_INDEX, _INDEX, _INT, _BOOL), **_JIT)
    def _check(addresses, sizes, kind, non_negative):
        """Every tensor's values finite (and >= +0.0 where `non_negative`): the decoders' test,
        without the decoding."""
        worst = np.uint32(0)
        for t in range(addresses.size):
            n = sizes[t]
            if kind == FLOAT32:
                source = numba.carray(_pointer(addresses[t]), (n,), np.uint32)
                if non_negative:
                    for i in range(n):
                        worst = max(worst, source[i])
                else:
                    for i in range(n):
                        worst = max(worst, np.uint32(source[i] & np.uint32(0x7FFFFFFF)))
            else:
                source16 = numba.carray(_pointer(addresses[t]), (n,), np.uint16)
                least = np.uint16(0)
                if non_negative:
                    for i in range(n):
                        least = max(least, source16[i])
                else:
                    for i in range(n):
                        least = max(least, np.uint16(source16[i] & np.uint16(0x7FFF)))
                worst = max(worst, np.uint32(least))
        limit = 0x7F800000 if kind == FLOAT32 else (0x7F80 if kind == BFLOAT16 else 0x7C00)
        return worst < limit

    # --- policies ---------------------------------------------------------------------------

    @numba.njit(types.void(_FLOATS, _INDEX, _INDEX, _INT, _READ_FLOATS, _INDEX, _INDEX), **_JIT)
    def _accumulate(total, offsets, lengths, heads, previous, previous_offsets, tracked):
        for layer in range(lengths.size):
            n, old = lengths[layer], tracked[layer]
            for head in range(heads):
                start = offsets[layer] + head * n
                row = total[start:start + old]
                before = previous_offsets[layer] + head * old
                earlier = previous[before:before + old]
                for j in range(old):
                    row[j] += earlier[j]

    @numba.njit(**_JIT)
    def _pair_maxima(source, out, width):
        """out[j] = max(source[j], source[j + width]) for every j of `out`."""
        left = source[:out.size]
        right = source[width:width + out.size]
        for j in range(out.size):
            a, b = left[j], right[j]
            out[j] = a if a > b else b

    @numba.njit(**_JIT)
    def _pool_row(first, second, n, kernel, out):
        """snapkv.max_pool_rows of one row of n, given padded (kernel // 2 -inf each side) in
        `first`: maxima of windows of 1, 2, 4... tokens, then the kernel's window as the maximum
        of two of the widest (overlapping). `second` is scratch of the same size."""
        width, size = 1, n + 2 * (kernel // 2)
        widest, spare = first, second
        while 2 * width <= kernel:
            _pair_maxima(widest[:size], spare[:size - width], width)
            size -= width
            width *= 2
            widest, spare = spare, widest
        _pair_maxima(widest[:size], out, kernel - width)

    @numba.njit(types.void(_READ_FLOATS, _INDEX, _INDEX, _INT, _INT, _FLOATS), **_JIT)
    def _max_pool(values, offsets, lengths, heads, kernel, out):
        half = kernel // 2
        longest = 0
        for layer in range(lengths.size):
            longest = max(longest, lengths[layer])
        first = np.empty(longest + 2 * half, np.float32)
        second = np.empty(longest + 2 * half, np.float32)
        for layer in range(lengths.size):
            n = lengths[layer]
            for head in range(heads):
                start = offsets[layer] + head * n
                row = values[start:start + n]
                padded = first[:n + 2 * half]
                padded[:half] = -np.inf
                padded[n + half:] = -np.inf
                inner = padded[half:half + n]
                for j in range(n):
                    inner[j] = row[j]
                _pool_row(first, second, n, kernel, out[start:start + n])

    @numba.njit(fastmath={"reassoc"}, **_JIT)
    def _sum(row):
        """float64 sum of a float32 row, in whatever order vectorises (reassociation allowed
        here only: the guard and the scale it feeds are bounded, see the module's note)."""
        total = 0.0
        for j in range(row.size):
            total += np.float64(row[j])
        return total

    @numba.njit(types.void(_READ_FLOATS, _READ_FLOATS, _INDEX, _INDEX, _INT, _FLOATS, _DOUBLES, _FLAGS), **_JIT)
    def _caote_keys(attention, deviation, offsets, lengths, heads, keys, sums, spread):
        for layer in range(lengths.size):
            n = lengths[layer]
            for head in range(heads):
                start = offsets[layer] + head * n
                a = attention[start:start + n]
                d = deviation[start:start + n]
                k = keys[start:start + n]
                for j in range(n):
                    k[j] = a[j] * d[j]
                # The largest weight by its bits: exact for weights >= +0.0; a negative one or a
                # NaN reads as larger than any, which only sends the row to the exact scores.
                bits = a.view(np.uint32)
                largest = np.uint32(0)
                for j in range(n):
                    largest = max(largest, bits[j])
                total = _sum(a)
                row = layer * heads + head
                sums[row] = total
                spread[row] = largest < 0x7F800000 and total > np.float64(_bits_to_float(largest)) * (1.0 + 2.0**-16)

    # --- selection --------------------------------------------------------------------------

    @numba.njit(**_JIT)
    def _count_at_most(values, bound):
        count = 0
        for i in range(values.size):
            count += values[i] <= bound
        return count

    @numba.njit(**_JIT)
    def _filter(row, pivot, flip, out):
        """The elements of `row` (uint32), each xor `flip`, that are <= `pivot`, stored at the
        start of `out`; returns how many."""
        n = row.size
        source, destination = row.ctypes.data, out.ctypes.data
        count = 0
        whole = n - n % 16
        for chunk in range(0, whole, 16):
            count += _filter16(source + 4 * chunk, destination + 4 * count, pivot, flip)
        tail = row[whole:]
        for i in range(tail.size):
            value = np.uint32(tail[i] ^ flip)
            out[count] = value
            count += value <= pivot
        return count

    @numba.njit(**_JIT)
    def _above(values, bound, out):
        """The elements of `values` (uint32) that are > `bound`, stored at the start of `out`;
        returns how many."""
        n = values.size
        source, destination = values.ctypes.data, out.ctypes.data
        count = 0
        whole = n - n % 16
        for chunk in range(0, whole, 16):
            count += _above16(source + 4 * chunk, destination + 4 * count, bound)
        tail = values[whole:]
        for i in range(tail.size):
            value = tail[i]
            out[count] = value
            count += value > bound
        return count

    @numba.njit(**_JIT)
    def _sift_down(a, start, root, end):
        while True:
            child = 2 * root + 1
            if child >= end:
                return
            if child + 1 < end and a[start + child + 1] > a[start + child]:
                child += 1
            if a[start + root] >= a[start + child]:
                return
            a[start + root], a[start + child] = a[start + child], a[start + root]
            root = child

    @numba.njit(**_JIT)
    def _heap_sort(a, lo, hi):
        """Sorts a[lo:hi + 1] in O(n log n) whatever the input."""
        n = hi - lo + 1
        for root in range(n // 2 - 1, -1, -1):
            _sift_down(a, lo, root, n)
        for end in range(n - 1, 0, -1):
            a[lo], a[lo + end] = a[lo + end], a[lo]
            _sift_down(a, lo, 0, end)

    @numba.njit(**_JIT)
    def _smallest(values, k, first, second):
        """The k-th smallest (0-based) of `values` (uint32, left as they are): a quickselect on
        the median of three whose partitions are compress-stores (one vectorised pass each) into
        the scratch buffers `first` and `second` (each as long as `values`), with a heap sort of
        what is left after 64 rounds."""
        source = values
        size = values.size
        into_first = True
        rounds = 64
        while size > 16 and rounds > 0:
            rounds -= 1
            a, b, c = source[0], source[size >> 1], source[size - 1]
            pivot = max(min(a, b), min(max(a, b), c))
            target = first if into_first else second
            below = _filter(source[:size], np.uint32(pivot - 1), np.uint32(0), target) if pivot > 0 else 0
            if k < below:
                source, size, into_first = target, below, not into_first
                continue
            at_most = below + _count_equal(source[:size], pivot)
            if k < at_most:
                return pivot
            above = _above(source[:size], pivot, target)
            source, size, k, into_first = target, above, k - at_most, not into_first
        target = first if into_first else second
        target[:size] = source[:size]
        _heap_sort(target, 0, size - 1)
        return target[k]

    @numba.njit(**_JIT)
    def _count_equal(values, value):
        count = 0
        for i in range(values.size):
            count += values[i] == value
        return count

    @numba.njit(**_JIT)
    def _around(row, kth, candidates, minima, scratch):
        """The kth smallest of `row` (uint32 keys, 0 < kth < row.size) and its neighbours in
        sorted order: (below, threshold, above), `above` 0 when kth is the last rank.

        Works on the smaller side: the kth + 2 smallest keys, or the size - kth + 1 largest as
        the smallest with every bit flipped (which reverses the order). Candidates are the keys
        at or below P, the c-th smallest minimum of >= 2c disjoint strided groups of keys:
        every minimum is a distinct key, so at least c keys lie at or below P, and the c
        smallest keys are all candidates (about 1.4 c of them on random keys). `scratch`: twice
        the row's length."""
        m = row.size
        free = m - kth
        if kth <= free - 1:
            flip, q = np.uint32(0), kth
        else:
            flip, q = np.uint32(0xFFFFFFFF), free - 1
        c = min(q + 2, m)
        if 4 * c <= m:
            group = m // (2 * c)
            groups = m // group
            least = minima[:groups]
            head = row[:groups]
            for b in range(groups):
                least[b] = head[b] ^ flip
            for j in range(1, group):
                part = row[j * groups:(j + 1) * groups]
                for b in range(groups):
                    value = np.uint32(part[b] ^ flip)
                    if value < least[b]:
                        least[b] = value
            count = _filter(row, _smallest(least, c - 1, scratch[:groups], scratch[m:m + groups]), flip, candidates)
        else:
            for i in range(m):
                candidates[i] = row[i] ^ flip
            count = m
        chosen = candidates[:count]
        threshold = _smallest(chosen, q, scratch[:count], scratch[m:m + count])
        below = equal = 0
        first, last = np.uint32(0), np.uint32(0xFFFFFFFF)  # ranks q - 1 and q + 1
        for i in range(count):  # branch-free (vectorised)
            value = chosen[i]
            below += value < threshold
            equal += value == threshold
            first = max(first, value if value < threshold else np.uint32(0))
            last = min(last, value if value > threshold else np.uint32(0xFFFFFFFF))
        if below < q:
            first = threshold
        if below + equal > q + 1:
            last = threshold
        if flip:
            return (np.uint32(last ^ flip), np.uint32(threshold ^ flip),
                    np.uint32(first ^ flip) if q >= 1 else np.uint32(0))
        return first, threshold, last if q + 1 < m else np.uint32(0)

    @numba.njit(types.void(_READ_BITS32, _INDEX, _INDEX, _INT, _INDEX, _FLAGS, _INT, _INT, _INT, _FLAGS, _FLAGS),
                **_JIT)
    def _select(keys, offsets, lengths, heads, budgets, marks, sink, recent, slack, keep, clear):
        longest = 1
        for layer in range(lengths.size):
            longest = max(longest, lengths[layer])
        candidates = np.empty(longest, np.uint32)
        minima = np.empty(longest, np.uint32)
        scratch = np.empty(2 * longest, np.uint32)
        for layer in range(lengths.size):
            if not marks[layer]:
                continue
            n = lengths[layer]
            kth = n - budgets[layer]  # evicted per row
            fine = True
            for head in range(heads):
                start = offsets[layer] + head * n
                row = keys[start + sink:start + n - recent]
                below, threshold, above = _around(row, kth, candidates, minima, scratch)
                t = np.int64(threshold)
                if slack and not (_SMALLEST_KEY <= t < _LARGEST_KEY):
                    fine = False
                if not np.int64(below) + slack < t:
                    fine = False
                if kth + 1 < row.size and not np.int64(above) > t + slack:
                    fine = False
                mask = keep[start + sink:start + n - recent]
                for j in range(row.size):
                    mask[j] = row[j] >= threshold
            clear[layer] = fine

    # --- compaction -------------------------------------------------------------------------

    @numba.njit(**_JIT)
    def _pack(mask, out):
        """numpy.packbits(mask, bitorder="little") into `out`."""
        n = mask.size
        whole = n // 8
        address = mask.ctypes.data
        for byte in range(whole):
            # Eight 0/1 bytes to eight bits: each byte's low bit lands in the top byte.
            word = _load_u64(address + 8 * byte)
            out[byte] = np.uint8((word * np.uint64(0x0102040810204080)) >> np.uint64(56))
        if whole < out.size:
            tail = mask[8 * whole:]
            value = 0
            for bit in range(tail.size):
                value |= np.int64(tail[bit]) << bit
            out[whole] = value

    @numba.njit(**_JIT)
    def _compress(source, packed, first_bit, out):
        """The 4-byte elements of `source` whose bits are set in `packed` (little bit order,
        element i at bit first_bit + i), stored one after the other at the start of `out`;
        returns how many. Reads up to 8 bytes past the mask's last."""
        n = source.size
        address, destination, bits = source.ctypes.data, out.ctypes.data, packed.ctypes.data
        count = 0
        whole = n - n % 16
        shift = np.uint64(first_bit & 7)
        for chunk in range(0, whole, 16):
            mask = (_load_u64(bits + ((first_bit + chunk) >> 3)) >> shift) & np.uint64(0xFFFF)
            count += _compress16(address + 4 * chunk, destination + 4 * count, mask)
        for i in range(whole, n):
            bit = first_bit + i
            if (packed[bit >> 3] >> (bit & 7)) & 1:
                out[count] = source[i]
                count += 1
        return count

    @numba.njit(_BOOL(_FLAGS, _INDEX, _INDEX, _INT, _INDEX, _FLAGS, _READ_INTS, _INDEX, _INDEX, _READ_INTS,
                      _READ_FLOATS, _BOOL, _INTS, _FLOATS, _INDEX, _BYTES, _INDEX), **_JIT)
    def _compact(keep, offsets, lengths, heads, kept_lengths, evicting, previous, previous_offsets, tracked,
                 new_positions, accumulator, has_accumulator, positions_out, accumulator_out, kept_offsets, packed,
                 packed_offsets):
        for layer in range(lengths.size):
            n, old, budget = lengths[layer], tracked[layer], kept_lengths[layer]
            width = (n + 7) // 8
            for head in range(heads):
                start = offsets[layer] + head * n
                before = previous_offsets[layer] + head * old
                earlier = previous[before:before + old]
                out = kept_offsets[layer] + head * budget
                if not evicting[layer]:
                    positions_out[out:out + old] = earlier
                    positions_out[out + old:out + n] = new_positions
                    if has_accumulator:
                        accumulator_out[out:out + n] = accumulator[start:start + n]
                    continue
                mask = keep[start:start + n]
                # Selection keeps `budget` in every row; checked, since more would overwrite
                # the next row (or run past the buffers).
                kept = 0
                for j in range(n):
                    kept += mask[j]
                if kept != budget:
                    return False
                bits = packed[packed_offsets[layer] + head * width:]
                _pack(mask, bits[:width])
                kept = _compress(earlier.view(np.uint32), bits, 0, positions_out[out:].view(np.uint32))
                _compress(new_positions.view(np.uint32), bits, old, positions_out[out + kept:].view(np.uint32))
                if has_accumulator:
                    _compress(accumulator[start:start + n].view(np.uint32), bits, 0,
                              accumulator_out[out:].view(np.uint32))
        return True


    # --- the fused decision -----------------------------------------------------------------
    # One pass per layer over what the wire carries: each row's score (decoded, accumulated or
    # pooled), its keys, threshold and mask, then the compaction, the layer's rows in cache
    # while they are used (8 x 4224 float32 rows: 135 KB).

    @numba.njit(**_JIT)
    def _decode_into(address, kind, start, out):
        """out.size values of the tensor whose raw data is at `address` (wire encoding `kind`),
        from element `start`."""
        n = out.size
        if kind == FLOAT32:
            source = numba.carray(_pointer(address), (start + n,), np.uint32)[start:]
            for j in range(n):
                out[j] = _bits_to_float(source[j])
        elif kind == BFLOAT16:
            source16 = numba.carray(_pointer(address), (start + n,), np.uint16)[start:]
            for j in range(n):
                out[j] = _bits_to_float(np.uint32(np.uint32(source16[j]) << np.uint32(16)))
        else:
            source16 = numba.carray(_pointer(address), (start + n,), np.uint16)[start:]
            for j in range(n):
                out[j] = _half_to_float(source16[j])

    @numba.njit(**_JIT)
    def _score_rows(source, address, kind, kernel, heads, n, previous, old, first, second, rows):
        """The layer's score rows into `rows` (heads x n, flat): its statistic decoded, plus the
        previous accumulators (`previous`, heads x old) where `source` accumulates, or pooled."""
        half = kernel // 2
        for head in range(heads):
            row = rows[head * n:(head + 1) * n]
            if source == SOURCE_POOLED and kernel > 1:
                padded = first[:n + 2 * half]
                padded[:half] = -np.inf
                padded[n + half:] = -np.inf
                _decode_into(address, kind, head * n, padded[half:half + n])
                _pool_row(first, second, n, kernel, row)
            else:
                _decode_into(address, kind, head * n, row)
                if source == SOURCE_ACCUMULATED and old:
                    earlier = previous[head * old:(head + 1) * old]
                    leading = row[:old]
                    for j in range(old):
                        leading[j] += earlier[j]

    @numba.njit(**_JIT)
    def _key_rows(keys_kind, address, kind, heads, n, rows, deviation, keys, sums, spread):
        """The layer's keys (heads x n, flat) from its score rows: the scores themselves, or
        CAOTE's score x deviation with each row's sum and guard (as _caote_keys)."""
        for head in range(heads):
            a = rows[head * n:(head + 1) * n]
            k = keys[head * n:(head + 1) * n]
            if keys_kind == KEYS_SCORE:
                for j in range(n):
                    k[j] = a[j]
                sums[head] = 0.0
                spread[head] = True
                continue
            d = deviation[:n]
            _decode_into(address, kind, head * n, d)
            for j in range(n):
                k[j] = a[j] * d[j]
            bits = a.view(np.uint32)
            largest = np.uint32(0)
            for j in range(n):
                largest = max(largest, bits[j])
            total = _sum(a)
            sums[head] = total
            spread[head] = largest < 0x7F800000 and total > np.float64(_bits_to_float(largest)) * (1.0 + 2.0**-16)

    @numba.njit(**_JIT)
    def _select_rows(keys, heads, n, budget, sink, recent, slack, candidates, minima, scratch, masks):
        """The layer's masks (heads x n, flat) from its keys, as _select; True where every row's
        threshold is clear of its neighbours. With no slack the keys are the scores, so a tie at
        the threshold is settled here as select_keep settles it: the most recent ties stay."""
        kth = n - budget
        fine = True
        for head in range(heads):
            row = keys[head * n + sink:head * n + n - recent].view(np.uint32)
            below, threshold, above = _around(row, kth, candidates, minima, scratch)
            t = np.int64(threshold)
            clear = True
            if slack and not (_SMALLEST_KEY <= t < _LARGEST_KEY):
                clear = False
            if not np.int64(below) + slack < t:
                clear = False
            if kth + 1 < row.size and not np.int64(above) > t + slack:
                clear = False
            mask = masks[head * n:(head + 1) * n]
            mask[:sink] = True
            mask[n - recent:] = True
            middle = mask[sink:n - recent]
            if clear or slack:
                for j in range(row.size):
                    middle[j] = row[j] >= threshold
                fine &= clear
                continue
            greater = 0
            for j in range(row.size):
                middle[j] = row[j] > threshold
                greater += row[j] > threshold
            still_free = row.size - kth - greater
            for j in range(row.size - 1, -1, -1):
                if still_free == 0:
                    break
                if row[j] == threshold:
                    middle[j] = True
                    still_free -= 1
        return fine

    @numba.njit(**_JIT)
    def _compact_rows(masks, heads, n, old, budget, previous, new_positions, accumulate, rows, positions_out,
                      accumulator_out, packed):
        """The layer's kept positions (previous heads x old, then the new ones) and, where
        `accumulate`, kept score rows, by `masks`, and the masks bit-packed (heads x ceil(n / 8)
        bytes); False, writing nothing, if a row does not keep exactly `budget`."""
        for head in range(heads):
            kept = 0
            mask = masks[head * n:(head + 1) * n]
            for j in range(n):
                kept += mask[j]
            if kept != budget:
                return False
        width = (n + 7) // 8
        for head in range(heads):
            mask = masks[head * n:(head + 1) * n]
            bits = packed[head * width:]
            _pack(mask, bits[:width])
            out = head * budget
            earlier = previous[head * old:(head + 1) * old]
            kept = _compress(earlier.view(np.uint32), bits, 0, positions_out[out:].view(np.uint32))
            _compress(new_positions.view(np.uint32), bits, old, positions_out[out + kept:].view(np.uint32))
            if accumulate:
                _compress(rows[head * n:(head + 1) * n].view(np.uint32), bits, 0,
                          accumulator_out[out:].view(np.uint32))
        return True

    @numba.njit(**_JIT)
    def _copy_rows(heads, n, old, previous, new_positions, accumulate, rows, positions_out, accumulator_out):
        """A layer within its budget: every position (previous, then new) and score row kept."""
        for head in range(heads):
            out = head * n
            positions_out[out:out + old] = previous[head * old:(head + 1) * old]
            positions_out[out + old:out + n] = new_positions
            if accumulate:
                accumulator_out[out:out + n] = rows[head * n:(head + 1) * n]

    _FUSED = _BOOL(_INT, _INT, _INT, _INT, _INT, _INT, _BOOL, _INT, _INDEX, _INDEX, _INDEX, _INDEX, _READ_INTS,
                   _INDEX, _INDEX, _READ_INTS, _READ_FLOATS, _INT, _INT, _INDEX, _INTS, _FLOATS, _INDEX, _BYTES, _BYTES,
                   _BOOL)

    @numba.njit(_FUSED, **_JIT)
    def _fused(source, kind, kernel, keys_kind, deviation_kind, slack, accumulate,
               heads, lengths, budgets, score_addresses, deviation_addresses, new_positions,
               tracked, previous_offsets, previous_positions, previous_accumulator, sink, recent,
               kept_offsets, positions_out, accumulator_out, packed_offsets, packed, status, backwards):
        """Every layer of a report whose budgets are known (uniform, pyramid): scores, keys,
        selection and compaction in one pass per layer. status[layer]: 0 decided here, 1 left
        to the exact scores (a row where a token holds nearly all the weight, a threshold within
        the slack of a neighbour), its outputs not written. False if a layer's masks do not keep
        its budget (a bug: nothing may be used). `backwards`: the last layer first (after a pass
        in layer order, what it read last is the likeliest still in cache)."""
        longest = 1
        for layer in range(lengths.size):
            longest = max(longest, lengths[layer])
        half = kernel // 2
        rows = np.empty(heads * longest, np.float32)
        keys = np.empty(heads * longest, np.float32)
        masks = np.empty(heads * longest, np.bool_)
        deviation = np.empty(longest, np.float32)
        first = np.empty(longest + 2 * half, np.float32)
        second = np.empty(longest + 2 * half, np.float32)
        candidates = np.empty(longest, np.uint32)
        minima = np.empty(longest, np.uint32)
        scratch = np.empty(2 * longest, np.uint32)
        sums = np.empty(heads, np.float64)
        spread = np.empty(heads, np.bool_)
        for index in range(lengths.size):
            layer = lengths.size - 1 - index if backwards else index
            n, old = lengths[layer], tracked[layer]
            budget = min(n, budgets[layer])
            before = previous_offsets[layer]
            positions = previous_positions[before:before + heads * old]
            earlier = previous_accumulator[before:before + heads * old] if accumulate else previous_accumulator[:0]
            layer_rows = rows[:heads * n]
            _score_rows(source, score_addresses[layer], kind, kernel, heads, n, earlier, old, first, second,
                        layer_rows)
            out = kept_offsets[layer]
            status[layer] = 0
            if budget == n:
                _copy_rows(heads, n, old, positions, new_positions, accumulate, layer_rows, positions_out[out:],
                           accumulator_out[out:])
                continue
            layer_keys = keys[:heads * n]
            _key_rows(keys_kind, deviation_addresses[layer], deviation_kind, heads, n, layer_rows, deviation,
                      layer_keys, sums, spread)
            fast = True
            for head in range(heads):
                fast &= spread[head]
            if not fast or not _select_rows(layer_keys, heads, n, budget, sink, recent, slack, candidates, minima,
                                            scratch, masks[:heads * n]):
                status[layer] = 1
                continue
            if not _compact_rows(masks[:heads * n], heads, n, old, budget, positions, new_positions, accumulate,
                                 layer_rows, positions_out[out:], accumulator_out[out:],
                                 packed[packed_offsets[layer]:]):
                return False
        return True

    _PREPARE = types.void(_INT, _INT, _INT, _INT, _INT, _BOOL, _INT, _INDEX, _INDEX, _INDEX, _INDEX, _INDEX,
                          _READ_FLOATS, _INT, _INT, _FLOATS, _FLOATS, _DOUBLES, _FLAGS)

    @numba.njit(_PREPARE, **_JIT)
    def _prepare(source, kind, kernel, keys_kind, deviation_kind, accumulate, heads, lengths, score_addresses,
                 deviation_addresses, tracked, previous_offsets, previous_accumulator, first_layer, stop_layer,
                 rows_out, keys_out, sums, spread):
        """Layers [first_layer, stop_layer)'s score rows and keys, flat from the first one's
        start, with each row's sum and guard (what an allocator needs before any selection)."""
        longest = 1
        for layer in range(first_layer, stop_layer):
            longest = max(longest, lengths[layer])
        half = kernel // 2
        deviation = np.empty(longest, np.float32)
        first = np.empty(longest + 2 * half, np.float32)
        second = np.empty(longest + 2 * half, np.float32)
        start = 0
        for layer in range(first_layer, stop_layer):
            n, old = lengths[layer], tracked[layer]
            before = previous_offsets[layer]
            earlier = previous_accumulator[before:before + heads * old] if accumulate else previous_accumulator[:0]
            layer_rows = rows_out[start:start + heads * n]
            _score_rows(source, score_addresses[layer], kind, kernel, heads, n, earlier, old, first, second,
                        layer_rows)
            row = (layer - first_layer) * heads
            _key_rows(keys_kind, deviation_addresses[layer], deviation_kind, heads, n, layer_rows, deviation,
                      keys_out[start:start + heads * n], sums[row:row + heads], spread[row:row + heads])
            start += heads * n

    @numba.njit(**_JIT)
    def _block_sum(values, start, n):
        """numpy's pairwise_sum of at most 128 float64: 8 partial sums, then the rest."""
        if n < 8:
            total = 0.0
            for i in range(n):
                total += values[start + i]
            return total
        r0, r1, r2, r3 = values[start], values[start + 1], values[start + 2], values[start + 3]
        r4, r5, r6, r7 = values[start + 4], values[start + 5], values[start + 6], values[start + 7]
        i = 8
        while i < n - n % 8:
            r0 += values[start + i]
            r1 += values[start + i + 1]
            r2 += values[start + i + 2]
            r3 += values[start + i + 3]
            r4 += values[start + i + 4]
            r5 += values[start + i + 5]
            r6 += values[start + i + 6]
            r7 += values[start + i + 7]
            i += 8
        total = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
        while i < n:
            total += values[start + i]
            i += 1
        return total

    @numba.njit(**_JIT)
    def _pairwise(values, n):
        """numpy's float64 sum of values[:n] (its pairwise_sum: blocks of at most 128 summed by
        _block_sum, longer runs halved at a multiple of 8, the halves' sums added), bit for bit:
        what a row's sum(axis=-1) gives (tests/test_manager_kernels.py holds it to numpy's). The
        recursion walked with a stack (numba caches no recursive function)."""
        starts = np.empty(64, np.intp)
        sizes = np.empty(64, np.intp)
        split = np.zeros(64, np.bool_)
        partial = np.empty(64, np.float64)
        top, done = 0, 0
        starts[0], sizes[0] = 0, n
        while top >= 0:
            start, size = starts[top], sizes[top]
            if size <= 128:
                partial[done] = _block_sum(values, start, size)
                done += 1
                top -= 1
            elif not split[top]:
                split[top] = True
                half = size // 2
                half -= half % 8
                starts[top + 1], sizes[top + 1], split[top + 1] = start + half, size - half, False
                starts[top + 2], sizes[top + 2], split[top + 2] = start, half, False
                top += 2
            else:  # both halves summed: the left's, then the right's
                partial[done - 2] = partial[done - 2] + partial[done - 1]
                done -= 1
                top -= 1
        return partial[0]

    _EXACT_TOTALS = types.void(_INT, _INT, _INT, _INT, _BOOL, _INT, _INDEX, _INDEX, _INDEX, _INDEX, _INDEX,
                               _READ_FLOATS, _INDEX, _INDEX, _DOUBLES)

    @numba.njit(_EXACT_TOTALS, **_JIT)
    def _exact_totals(source, kind, kernel, deviation_kind, accumulate, heads, lengths, score_addresses,
                      deviation_addresses, tracked, previous_offsets, previous_accumulator, layers, columns, out):
        """wrappers.caote_totals for a few (layer, column) entries (grouped by layer): each
        layer's score rows again, each row's numpy float64 sum (_pairwise), and at each column
        caote_scores' operations in its order, summed over heads one after the other."""
        longest = 1
        for layer in range(lengths.size):
            longest = max(longest, lengths[layer])
        half = kernel // 2
        rows = np.empty(heads * longest, np.float32)
        deviation = np.empty(heads * longest, np.float32)
        widened = np.empty(longest, np.float64)
        first = np.empty(longest + 2 * half, np.float32)
        second = np.empty(longest + 2 * half, np.float32)
        sums = np.empty(heads, np.float64)
        entry = 0
        while entry < layers.size:
            layer = layers[entry]
            n, old = lengths[layer], tracked[layer]
            before = previous_offsets[layer]
            earlier = previous_accumulator[before:before + heads * old] if accumulate else previous_accumulator[:0]
            _score_rows(source, score_addresses[layer], kind, kernel, heads, n, earlier, old, first, second,
                        rows[:heads * n])
            _decode_into(deviation_addresses[layer], deviation_kind, 0, deviation[:heads * n])
            for head in range(heads):
                row = rows[head * n:(head + 1) * n]
                wide = widened[:n]
                for j in range(n):
                    wide[j] = np.float64(row[j])
                sums[head] = 0.0 + _pairwise(wide, n)
            while entry < layers.size and layers[entry] == layer:
                j = columns[entry]
                total = 0.0
                for head in range(heads):
                    weight = np.float64(rows[head * n + j])
                    row_sum = sums[head]
                    if row_sum <= 0:  # a row of zeros weighs its tokens alike
                        weight, row_sum = 1.0, np.float64(max(n, 1))
                    weight /= row_sum
                    score = np.inf if weight >= 1.0 else weight * np.float64(deviation[head * n + j])
                    total = score if head == 0 else total + score
                out[entry] = total
                entry += 1

    _TOTALS = types.void(_INT, _INT, _INT, _INT, _BOOL, _INT, _INDEX, _INDEX, _INDEX, _INDEX, _INDEX, _READ_FLOATS,
                         _INT, _INT, _DOUBLES, _FLAGS, _FLOATS)

    @numba.njit(_TOTALS, **_JIT)
    def _totals(source, kind, kernel, deviation_kind, accumulate, heads, lengths, score_addresses,
                deviation_addresses, tracked, previous_offsets, previous_accumulator, sink, recent, sums, spread,
                totals):
        """What a score-dependent allocator needs before any selection, with CAOTE's keys: each
        row's float64 sum and guard, and per layer, for each token between the protected ones,
        the float32 sum over heads of key x float32(1 / sum) (as _head_totals), the layers one
        after the other. Rows and keys stay in cache (the decision recomputes them)."""
        longest = 1
        for layer in range(lengths.size):
            longest = max(longest, lengths[layer])
        half = kernel // 2
        rows = np.empty(heads * longest, np.float32)
        keys = np.empty(heads * longest, np.float32)
        deviation = np.empty(longest, np.float32)
        first = np.empty(longest + 2 * half, np.float32)
        second = np.empty(longest + 2 * half, np.float32)
        at = 0
        for layer in range(lengths.size):
            n, old = lengths[layer], tracked[layer]
            before = previous_offsets[layer]
            earlier = previous_accumulator[before:before + heads * old] if accumulate else previous_accumulator[:0]
            _score_rows(source, score_addresses[layer], kind, kernel, heads, n, earlier, old, first, second,
                        rows[:heads * n])
            row = layer * heads
            _key_rows(KEYS_CAOTE, deviation_addresses[layer], deviation_kind, heads, n, rows[:heads * n], deviation,
                      keys[:heads * n], sums[row:row + heads], spread[row:row + heads])
            width = max(n - sink - recent, 0)  # a layer shorter than its protected tokens has none
            total = totals[at:at + width]
            for j in range(width):
                total[j] = 0.0
            for head in range(heads):
                scale = np.float32(1.0 / sums[row + head])
                part = keys[head * n + sink:head * n + sink + width]
                for j in range(width):
                    total[j] += part[j] * scale
            at += width

    @numba.njit(_BOOL(_FLAGS, _INT, _INT, _INT, _INT, _READ_INTS, _READ_INTS, _BOOL, _READ_FLOATS, _INTS, _FLOATS,
                      _BYTES), **_JIT)
    def _compact_layer(masks, heads, n, old, budget, previous, new_positions, accumulate, rows, positions_out,
                       accumulator_out, packed):
        return _compact_rows(masks, heads, n, old, budget, previous, new_positions, accumulate, rows,
                             positions_out, accumulator_out, packed)

    # --- adaptive allocation ----------------------------------------------------------------

    @numba.njit(types.float32(_READ_FLOATS, _INT), **_JIT)
    def _largest(pool, rank):
        """The rank-th largest (1-based) of `pool` (float32 >= +0.0, so ordered as its bits)."""
        bits = np.empty(pool.size, np.uint32)  # a writable copy: _smallest's one specialisation
        bits[:] = pool.view(np.uint32)
        first = np.empty(pool.size, np.uint32)
        second = np.empty(pool.size, np.uint32)
        return _bits_to_float(_smallest(bits, pool.size - rank, first, second))

    @numba.njit(types.intp(_READ_BITS32, _INDEX, types.uint32, types.uint32, _INDEX, _INDEX), **_JIT)
    def _band(pool, starts, low, high, above, band):
        """Per part of `pool` (float32 bits >= +0.0, parts from starts[i]), how many are > high;
        the indices of those in [low, high], in order, at the start of `band`; returns how many."""
        count = 0
        for part in range(starts.size):
            end = starts[part + 1] if part + 1 < starts.size else pool.size
            values = pool[starts[part]:end]
            greater = 0
            for j in range(values.size):  # vectorised
                greater += values[j] > high
            above[part] = greater
            # Few are in the band: 16 compared at once, a well-predicted branch.
            address, width = values.ctypes.data, np.uint32(high - low)
            whole = values.size - values.size % 16
            for chunk in range(0, whole, 16):
                inside = _inside16(address + 4 * chunk, low, width)
                if inside:
                    for lane in range(16):
                        if (inside >> np.uint64(lane)) & np.uint64(1):
                            band[count] = starts[part] + chunk + lane
                            count += 1
            for j in range(whole, values.size):
                if low <= values[j] <= high:
                    band[count] = starts[part] + j
                    count += 1
        return count


    @numba.njit(types.void(_READ_FLOATS, _READ_FLOATS, _INDEX, _INDEX, _INT, _FLAGS, _INT, _INT, _FLOATS), **_JIT)
    def _head_totals(keys, inverse, offsets, lengths, heads, competing, sink, recent, out):
        at = 0
        for layer in range(lengths.size):
            if not competing[layer]:
                continue
            n = lengths[layer]
            width = n - sink - recent
            total = out[at:at + width]
            for j in range(width):
                total[j] = 0.0
            for head in range(heads):
                start = offsets[layer] + head * n + sink
                scale = inverse[layer * heads + head]
                row = keys[start:start + width]
                for j in range(width):
                    total[j] += row[j] * scale
            at += width


def _readonly(array: np.ndarray, dtype) -> np.ndarray:
    """`array` as the kernels' read-only inputs are typed: 1-D, C-contiguous, aligned and
    read-only (a view; a copy only where the dtype, contiguity or alignment differ)."""
    array = np.asarray(array).reshape(-1)
    if array.dtype != dtype or not array.flags.c_contiguous or not array.flags.aligned:
        array = np.require(array, dtype, ["C", "A"])
    if array.flags.writeable:
        array = array.view()
        array.flags.writeable = False
    return array


def offsets_of(lengths: np.ndarray, heads: int) -> np.ndarray:
    """Start of every layer's (heads, length) block in a flat buffer, and the total at the end."""
    offsets = np.zeros(lengths.size + 1, np.intp)
    np.cumsum(np.asarray(lengths, np.intp) * heads, out=offsets[1:])
    return offsets


def decode(data: bytes, kind: int, non_negative: bool) -> np.ndarray | None:
    """The float32 values of `data` (raw bits in wire encoding `kind`: FLOAT16, BFLOAT16 or
    FLOAT32), or None if any is NaN or infinite, negative where `non_negative`, or -0.0 there
    (the values batch.decode_statistic leaves to the exact path). A fresh, writable array."""
    if kind == FLOAT32:
        source = _readonly(np.frombuffer(data, np.uint32), np.uint32)
        out = np.empty(source.size, np.float32)
        valid = _decode_single(source, non_negative, out)
    else:
        source = _readonly(np.frombuffer(data, np.uint16), np.uint16)
        out = np.empty(source.size, np.float32)
        valid = (_decode_half if kind == FLOAT16 else _decode_bfloat)(source, non_negative, out)
    return out if valid else None


def accumulate(total: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, heads: int, previous: np.ndarray,
               tracked: np.ndarray) -> None:
    """Adds `previous` (each layer's (heads, tracked) block, flat) into the leading columns of
    `total`'s layer rows (flat at `offsets`), in place: H2O.accumulate of every layer."""
    _accumulate(total, offsets, lengths, heads, _readonly(previous, np.float32), offsets_of(tracked, heads), tracked)


def max_pool(values: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, heads: int, kernel: int) -> np.ndarray:
    """snapkv.max_pool of every row (odd `kernel`), flat."""
    out = np.empty(values.size, np.float32)
    _max_pool(_readonly(values, np.float32), offsets, lengths, heads, kernel, out)
    return out


def caote_keys(attention: np.ndarray, deviation: np.ndarray, offsets: np.ndarray, lengths: np.ndarray,
               heads: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 attention x deviation (flat), every row's float64 sum of the attention, and per
    row whether that sum exceeds the row's largest weight by more than a relative 2**-16."""
    keys = np.empty(attention.size, np.float32)
    sums = np.empty(lengths.size * heads, np.float64)
    spread = np.empty(lengths.size * heads, np.bool_)
    _caote_keys(_readonly(attention, np.float32), _readonly(deviation, np.float32), offsets, lengths, heads, keys,
                sums, spread)
    return keys, sums, spread


def select(keys: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, heads: int, budgets: np.ndarray,
           marks: np.ndarray, sink: int, recent: int, slack: int, keep: np.ndarray) -> np.ndarray:
    """Writes the middle columns (past `sink`, before `recent`) of the marked layers' keep masks
    into `keep` (flat bool): the keys (non-negative float32) at or above each row's threshold,
    the budgets[layer] - sink - recent largest. Per layer, whether every row's threshold is
    clear of both its neighbours by more than `slack` (and, with a slack, of float32's ends)."""
    clear = np.zeros(lengths.size, np.bool_)
    _select(_readonly(keys.view(np.uint32), np.uint32), offsets, lengths, heads, budgets, marks, sink, recent, slack,
            keep, clear)
    return clear


def compact(keep: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, heads: int, kept_lengths: np.ndarray,
            evicting: np.ndarray, previous_positions: np.ndarray, tracked: np.ndarray, new_positions: np.ndarray,
            accumulator: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
    """The kept positions (the previous ones, flat, then the new ones) and accumulators, flat in
    the kept layout and in cache order, and the evicting layers' keep masks bit-packed per row
    (numpy's little bit order) in one buffer, layer l's from packed_offsets[l]."""
    kept_offsets = offsets_of(kept_lengths, heads)
    total = int(kept_offsets[-1])
    packed_offsets = np.zeros(lengths.size + 1, np.intp)
    np.cumsum(np.where(evicting, (lengths + 7) // 8 * heads, 0), out=packed_offsets[1:])
    positions = np.empty(total, np.int32)
    has = accumulator is not None
    kept_accumulator = np.empty(total if has else 1, np.float32)
    packed = np.empty(int(packed_offsets[-1]) + 8, np.uint8)  # _compress reads 8 bytes at a time
    consistent = _compact(keep, offsets, lengths, heads, kept_lengths, evicting, _readonly(previous_positions, np.int32),
             offsets_of(tracked, heads), tracked, _readonly(new_positions, np.int32),
             _readonly(accumulator if has else np.zeros(1, np.float32), np.float32), has, positions,
             kept_accumulator, kept_offsets, packed, packed_offsets)
    assert consistent, "a keep mask does not keep its layer's budget in every row"
    return positions, kept_accumulator if has else None, packed, packed_offsets


def head_totals(keys: np.ndarray, inverse: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, heads: int,
                competing: np.ndarray, sink: int, recent: int) -> np.ndarray:
    """Per competing layer, for each token between the protected ones: the float32 sum over
    heads of keys x inverse[row] (rows layer-major), the layers one after the other."""
    size = int(np.sum(np.where(competing, lengths - sink - recent, 0)))
    out = np.empty(size, np.float32)
    _head_totals(_readonly(keys, np.float32), _readonly(inverse, np.float32), offsets, lengths, heads, competing,
                 sink, recent, out)
    return out


# --- the fused decision -------------------------------------------------------------------------


@dataclass(frozen=True)
class Scoring:
    """How a fused decision scores and ranks a row: `source` (SOURCE_*, pooled with `kernel`,
    1 = none) gives the scores, `keys` (KEYS_*) what is ranked, `slack` the keys' (selection.Ranking).
    The statistics' data is passed as one address per layer (`Statistic`)."""

    source: int
    kernel: int = 1
    keys: int = KEYS_SCORE
    slack: int = 0


@dataclass(frozen=True)
class Statistic:
    """One statistic of every layer as the wire carries it: each layer's raw data (kept alive
    here, since the kernels read it by address), their addresses and the encoding (FLOAT16...)."""

    buffers: tuple[bytes, ...]
    addresses: np.ndarray
    kind: int
    sizes: np.ndarray  # values per layer

    @classmethod
    def of(cls, buffers: list[bytes], kind: int, sizes: np.ndarray | None = None) -> Statistic:
        """`buffers`: each layer's raw bytes (`sizes`: their values, counted if not given); any
        other bytes-like object is copied to bytes (ctypes gives a bytes object's own buffer)."""
        cast, pointer = ctypes.cast, ctypes.c_void_p
        buffers = [b if type(b) is bytes else bytes(b) for b in buffers]
        if sizes is None:
            itemsize = 4 if kind == FLOAT32 else 2
            sizes = np.fromiter((len(b) // itemsize for b in buffers), dtype=np.intp, count=len(buffers))
        return cls(tuple(buffers), np.fromiter((cast(b, pointer).value or 0 for b in buffers), dtype=np.intp,
                                               count=len(buffers)), kind, np.asarray(sizes, np.intp))

    def check(self, non_negative: bool) -> bool:
        """Every value finite (and, where `non_negative`, >= +0.0, no -0.0): batch.decode_statistic's test."""
        return bool(_check(self.addresses, self.sizes, self.kind, non_negative))

    def layer(self, layer: int) -> np.ndarray:
        """Layer `layer`'s float32 values, flat (a fresh array)."""
        out = decode(self.buffers[layer], self.kind, False)
        assert out is not None, "checked values decode"
        return out


class Recycled:
    """Big buffers (a state's positions and accumulators) handed out again once nothing refers
    to them any more: a freed 4 MB array goes back to malloc, which gives it back to the kernel
    once enough is free at the top of its heap, and the next one then costs ~1000 page faults
    (~0.5 ms here, the decisions' slowest percentile). A buffer is free when only this pool
    holds it (every numpy view holds its base); at most `per_size` are kept per (dtype, size),
    for the `sizes` most recent sizes."""

    def __init__(self, per_size: int = 16, sizes: int = 8) -> None:
        self.per_size, self.sizes = per_size, sizes
        self._buffers: OrderedDict[tuple[str, int], list[np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def empty(self, size: int, dtype) -> np.ndarray:
        """A writable 1-D array of `size` (uninitialised), reused where one is free."""
        key = (np.dtype(dtype).str, size)
        with self._lock:
            buffers = self._buffers.get(key)
            if buffers is None:
                buffers = self._buffers[key] = []
                if len(self._buffers) > self.sizes:
                    self._buffers.popitem(last=False)
            else:
                self._buffers.move_to_end(key)
            for array in buffers:
                if sys.getrefcount(array) == 3:  # the list, `array` and the call's argument
                    array.flags.writeable = True
                    return array
            array = np.empty(size, dtype)
            buffers.append(array)
            if len(buffers) > self.per_size:
                buffers.pop(0)  # no longer tracked (whoever holds it keeps it)
            return array


_recycled = Recycled()


@dataclass
class Decided:
    """What a fused decision wrote: the kept positions and accumulators (flat in the kept layout),
    the evicting layers' packed masks (layer l's from packed_offsets[l]), and per layer 0
    (decided) or 1 (left to the caller: select on the exact scores, then `compact_layer`)."""

    kept: np.ndarray  # kept length per layer
    kept_offsets: np.ndarray
    positions: np.ndarray
    accumulators: np.ndarray | None
    packed: np.ndarray
    packed_offsets: np.ndarray
    status: np.ndarray

    @classmethod
    def allocate(cls, heads: int, lengths: np.ndarray, budgets: np.ndarray, accumulate: bool) -> Decided:
        kept = np.minimum(lengths, budgets).astype(np.intp)
        kept_offsets = offsets_of(kept, heads)
        packed_offsets = np.zeros(lengths.size + 1, np.intp)
        np.cumsum(np.where(kept < lengths, (lengths + 7) // 8 * heads, 0), out=packed_offsets[1:])
        total = int(kept_offsets[-1])
        return cls(kept, kept_offsets, _recycled.empty(total, np.int32),
                   _recycled.empty(total, np.float32) if accumulate else None,
                   np.empty(int(packed_offsets[-1]) + 8, np.uint8),  # _compress reads 8 bytes at a time
                   packed_offsets, np.zeros(lengths.size, np.uint8))

    def compact_layer(self, layer: int, keep: np.ndarray, previous_positions: np.ndarray, new_positions: np.ndarray,
                      rows: np.ndarray | None) -> None:
        """Writes layer `layer`'s outputs from its keep mask (heads, n), e.g. chosen on the exact
        scores; `rows`: its accumulators (heads, n) where the decision keeps them."""
        heads, n = keep.shape
        budget = int(self.kept[layer])
        out = slice(int(self.kept_offsets[layer]), int(self.kept_offsets[layer + 1]))
        accumulate = self.accumulators is not None
        ok = _compact_layer(np.ascontiguousarray(keep).reshape(-1), heads, n, previous_positions.shape[1], budget,
                            _readonly(previous_positions, np.int32), _readonly(new_positions, np.int32), accumulate,
                            _readonly(rows if accumulate else np.zeros(1, np.float32), np.float32),
                            self.positions[out], self.accumulators[out] if accumulate else np.zeros(1, np.float32),
                            self.packed[int(self.packed_offsets[layer]):])
        assert ok, "a keep mask does not keep its layer's budget in every row"
        self.status[layer] = 0


def fused(scoring: Scoring, score: Statistic, deviation: Statistic | None, heads: int, lengths: np.ndarray,
          budgets: np.ndarray, new_positions: np.ndarray, tracked: np.ndarray, previous_positions: np.ndarray,
          previous_accumulators: np.ndarray | None, sink: int, recent: int, backwards: bool = False) -> Decided:
    """A whole decision for budgets known in advance: see _fused."""
    accumulate = scoring.source == SOURCE_ACCUMULATED
    decided = Decided.allocate(heads, lengths, budgets, accumulate)
    deviation = deviation or score
    ok = _fused(scoring.source, score.kind, scoring.kernel, scoring.keys, deviation.kind, scoring.slack, accumulate,
                heads, lengths, np.asarray(budgets, np.intp), score.addresses, deviation.addresses,
                _readonly(new_positions, np.int32), tracked, offsets_of(tracked, heads),
                _readonly(previous_positions, np.int32),
                _readonly(previous_accumulators if accumulate else np.zeros(1, np.float32), np.float32), sink, recent,
                decided.kept_offsets, decided.positions,
                decided.accumulators if accumulate else np.zeros(1, np.float32), decided.packed_offsets,
                decided.packed, decided.status, backwards)
    assert ok, "a keep mask does not keep its layer's budget in every row"
    return decided


def prepare(scoring: Scoring, score: Statistic, deviation: Statistic | None, heads: int, lengths: np.ndarray,
            tracked: np.ndarray, previous_accumulators: np.ndarray | None, layers: range | None = None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The score rows and keys of every layer (or of `layers`), flat from the first one's start,
    with each row's float64 sum and guard (see _caote_keys; for KEYS_SCORE, 0 and True)."""
    layers = layers if layers is not None else range(lengths.size)
    accumulate = scoring.source == SOURCE_ACCUMULATED
    deviation = deviation or score
    size = int(np.sum(lengths[layers.start:layers.stop])) * heads
    rows, keys = np.empty(size, np.float32), np.empty(size, np.float32)
    sums, spread = np.empty(len(layers) * heads, np.float64), np.empty(len(layers) * heads, np.bool_)
    _prepare(scoring.source, score.kind, scoring.kernel, scoring.keys, deviation.kind, accumulate, heads, lengths,
             score.addresses, deviation.addresses, tracked, offsets_of(tracked, heads),
             _readonly(previous_accumulators if accumulate else np.zeros(1, np.float32), np.float32), layers.start,
             layers.stop, rows, keys, sums, spread)
    return rows, keys, sums, spread


def totals(scoring: Scoring, score: Statistic, deviation: Statistic, heads: int, lengths: np.ndarray,
           tracked: np.ndarray, previous_accumulators: np.ndarray | None, sink: int, recent: int
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's float64 sum and guard, and every layer's estimated totals (see _totals)."""
    accumulate = scoring.source == SOURCE_ACCUMULATED
    sums, spread = np.empty(lengths.size * heads, np.float64), np.empty(lengths.size * heads, np.bool_)
    out = np.empty(int(np.sum(np.maximum(lengths - sink - recent, 0))), np.float32)
    _totals(scoring.source, score.kind, scoring.kernel, deviation.kind, accumulate, heads, lengths, score.addresses,
            deviation.addresses, tracked, offsets_of(tracked, heads),
            _readonly(previous_accumulators if accumulate else np.zeros(1, np.float32), np.float32), sink, recent,
            sums, spread, out)
    return sums, spread, out


def largest(pool: np.ndarray, rank: int) -> float:
    """numpy.partition(pool, pool.size - rank)[pool.size - rank] for float32 pool >= +0.0."""
    return float(_largest(_readonly(pool, np.float32), rank))


def band(pool: np.ndarray, starts: np.ndarray, low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
    """Per part of `pool` (float32 >= +0.0; parts from `starts`), how many values exceed `high`,
    and the indices of the values within [low, high], both real numbers (0 < low <= high):
    numpy's float64 comparisons, made on float32 bits. For float32 x, x > h exactly when x >
    the largest float32 <= h, and x >= l when x >= the smallest float32 >= l."""
    below_high = np.float32(high)
    if float(below_high) > high:
        below_high = np.nextafter(below_high, np.float32(0))
    above_low = np.float32(low)
    if float(above_low) < low:
        above_low = np.nextafter(above_low, np.float32(np.inf))
    above = np.empty(starts.size, np.intp)
    indices = np.empty(pool.size, np.intp)
    count = _band(_readonly(pool.view(np.uint32), np.uint32), np.asarray(starts, np.intp),
                  np.uint32(above_low.view(np.uint32)), np.uint32(below_high.view(np.uint32)), above, indices)
    return above, indices[:count]


def exact_totals(scoring: Scoring, score: Statistic, deviation: Statistic, heads: int, lengths: np.ndarray,
                 tracked: np.ndarray, previous_accumulators: np.ndarray | None, layers: np.ndarray,
                 columns: np.ndarray) -> np.ndarray:
    """For each (layers[i], columns[i]) (grouped by layer; columns of the whole row): the layer's
    exact CAOTE scores summed over heads at that column, as wrappers.caote_totals (see
    _exact_totals), float64."""
    accumulate = scoring.source == SOURCE_ACCUMULATED
    out = np.empty(len(layers), np.float64)
    _exact_totals(scoring.source, score.kind, scoring.kernel, deviation.kind, accumulate, heads, lengths,
                  score.addresses, deviation.addresses, tracked, offsets_of(tracked, heads),
                  _readonly(previous_accumulators if accumulate else np.zeros(1, np.float32), np.float32),
                  np.asarray(layers, np.intp), np.asarray(columns, np.intp), out)
    return out
