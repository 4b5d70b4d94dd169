"""The request digest a decision is stored with: every field of a report changes it, any bit of
its statistics changes it, the bytes validation already read give the same digest as the
request's own, and the compiled kernel and the numpy fallback agree (replicas must)."""

from __future__ import annotations

import numpy as np
import pytest

from kvevict.cache_manager import kernels
from kvevict.cache_manager.request_digest import _numpy_mixed_sum, mixed_sums, report_digest
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import tensor_pb2
from tests.test_manager_support import open_request, start

# Every field of the messages a report is made of, and how the test changes it: a field added
# to the proto and not listed here fails the completeness test below.
FIELDS = {
    "ReportBlockRequest": ("session_id", "sequence", "phase", "positions", "layers"),
    "LayerStatistics": ("layer", "cache_length", "values", "head_lengths"),
    "Tensor": ("dtype", "shape", "data"),
}


def report() -> pb.ReportBlockRequest:
    session = start(open_request("h2o", "caote", budget=12, sink=1), seed=7)
    session.report(10)
    request, _ = session.build(5)
    return request


def test_every_field_of_the_report_messages_is_listed() -> None:
    for message in (pb.ReportBlockRequest, pb.LayerStatistics, tensor_pb2.Tensor):
        assert tuple(f.name for f in message.DESCRIPTOR.fields) == FIELDS[message.DESCRIPTOR.name]


def mutations(request: pb.ReportBlockRequest):
    """(what changed, a copy of `request` with one field changed), for every field."""
    def copy() -> pb.ReportBlockRequest:
        changed = pb.ReportBlockRequest()
        changed.CopyFrom(request)
        return changed

    def tensor_mutations(path: str, get):
        for name, change in (("dtype", lambda t: setattr(t, "dtype", t.dtype + 1)),
                             ("shape", lambda t: t.shape.__setitem__(0, t.shape[0] + 1)),
                             ("data", lambda t: setattr(t, "data", t.data[:-1] + bytes([t.data[-1] ^ 1])))):
            changed = copy()
            change(get(changed))
            yield f"{path}.{name}", changed

    changed = copy()
    changed.session_id += "x"
    yield "session_id", changed
    changed = copy()
    changed.sequence += 1
    yield "sequence", changed
    changed = copy()
    changed.phase = pb.PHASE_DECODE if request.phase == pb.PHASE_PREFILL else pb.PHASE_PREFILL
    yield "phase", changed
    yield from tensor_mutations("positions", lambda r: r.positions)
    changed = copy()
    changed.ClearField("positions")
    yield "positions (absent)", changed
    changed = copy()
    del changed.layers[-1]
    yield "layers (one fewer)", changed
    for name in ("layer", "cache_length"):
        changed = copy()
        setattr(changed.layers[1], name, getattr(changed.layers[1], name) + 1)
        yield f"layers[1].{name}", changed
    changed = copy()
    del changed.layers[1].values[-1]
    yield "layers[1].values (one fewer)", changed
    yield from tensor_mutations("layers[1].values[0]", lambda r: r.layers[1].values[0])
    changed = copy()
    changed.layers[1].head_lengths.append(1)
    yield "layers[1].head_lengths (one more)", changed
    changed = copy()  # the same bytes in another place
    first, second = changed.layers[0].values[0].data, changed.layers[0].values[1].data
    changed.layers[0].values[0].data, changed.layers[0].values[1].data = second, first
    yield "layers[0].values swapped", changed


def test_changing_any_field_changes_the_digest() -> None:
    request = report()
    digest = report_digest(request)
    assert report_digest(pb.ReportBlockRequest.FromString(request.SerializeToString())) == digest
    seen = {digest}
    for what, changed in mutations(request):
        changed_digest = report_digest(changed)
        assert changed_digest not in seen, what
        seen.add(changed_digest)


def test_any_bit_of_the_statistics_changes_the_digest() -> None:
    request = report()
    digest = report_digest(request)
    rng = np.random.default_rng(0)
    for _ in range(200):
        changed = pb.ReportBlockRequest()
        changed.CopyFrom(request)
        tensor = changed.layers[int(rng.integers(len(changed.layers)))].values[int(rng.integers(2))]
        data = bytearray(tensor.data)
        bit = int(rng.integers(len(data) * 8))
        data[bit // 8] ^= 1 << (bit % 8)
        tensor.data = bytes(data)
        assert report_digest(changed) != digest


def test_the_bytes_validation_read_give_the_requests_digest() -> None:
    request = report()
    statistics = tuple(tuple(layer.values[k].data for layer in request.layers) for k in range(2))
    assert report_digest(request, statistics) == report_digest(request)


@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 15, 16, 1000, 4096 * 8 + 5])
def test_the_compiled_and_numpy_mixed_sums_agree(size: int) -> None:
    if not kernels.enabled:
        pytest.skip("numba is not installed (or KVEVICT_KERNELS=0)")
    rng = np.random.default_rng(size)
    buffers = [rng.integers(0, 256, size + extra, dtype=np.uint8).tobytes() for extra in (0, 3, 11)]
    expected = [_numpy_mixed_sum(data, len(data) // 8, seed) for seed, data in enumerate(buffers)]
    assert mixed_sums(buffers).tolist() == expected
    assert mixed_sums([bytearray(b) for b in buffers]).tolist() == expected  # the numpy path


def test_the_mixed_sum_depends_on_each_words_place_and_each_buffers() -> None:
    words = np.arange(1, 65, dtype=np.uint64)
    data, swapped = words.tobytes(), words[[1, 0, *range(2, 64)]].tobytes()
    first, second = mixed_sums([data, swapped])
    assert first != second
    assert len(set(mixed_sums([data, data]).tolist())) == 2  # the same bytes elsewhere: another sum


def test_head_lengths_count_where_they_stand() -> None:
    """A per-head report's head lengths: moved between heads or layers, another digest; a
    report without any hashes as one never had the field."""
    request = report()
    plain = report_digest(request)
    variants = {}
    for name, lengths in (("first", [[2, 3], [], []]), ("swapped", [[3, 2], [], []]),
                          ("next layer", [[], [2, 3], []]), ("split", [[2], [3], []]), ("joined", [[23], [], []])):
        changed = pb.ReportBlockRequest()
        changed.CopyFrom(request)
        for layer, heads in zip(changed.layers, lengths):
            layer.head_lengths[:] = heads
        variants[name] = report_digest(changed)
    assert len(set(variants.values()) | {plain}) == len(variants) + 1
    cleared = pb.ReportBlockRequest()
    cleared.CopyFrom(request)
    cleared.layers[0].head_lengths[:] = [1]
    del cleared.layers[0].head_lengths[:]
    assert report_digest(cleared) == plain
