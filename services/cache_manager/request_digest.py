"""The digest a decision is stored with, so a retried sequence number can be checked to repeat
its request (transitions.ReportStep).

SHA-256 over every field of the ReportBlockRequest (session id, sequence, phase, positions,
each layer's number, cache length and tensors' dtype, shape and length, and the layers' head
lengths where a per-head session's report gives them) and, for each statistics
tensor, a 64-bit mixed sum of its data: `sum_i mix(w_i + (i + seed) * golden)` over its 64-bit
words `w_i` (mix: splitmix64's finaliser, a bijection; seed: the tensor's place in the request;
the last < 8 bytes go to SHA-256 as they are). SHA-256 over the whole request costs 2.5 ms on a
Llama-3.1-8B-shaped report (4.3 MB), as much as the decision; the mixed sum reads the bytes once
at memory speed (0.34 ms, compiled) and a different report collides with probability ~2^-64.
It is no defence against someone who can choose both requests, which is not the threat: a
forger sends its report first and the owner's real one must not be answered with its decision,
and the forger cannot know the owner's statistics in advance. The compiled kernel and the numpy
fallback give the same digest (tests/test_request_digest.py), so replicas agree whichever runs.
"""

from __future__ import annotations

import ctypes
import hashlib
from collections.abc import Sequence

import numpy as np

from kvevict.cache_manager import kernels
from kvevict.v1 import cache_manager_pb2 as pb

_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB

if kernels.numba is not None:
    numba = kernels.numba

    @numba.njit(numba.types.void(kernels._INDEX, kernels._INDEX, numba.types.uint64[::1]), **kernels._JIT)
    def _mixed_sums_kernel(addresses, words, out):
        for t in range(addresses.size):
            source = numba.carray(kernels._pointer(addresses[t]), (words[t],), np.uint64)
            seed = np.uint64(t)
            total = np.uint64(0)
            for i in range(words[t]):
                x = source[i] + (np.uint64(i) + seed) * np.uint64(_GOLDEN)
                x ^= x >> np.uint64(30)
                x *= np.uint64(_MIX1)
                x ^= x >> np.uint64(27)
                x *= np.uint64(_MIX2)
                x ^= x >> np.uint64(31)
                total += x
            out[t] = total


def mixed_sums(buffers: Sequence[bytes]) -> np.ndarray:
    """Each buffer's mixed sum over its whole 64-bit words (little-endian), seeded by its place
    in `buffers`: with the compiled kernel when it is enabled, else numpy (the same values)."""
    words = np.fromiter((len(b) // 8 for b in buffers), dtype=np.intp, count=len(buffers))
    out = np.zeros(len(buffers), np.uint64)
    if kernels.enabled and all(type(b) is bytes for b in buffers):
        cast, pointer = ctypes.cast, ctypes.c_void_p
        addresses = np.fromiter((cast(b, pointer).value or 0 for b in buffers), dtype=np.intp, count=len(buffers))
        _mixed_sums_kernel(addresses, words, out)
        return out
    for seed, (data, count) in enumerate(zip(buffers, words)):
        out[seed] = _numpy_mixed_sum(data, int(count), seed)
    return out


def _numpy_mixed_sum(data: bytes, words: int, seed: int) -> int:
    if words == 0:
        return 0
    with np.errstate(over="ignore"):
        x = np.frombuffer(data, dtype="<u8", count=words) + (
            np.arange(words, dtype=np.uint64) + np.uint64(seed)) * np.uint64(_GOLDEN)
        x ^= x >> np.uint64(30)
        x *= np.uint64(_MIX1)
        x ^= x >> np.uint64(27)
        x *= np.uint64(_MIX2)
        x ^= x >> np.uint64(31)
        return int(x.sum(dtype=np.uint64))


def report_digest(request: pb.ReportBlockRequest, statistics: Sequence[Sequence[bytes]] | None = None) -> str:
    """Hex digest of `request`. `statistics[k][layer]`, when given, is the data of each layer's
    k-th tensor as validation already read it (protobuf copies a bytes field on every access)."""
    session = request.session_id.encode()
    positions = request.positions
    # Every number of the request, each list led by its length, so no two requests share them.
    numbers = [len(session), request.sequence, request.phase, int(request.HasField("positions")),
               positions.dtype, len(positions.shape), *positions.shape, len(request.layers)]
    buffers: list[bytes] = []
    for index, layer in enumerate(request.layers):
        numbers += (layer.layer, layer.cache_length, len(layer.values))
        for k, tensor in enumerate(layer.values):
            data = statistics[k][index] if statistics is not None else tensor.data
            numbers += (tensor.dtype, len(tensor.shape), *tensor.shape, len(data))
            buffers.append(data)
    # Per-head reports' head lengths, each layer's list led by its length, after everything else
    # (self-delimiting): a report without any (every rectangular one) hashes as it always did.
    if any(layer.head_lengths for layer in request.layers):
        for layer in request.layers:
            numbers += (len(layer.head_lengths), *layer.head_lengths)
    head = hashlib.sha256(session)
    head.update(np.array(numbers, dtype=np.uint64).tobytes())  # uint64: a sequence may use all 64 bits
    head.update(positions.data)
    head.update(mixed_sums(buffers).tobytes())
    head.update(b"".join(data[len(data) - len(data) % 8:] for data in buffers))  # the words' leftovers
    return head.hexdigest()
