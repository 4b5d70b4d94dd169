"""Malformed input is an InvalidArgument naming the field, leaves the stored state byte for byte
unchanged, and a correct report still works afterwards."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from kvevict import wire
from kvevict.cache_manager import InMemoryStateStore, InvalidArgument, ManagerCore, ManagerError
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import tensor_pb2
from tests.test_manager_support import on_the_wire, open_request, start


def _set(**fields):
    def mutate(request: pb.OpenSessionRequest) -> None:
        for path, value in fields.items():
            message, name = request, path
            while "__" in name:
                head, name = name.split("__", 1)
                message = getattr(message, head)
            setattr(message, name, value)
    return mutate


OPEN_CASES = {
    "unknown base": (_set(policy__base="lru"), "policy.base"),
    "empty base": (_set(policy__base=""), "policy.base"),
    "unknown wrapper": (_set(policy__wrapper="caote2"), "policy.wrapper"),
    "zero budget": (_set(budget__tokens=0), "budget.tokens"),
    "unknown allocator": (_set(budget__allocator="adaptive"), "budget.allocator"),
    "no layers": (_set(geometry__num_layers=0), "geometry.num_layers"),
    "no kv heads": (_set(geometry__num_kv_heads=0), "geometry.num_kv_heads"),
    "no query heads": (_set(geometry__num_query_heads=0), "geometry.num_query_heads"),
    "no head dim": (_set(geometry__head_dim=0), "geometry.head_dim"),
    "absurdly many layers": (_set(geometry__num_layers=2**32 - 1), "geometry.num_layers"),
    "absurdly many kv heads": (_set(geometry__num_kv_heads=4096, geometry__num_query_heads=4096), "geometry.num_kv_heads"),
    "query heads not a multiple": (_set(geometry__num_query_heads=3), "geometry.num_query_heads"),
    "no geometry": (lambda r: r.ClearField("geometry"), "geometry.num_layers"),
    "zero block size": (_set(block_size=0), "block_size"),
    "int statistics": (_set(statistics_dtype=tensor_pb2.DTYPE_INT32), "statistics_dtype"),
    "even pool kernel": (_set(policy__base="snapkv", policy__window=4, policy__pool_kernel=4), "policy.pool_kernel"),
    "sinks fill the budget": (_set(policy__sink_tokens=24), "policy.sink_tokens"),
    "sink + recent fill the budget": (_set(policy__sink_tokens=4, policy__recent_tokens=20), "policy.recent_tokens"),
    "h2o half budget + sinks": (_set(policy__sink_tokens=12), "policy.recent_tokens"),
    "snapkv window over budget": (_set(policy__base="snapkv", policy__recent_tokens=32), "policy.recent_tokens"),
}


@pytest.mark.parametrize("case", OPEN_CASES)
def test_bad_open_requests_name_the_field(case: str) -> None:
    mutate, field = OPEN_CASES[case]
    request = open_request("h2o", budget=24)
    mutate(request)
    core = ManagerCore(InMemoryStateStore())
    with pytest.raises(InvalidArgument) as raised:
        core.open_session(request)
    assert raised.value.field == field
    assert str(raised.value).startswith(f"{field}: ")
    assert len(core.store) == 0


def test_negative_budgets_cannot_be_encoded() -> None:
    with pytest.raises(ValueError):
        pb.BudgetSpec(tokens=-1)


# --- ReportBlock -----------------------------------------------------------------------------

def _values(request: pb.ReportBlockRequest, layer: int, k: int) -> np.ndarray:
    return wire.decode(request.layers[layer].values[k], "x").copy()


def _put(request: pb.ReportBlockRequest, layer: int, k: int, array: np.ndarray) -> None:
    """Replaces a statistic by `array` in the statistic's own wire dtype."""
    tensor, _ = on_the_wire(array, request.layers[layer].values[k].dtype)
    request.layers[layer].values[k].CopyFrom(tensor)


def _poke(layer: int, k: int, value: float) -> Callable[[pb.ReportBlockRequest], None]:
    def mutate(request):
        array = _values(request, layer, k)
        array[1, 3] = value
        _put(request, layer, k, array)
    return mutate


def _positions(array) -> Callable[[pb.ReportBlockRequest], None]:
    return lambda request: request.positions.CopyFrom(wire.encode(np.asarray(array)))


def _swap_layers(request):
    first, second = pb.LayerStatistics(), pb.LayerStatistics()
    first.CopyFrom(request.layers[0])
    second.CopyFrom(request.layers[1])
    request.layers[0].CopyFrom(second)
    request.layers[1].CopyFrom(first)


def _truncate(request):
    request.layers[2].values[0].data = request.layers[2].values[0].data[:-2]


def _reshape(request):
    array = _values(request, 1, 1)
    _put(request, 1, 1, array.reshape(array.shape[1], array.shape[0]))


# The session has 2 reports of 10 tokens (budget 12): positions 0..19 reported, caches of 12.
REPORT_CASES = {
    "missing phase": (lambda r: r.ClearField("phase"), "phase"),
    "sequence 0 on a fresh session": (None, "sequence"),
    "missing positions": (lambda r: r.ClearField("positions"), "positions"),
    "int32 positions": (_positions(np.arange(20, 24, dtype=np.int32)), "positions.dtype"),
    "2-D positions": (_positions(np.arange(20, 24).reshape(2, 2)), "positions.shape"),
    "short positions bytes": (lambda r: setattr(r.positions, "data", r.positions.data[:-1]), "positions.data"),
    "no new tokens": (_positions(np.zeros(0, np.int64)), "positions"),
    "non-increasing positions": (_positions(np.array([20, 22, 22, 23])), "positions"),
    "decreasing positions": (_positions(np.array([23, 22, 21, 20])), "positions"),
    "positions already reported": (_positions(np.arange(19, 23)), "positions"),
    "negative positions": (_positions(np.arange(-4, 0)), "positions"),
    "one layer missing": (lambda r: r.layers.pop(), "layers"),
    "one layer too many": (lambda r: r.layers.add().CopyFrom(r.layers[0]), "layers"),
    "layers out of order": (_swap_layers, "layers[0].layer"),
    "wrong cache length": (lambda r: setattr(r.layers[1], "cache_length", 17), "layers[1].cache_length"),
    "a statistic missing": (lambda r: r.layers[2].values.pop(), "layers[2].values"),
    "wrong dtype": (lambda r: r.layers[1].values[0].CopyFrom(wire.encode(_values(r, 1, 0).astype(np.float32))),
                    "layers[1].values[0].dtype"),
    "wrong shape": (_reshape, "layers[1].values[1].shape"),
    "wrong byte length": (_truncate, "layers[2].values[0].data"),
    "NaN": (_poke(1, 0, np.nan), "layers[1].values[0]"),
    "Inf": (_poke(0, 1, np.inf), "layers[0].values[1]"),
    "-Inf": (_poke(2, 1, -np.inf), "layers[2].values[1]"),
    "negative attention": (_poke(2, 0, -0.5), "layers[2].values[0]"),
    "negative value deviation": (_poke(0, 1, -1.0), "layers[0].values[1]"),
}


@pytest.mark.parametrize("case", REPORT_CASES)
def test_bad_reports_name_the_field_and_leave_state_unchanged(case: str) -> None:
    mutate, field = REPORT_CASES[case]
    session = start(open_request("h2o", "caote", budget=12, sink=1), seed=len(case))
    if mutate is not None:
        session.report(10)
        session.report(10)
    good, _ = session.build(4)
    bad = pb.ReportBlockRequest.FromString(good.SerializeToString())
    if mutate is None:
        bad.sequence = 0  # before any report: neither a retry nor the next one
    else:
        mutate(bad)
    before = session.state_bytes()
    with pytest.raises(InvalidArgument) as raised:
        session.core.report_block(bad)
    assert raised.value.field == field, str(raised.value)
    assert str(raised.value).startswith(f"{field}: ")
    assert isinstance(raised.value, ManagerError)
    assert session.state_bytes() == before
    response = session.core.report_block(good)
    session.apply(good, response)
    assert response.sequence == good.sequence
    if mutate is not None:
        assert response.evicted_tokens == 4 * 3 * 2  # 16 cached, budget 12, 3 layers, 2 KV heads
