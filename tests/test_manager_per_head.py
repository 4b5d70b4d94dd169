"""Per-head sessions in the manager (allocators adahead, global, lukv; and epicache, per layer):
keep masks decision by decision against a brute force that scores each KV head on its own from
the statistics as the wire delivers them (bfloat16 / float16), allocates by sorting everything
and keeps the protected tokens plus the top; exact totals, floors, every head's order, the state
through to_bytes / from_bytes and Redis, validation field by field, GetSession, fail-open
adoption, retries, and epicache's budgets."""

from __future__ import annotations

import asyncio
import json
import math

import numpy as np
import pytest

from kvevict import wire
from kvevict.cache_manager import InMemoryStateStore, InvalidArgument, ManagerCore, SessionState
from kvevict.cache_manager.errors import FailedPrecondition, ResourceExhausted
from kvevict.cache_manager.head_budgets import HeadProfile, epicache_budgets
from kvevict.cache_manager.metrics import ManagerMetrics
from kvevict.cache_manager.policies import make_base
from kvevict.cache_manager.redis_store import RedisStateStore
from kvevict.cache_manager.registry import describe_policies
from kvevict.cache_manager.service import AsyncManagerCore
from kvevict.cache_manager.settings import MAX_PROFILE_BYTES
from kvevict.cache_manager.statistics import StatisticRequirement
from kvevict.cache_manager.transitions import _bytes_at_budget, adopt_session, open_session, report_step
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import tensor_pb2
from tests.test_manager_support import (Session, on_the_wire, open_request, random_statistic, reference_caote,
                                        reference_max_pool)

LAYERS, HEADS = 3, 2
GRID = tuple([0.0] + [2.0 ** (-k / 2) for k in range(8, -1, -1)])


def half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def make_profile(layers: int = LAYERS, heads: int = HEADS, seed: int = 0, sensitivity: bool = True) -> HeadProfile:
    """A profile as `kvevict profile` writes it: rising curves of varying concentration."""
    rng = np.random.default_rng(seed)
    steps = rng.exponential(1.0, (layers, heads, len(GRID) - 1)) ** rng.uniform(0.5, 3.0, (layers, heads, 1))
    curves = np.concatenate([np.zeros((layers, heads, 1)), np.cumsum(steps, axis=-1)], axis=-1)
    curves /= curves[..., -1].sum()
    similarity = tuple(np.round(1.0 - rng.uniform(0.0, 0.3, layers), 6)) if sensitivity else ()
    profile = HeadProfile(model="tiny", grid=GRID, curves=curves, sensitivity=similarity)
    return HeadProfile.from_json(json.loads(json.dumps(profile.to_json())))  # as the file holds it


def profile_bytes(profile: HeadProfile) -> bytes:
    return json.dumps(profile.to_json(), separators=(",", ":")).encode()


def per_head_request(base: str = "h2o", wrapper: str = "", allocator: str = "adahead", budget: int = 8,
                     sink: int = 1, recent: int = 2, floor: float | None = None, profile: bytes = b"",
                     dtype: int = tensor_pb2.DTYPE_UNSPECIFIED, **geometry: int) -> pb.OpenSessionRequest:
    request = open_request(base, wrapper, budget=budget, sink=sink, recent=recent, allocator=allocator, dtype=dtype,
                           **{"num_layers": LAYERS, "num_kv_heads": HEADS, **geometry})
    if floor is not None:
        request.budget.floor = floor
    if allocator == "lukv" and not profile:
        profile = profile_bytes(make_profile(request.geometry.num_layers, request.geometry.num_kv_heads))
    request.budget.profile = profile
    return request


# --- the brute force ------------------------------------------------------------------------


class Reference:
    """The test's own per-head session: positions and (h2o) accumulators per (layer, head), each
    head scored alone from the decoded statistics, budgets by sorting, masks by sorting."""

    def __init__(self, request: pb.OpenSessionRequest, opened: pb.OpenSessionResponse) -> None:
        self.request = request
        self.layers, self.heads = request.geometry.num_layers, request.geometry.num_kv_heads
        self.base, self.wrapper = request.policy.base, request.policy.wrapper
        self.allocator = request.budget.allocator
        self.tokens = request.budget.tokens
        self.sink, self.recent = request.policy.sink_tokens, request.policy.recent_tokens
        self.alpha = request.budget.floor if request.budget.HasField("floor") else 0.2
        self.profile = HeadProfile.from_json(json.loads(request.budget.profile)) if request.budget.profile else None
        self.requirements = [StatisticRequirement(r.statistic, r.window, r.reference, r.pool_kernel)
                             for r in opened.statistics]
        self.positions = [[np.zeros(0, np.int64) for _ in range(self.heads)] for _ in range(self.layers)]
        self.accumulators = [[np.zeros(0, np.float32) for _ in range(self.heads)] for _ in range(self.layers)]

    def lengths(self) -> np.ndarray:
        return np.array([[p.size for p in layer] for layer in self.positions])

    def statistic(self, rows: dict[int, np.ndarray], statistic: int) -> np.ndarray:
        return next(row for req, row in zip(self.requirements, rows.values()) if req.statistic == statistic)

    def head_score(self, layer: int, head: int, rows: list[np.ndarray]) -> np.ndarray:
        """The policy's score of one head alone, written out from the statistics."""
        by_statistic = {req.statistic: row for req, row in zip(self.requirements, rows)}
        if self.base == "h2o":
            h = self.accumulators[layer][head]
        elif self.base == "snapkv":
            h = reference_max_pool(by_statistic[pb.STATISTIC_ATTN_WINDOW], 7)
        elif self.base == "tova":
            h = by_statistic[pb.STATISTIC_ATTN_WINDOW]
        elif self.base == "laprox":
            h = reference_max_pool(by_statistic[pb.STATISTIC_QUERY_PROJECTED_ERROR], make_base("laprox").pool_kernel)
        else:
            raise AssertionError(self.base)
        if self.wrapper == "caote":
            return reference_caote(h, by_statistic[pb.STATISTIC_VALUE_DEV_EXCLUDED])
        return np.asarray(h, dtype=np.float64)

    def protected(self, n: int) -> set[int]:
        return {c for c in range(n) if c < self.sink or c >= n - self.recent}

    def floor(self, n: int) -> int:
        return min(n, max(half_up(self.alpha * self.tokens), min(n, self.sink + self.recent)))

    def budgets(self, scores: list[list[np.ndarray]]) -> np.ndarray:
        lengths = self.lengths()
        if self.allocator == "lukv":
            return self.profile.lukv(self.tokens, lengths, self.sink, self.recent, self.alpha)
        groups = [[layer] for layer in range(self.layers)] if self.allocator == "adahead" else [list(range(self.layers))]
        budgets = np.zeros((self.layers, self.heads), dtype=int)
        for group in groups:
            rest, used = [], 0
            total = min(len(group) * self.heads * self.tokens, int(lengths[group].sum()))
            for layer in group:
                for head in range(self.heads):
                    score, n = scores[layer][head], lengths[layer, head]
                    protected = self.protected(n)
                    middle = sorted((-float(score[c]), -c) for c in range(n) if c not in protected)
                    floor = self.floor(n)
                    rest += [(v, c, layer, head) for v, c in middle[floor - len(protected):]]
                    budgets[layer, head] = floor
                    used += floor
            for _, _, layer, head in sorted(rest)[:total - used]:
                budgets[layer, head] += 1
        return budgets

    def mask(self, score: np.ndarray, budget: int) -> np.ndarray:
        n = score.size
        keep = np.zeros(n, dtype=bool)
        protected = self.protected(n)
        keep[list(protected)] = True
        middle = sorted((c for c in range(n) if c not in protected), key=lambda c: (-float(score[c]), -c))
        keep[middle[:budget - len(protected)]] = True
        return keep

    def decide(self, new: np.ndarray, rows: list[list[list[np.ndarray]]]):
        """Appends `new` to every head, then (budgets, per layer per head keep masks)."""
        for layer in range(self.layers):
            for head in range(self.heads):
                self.positions[layer][head] = np.concatenate([self.positions[layer][head], new])
                if self.base == "h2o":
                    attention = next(row for req, row in zip(self.requirements, rows[layer][head])
                                     if req.statistic == pb.STATISTIC_ATTN_SUM)
                    total = attention.astype(np.float32).copy()
                    total[:self.accumulators[layer][head].size] += self.accumulators[layer][head]
                    self.accumulators[layer][head] = total
        scores = [[self.head_score(layer, head, rows[layer][head]) for head in range(self.heads)]
                  for layer in range(self.layers)]
        budgets = self.budgets(scores)
        masks = [[self.mask(scores[layer][head], int(budgets[layer, head])) for head in range(self.heads)]
                 for layer in range(self.layers)]
        for layer in range(self.layers):
            for head in range(self.heads):
                keep = masks[layer][head]
                self.positions[layer][head] = self.positions[layer][head][keep]
                if self.base == "h2o":
                    self.accumulators[layer][head] = self.accumulators[layer][head][keep]
        return budgets, masks


# --- a per-head worker double ---------------------------------------------------------------


class PerHeadSession:
    """Drives a per-head session through a ManagerCore as the worker would: every head's
    statistics at its own length, on the wire in the negotiated dtype."""

    def __init__(self, request: pb.OpenSessionRequest, seed: int = 0, core: ManagerCore | None = None) -> None:
        self.core = core or ManagerCore(InMemoryStateStore())
        self.request = request
        self.opened = self.core.open_session(request)
        self.rng = np.random.default_rng(seed)
        self.layers, self.heads = request.geometry.num_layers, request.geometry.num_kv_heads
        self.lengths = np.zeros((self.layers, self.heads), dtype=int)
        self.sequence = 0
        self.next_position = 0

    @property
    def id(self) -> str:
        return self.opened.session_id

    def build(self, new_tokens: int, phase: int = pb.PHASE_PREFILL, weights: np.ndarray | None = None,
              scaled: tuple[int, ...] = ()):
        """The next report and, per layer and head, the decoded rows the manager will see;
        `weights` (heads,) scales each head's statistics of the kinds in `scaled` (one head
        dominating)."""
        new = np.arange(self.next_position, self.next_position + new_tokens, dtype=np.int64)
        request = pb.ReportBlockRequest(session_id=self.id, sequence=self.sequence + 1, phase=phase,
                                        positions=wire.encode(new))
        rows = []
        for layer in range(self.layers):
            lengths = self.lengths[layer] + new_tokens
            tensors, decoded = [], []
            for req in self.opened.statistics:
                scale = weights if weights is not None and req.statistic in scaled else np.ones(self.heads)
                values = np.concatenate([random_statistic(self.rng, req.statistic, (1, int(n)))[0] * w
                                         for n, w in zip(lengths, scale)])
                tensor, seen = on_the_wire(values, req.dtype)
                tensors.append(tensor)
                decoded.append(np.split(seen, np.cumsum(lengths)[:-1]))
            request.layers.add(layer=layer, cache_length=int(lengths.sum()), values=tensors,
                               head_lengths=lengths.tolist())
            rows.append([[d[head] for d in decoded] for head in range(self.heads)])
        return request, new, rows

    def apply(self, request: pb.ReportBlockRequest, response: pb.ReportBlockResponse) -> list[list[np.ndarray] | None]:
        new_tokens = len(wire.decode(request.positions, "positions"))
        self.lengths = self.lengths + new_tokens
        masks: list[list[np.ndarray] | None] = [None] * self.layers
        for keep in response.keeps:
            bits = wire.decode_bits(keep.keep, "keep")
            assert bits.shape == (sum(keep.head_lengths),) and list(keep.head_lengths) == self.lengths[keep.layer].tolist()
            masks[keep.layer] = np.split(bits, np.cumsum(keep.head_lengths)[:-1])
            self.lengths[keep.layer] = list(keep.head_kept)
        self.sequence = request.sequence
        self.next_position += new_tokens
        return masks


ATTENTION = (pb.STATISTIC_ATTN_SUM, pb.STATISTIC_ATTN_WINDOW)
SCHEDULE = ((9, pb.PHASE_PREFILL), (8, pb.PHASE_PREFILL), (5, pb.PHASE_PREFILL)) + ((1, pb.PHASE_DECODE),) * 5


def run_against_reference(request: pb.OpenSessionRequest, seed: int = 0, schedule=SCHEDULE,
                          weights: np.ndarray | None = None, scaled: tuple[int, ...] = ATTENTION) -> PerHeadSession:
    session = PerHeadSession(request, seed=seed)
    reference = Reference(request, session.opened)
    tokens = request.budget.tokens
    for new_tokens, phase in schedule:
        report, new, rows = session.build(new_tokens, phase, weights, scaled)
        before = session.lengths + new_tokens
        response = session.core.report_block(report)
        masks = session.apply(report, response)
        budgets, expected = reference.decide(new, rows)
        assert list(response.head_budgets) == budgets.ravel().tolist()
        assert list(response.layer_budgets) == budgets.sum(axis=1).tolist()
        for layer in range(reference.layers):
            want = expected[layer]
            if all(m.all() for m in want):
                assert masks[layer] is None, f"layer {layer} keeps everything but got a LayerKeep"
                continue
            assert masks[layer] is not None
            for head in range(reference.heads):
                assert np.array_equal(masks[layer][head], want[head]), (layer, head, report.sequence)
        kept = np.array([[m.sum() for m in layer] for layer in expected])
        assert response.evicted_tokens == int((before - kept).sum())
        assert (session.lengths == kept).all() and (kept == budgets).all()
        # Exact totals and floors.
        if request.budget.allocator == "adahead":
            assert (budgets.sum(axis=1) == np.minimum(tokens * reference.heads, before.sum(axis=1))).all()
        else:
            assert budgets.sum() == min(tokens * reference.layers * reference.heads, int(before.sum()))
        floors = np.vectorize(reference.floor)(before)
        assert (budgets >= floors).all()
        # The manager tracks exactly the reference's positions, each head in order.
        state = session.core.store.get(session.id)
        for layer in range(reference.layers):
            for head in range(reference.heads):
                tracked = state.positions[layer * reference.heads + head]
                assert tracked.shape == (1, reference.positions[layer][head].size)
                assert np.array_equal(tracked[0], reference.positions[layer][head])
                assert (np.diff(tracked[0]) > 0).all()
        restored = SessionState.from_bytes(state.to_bytes())
        assert restored.to_bytes() == state.to_bytes()
    return session


MATRIX = ([("adahead", base, wrapper) for base, wrapper in
           (("h2o", ""), ("snapkv", ""), ("tova", ""), ("h2o", "caote"), ("snapkv", "caote"))]
          + [("global", base, wrapper) for base, wrapper in (("h2o", "caote"), ("snapkv", "caote"), ("laprox", ""))]
          + [("lukv", base, wrapper) for base, wrapper in
             (("h2o", ""), ("snapkv", ""), ("tova", ""), ("h2o", "caote"), ("snapkv", "caote"))])


@pytest.mark.parametrize("allocator, base, wrapper", MATRIX)
def test_keep_masks_equal_the_brute_force_report_after_report(allocator: str, base: str, wrapper: str) -> None:
    run_against_reference(per_head_request(base, wrapper, allocator), seed=hash((allocator, base, wrapper)) % 1000)


@pytest.mark.parametrize("allocator", ["adahead", "global", "lukv"])
def test_float16_statistics_four_heads_and_an_explicit_floor(allocator: str) -> None:
    request = per_head_request("h2o", "caote", allocator, budget=10, sink=2, recent=1, floor=0.5,
                               dtype=tensor_pb2.DTYPE_FLOAT16, num_kv_heads=4, num_query_heads=8)
    run_against_reference(request, seed=3, schedule=((12, pb.PHASE_PREFILL), (7, pb.PHASE_PREFILL))
                          + ((2, pb.PHASE_DECODE),) * 3)


@pytest.mark.parametrize("allocator", ["adahead", "global"])
def test_the_floor_holds_a_head_that_scores_nothing(allocator: str) -> None:
    # Head 1's attention is a thousandth of head 0's: above the floor, head 0 takes everything.
    base = "laprox" if allocator == "global" else "h2o"
    request = per_head_request(base, "", allocator, budget=10, floor=0.5)
    # laprox scores its projected error: scale that instead of the attention.
    scaled = (pb.STATISTIC_QUERY_PROJECTED_ERROR,) if allocator == "global" else ATTENTION
    session = run_against_reference(request, seed=11, weights=np.array([1.0, 1e-3]), scaled=scaled)
    assert session.lengths[:, 1].tolist() == [5] * LAYERS  # round(0.5 x 10), above the 3 protected
    if allocator == "adahead":
        assert session.lengths[:, 0].tolist() == [15] * LAYERS
    else:  # one total over the model: the head 0s share what the floors leave
        assert session.lengths[:, 0].sum() == 10 * HEADS * LAYERS - 5 * LAYERS


def test_a_zero_floor_lets_a_head_drop_to_its_protected_tokens() -> None:
    request = per_head_request("h2o", "", "adahead", budget=10, floor=0.0)
    session = run_against_reference(request, seed=11, weights=np.array([1.0, 1e-3]))
    assert session.lengths[:, 1].tolist() == [3] * LAYERS  # sink 1 + recent 2


# --- open, GetSession, metrics, ListPolicies ------------------------------------------------


def test_open_announces_a_per_head_session() -> None:
    opened = ManagerCore(InMemoryStateStore()).open_session(per_head_request("snapkv", allocator="adahead"))
    assert opened.per_head_budgets and opened.report_every_block  # snapkv alone would not report every block
    assert list(opened.head_budgets) == [8] * (LAYERS * HEADS)
    assert list(opened.layer_budgets) == [8 * HEADS] * LAYERS
    rectangular = ManagerCore(InMemoryStateStore()).open_session(open_request("snapkv", budget=8, sink=1, recent=2))
    assert not rectangular.per_head_budgets and not rectangular.head_budgets


def test_get_session_reports_head_budgets_and_lengths() -> None:
    session = run_against_reference(per_head_request("h2o", allocator="adahead"), seed=5)
    info = session.core.get_session(pb.GetSessionRequest(session_id=session.id))
    state = session.core.store.get(session.id)
    assert list(info.head_budgets) == list(state.head_budgets)
    assert list(info.head_cache_lengths) == session.lengths.ravel().tolist()
    assert list(info.cache_lengths) == session.lengths.sum(axis=1).tolist()
    assert list(info.layer_budgets) == np.reshape(info.head_budgets, (LAYERS, HEADS)).sum(axis=1).tolist()
    assert info.budget.allocator == "adahead" and info.budget.floor == pytest.approx(0.2)
    assert not info.budget.profile
    assert info.reports == len(SCHEDULE)


def test_the_head_budget_ratio_histogram_counts_every_head() -> None:
    metrics = ManagerMetrics()
    session = PerHeadSession(per_head_request("h2o", allocator="adahead"), seed=2)
    for new_tokens in (12, 6):
        request, _, _ = session.build(new_tokens)
        step = report_step(request)
        response = session.core.store.update(session.id, step)
        session.apply(request, response)
        metrics.report_answered(request, step.decision)
    ratios = np.asarray(response.head_budgets) / 8
    assert metrics.registry.get_sample_value("kvevict_manager_head_budget_ratio_count") == 2 * LAYERS * HEADS
    assert metrics.registry.get_sample_value("kvevict_manager_head_budget_ratio_bucket", {"le": "10.0"}) == \
        2 * LAYERS * HEADS
    assert metrics.registry.get_sample_value("kvevict_manager_tokens_kept_total", {"layer": "0"}) > 0
    assert ratios.max() > 1 > ratios.min()  # the heads got different shares


def test_list_policies_offers_the_four_allocators_with_their_options() -> None:
    allocators = {info.name: info for info in describe_policies() if info.kind == "allocator"}
    for name, floor, profile in (("adahead", "0.2", False), ("global", "0.2", False), ("lukv", "0.2", True),
                                 ("epicache", "0.25", True)):
        options = {o.name: o.default for o in allocators[name].options}
        assert options["floor"] == floor and ("profile" in options) == profile


# --- validation -----------------------------------------------------------------------------


def _second_report(mutate, request: pb.OpenSessionRequest | None = None) -> InvalidArgument:
    session = PerHeadSession(request or per_head_request("h2o", "caote", "adahead"), seed=1)
    report, _, _ = session.build(12)
    session.apply(report, session.core.report_block(report))
    report, _, _ = session.build(3)
    mutate(report)
    with pytest.raises(InvalidArgument) as error:
        session.core.report_block(report)
    return error.value


def _set_float(tensor: tensor_pb2.Tensor, value: float) -> None:
    values = wire.decode(tensor, "t").astype(np.float32).copy()
    values[1] = value
    tensor.CopyFrom(wire.encode_bfloat16(values) if tensor.dtype == tensor_pb2.DTYPE_BFLOAT16 else wire.encode(values))


REPORT_ERRORS = {
    "too few head lengths": (lambda r: r.layers[1].head_lengths.pop(), "layers[1].head_lengths"),
    "too many head lengths": (lambda r: r.layers[0].head_lengths.append(3), "layers[0].head_lengths"),
    "a wrong head length": (lambda r: (r.layers[2].head_lengths.__setitem__(0, r.layers[2].head_lengths[0] + 1),
                                       setattr(r.layers[2], "cache_length", r.layers[2].cache_length + 1)),
                            "layers[2].head_lengths"),
    "lengths moved between heads": (lambda r: (r.layers[0].head_lengths.__setitem__(0, r.layers[0].head_lengths[0] + 1),
                                               r.layers[0].head_lengths.__setitem__(1, r.layers[0].head_lengths[1] - 1)),
                                    "layers[0].head_lengths"),
    "cache length not the sum": (lambda r: setattr(r.layers[1], "cache_length", r.layers[1].cache_length - 1),
                                 "layers[1].cache_length"),
    "a tensor of another size": (lambda r: r.layers[1].values[0].shape.__setitem__(0, r.layers[1].values[0].shape[0] - 1),
                                 "layers[1].values[0].shape"),
    "a rectangular tensor": (lambda r: (r.layers[0].values[0].shape.__setitem__(0, r.layers[0].cache_length // 2),
                                        r.layers[0].values[0].shape.append(2)), "layers[0].values[0].shape"),
    "data short of its shape": (lambda r: setattr(r.layers[2].values[1], "data", r.layers[2].values[1].data[:-2]),
                                "layers[2].values[1].data"),
    "a wrong dtype": (lambda r: setattr(r.layers[0].values[1], "dtype", tensor_pb2.DTYPE_FLOAT32),
                      "layers[0].values[1].dtype"),
    "a NaN": (lambda r: _set_float(r.layers[1].values[0], float("nan")), "layers[1].values[0]"),
    "an infinity": (lambda r: _set_float(r.layers[2].values[1], float("inf")), "layers[2].values[1]"),
    "a negative attention": (lambda r: _set_float(r.layers[0].values[0], -1.0), "layers[0].values[0]"),
    "too few tensors": (lambda r: r.layers[1].values.pop(), "layers[1].values"),
    "layers out of order": (lambda r: setattr(r.layers[1], "layer", 2), "layers[1].layer"),
    "a layer missing": (lambda r: r.layers.pop(), "layers"),
}


@pytest.mark.parametrize("case", list(REPORT_ERRORS))
def test_a_malformed_per_head_report_names_its_field(case: str) -> None:
    mutate, field = REPORT_ERRORS[case]
    assert _second_report(mutate).field == field


def test_a_refused_report_leaves_the_state_as_it_was() -> None:
    session = PerHeadSession(per_head_request("h2o", allocator="lukv"), seed=4)
    report, _, _ = session.build(12)
    session.apply(report, session.core.report_block(report))
    before = session.core.store.get(session.id).to_bytes()
    report, _, _ = session.build(2)
    report.layers[0].head_lengths[0] += 1
    with pytest.raises(InvalidArgument):
        session.core.report_block(report)
    assert session.core.store.get(session.id).to_bytes() == before


def test_a_rectangular_session_refuses_head_lengths() -> None:
    core = ManagerCore(InMemoryStateStore())
    opened = core.open_session(open_request("h2o", budget=8, sink=1, recent=2))
    session = Session(core, opened, np.random.default_rng(0))
    report, _ = session.build(4)
    report.layers[2].head_lengths.extend([4, 4])
    with pytest.raises(InvalidArgument) as error:
        core.report_block(report)
    assert error.value.field == "layers[2].head_lengths"


def _oversize_profile() -> bytes:
    text = profile_bytes(make_profile())
    return text[:-1] + b',"settings":{"pad":"' + b"x" * MAX_PROFILE_BYTES + b'"}}'


OPEN_ERRORS = {
    "sliding windows": (dict(allocator="adahead", sliding_windows=[0, 4, 0]), "budget.allocator"),
    "global over h2o": (dict(allocator="global", base="h2o"), "budget.allocator"),
    "global over snapkv": (dict(allocator="global", base="snapkv"), "budget.allocator"),
    "lukv without a profile": (dict(allocator="lukv", profile=b"-"), "budget.profile"),
    "lukv, malformed profile": (dict(allocator="lukv", profile=b"{not json"), "budget.profile"),
    "lukv, not a profile": (dict(allocator="lukv", profile=b'{"format": "other"}'), "budget.profile"),
    "lukv, binary profile": (dict(allocator="lukv", profile=b"\xff\xfe"), "budget.profile"),
    "lukv, oversize profile": (dict(allocator="lukv", profile=_oversize_profile()), "budget.profile"),
    "lukv, other layers": (dict(allocator="lukv", profile=profile_bytes(make_profile(layers=4))), "budget.profile"),
    "lukv, other heads": (dict(allocator="lukv", profile=profile_bytes(make_profile(heads=1))), "budget.profile"),
    "epicache without a profile": (dict(allocator="epicache", profile=b"-"), "budget.profile"),
    "epicache without sensitivity": (dict(allocator="epicache", profile=profile_bytes(make_profile(sensitivity=False))),
                                     "budget.profile"),
    "a profile for adahead": (dict(allocator="adahead", profile=profile_bytes(make_profile())), "budget.profile"),
    "a profile for uniform": (dict(allocator="", profile=profile_bytes(make_profile())), "budget.profile"),
    "a floor above 1": (dict(allocator="adahead", floor=1.5), "budget.floor"),
    "a negative floor": (dict(allocator="lukv", floor=-0.1), "budget.floor"),
    "a NaN floor": (dict(allocator="global", base="laprox", floor=float("nan")), "budget.floor"),
    "a floor for pyramid": (dict(allocator="pyramid", floor=0.5), "budget.floor"),
    "protection above the budget": (dict(allocator="adahead", sink=4, recent=4), "policy.recent_tokens"),
    "an unknown allocator": (dict(allocator="perhead"), "budget.allocator"),
}


@pytest.mark.parametrize("case", list(OPEN_ERRORS))
def test_a_refused_open_names_its_field(case: str) -> None:
    options, field = OPEN_ERRORS[case]
    options = dict(options)
    windows = options.pop("sliding_windows", None)
    profile = options.pop("profile", b"")
    request = per_head_request(**{"allocator": "adahead", **options})
    request.budget.profile = b"" if profile == b"-" else (profile or request.budget.profile)
    if windows is not None:
        request.geometry.sliding_windows[:] = windows
    with pytest.raises(InvalidArgument) as error:
        open_session(request, "s")
    assert error.value.field == field


def test_a_profile_at_the_limit_is_read() -> None:
    text = profile_bytes(make_profile())
    pad = MAX_PROFILE_BYTES - len(text) - len(b',"settings":{"pad":""}}') + 1
    padded = text[:-1] + b',"settings":{"pad":"' + b"x" * pad + b'"}}'
    assert len(padded) == MAX_PROFILE_BYTES
    open_session(per_head_request("h2o", allocator="lukv", profile=padded), "s")


# --- state, Redis, retries, adoption, sizes -------------------------------------------------


def test_a_restored_state_decides_as_the_original() -> None:
    session = run_against_reference(per_head_request("h2o", "caote", "lukv"), seed=9)
    state = session.core.store.get(session.id)
    data = state.to_bytes()
    assert data[:5] == b"KVST2"
    replica = ManagerCore(InMemoryStateStore())
    replica.store.create(SessionState.from_bytes(data))
    request, _, _ = session.build(3, pb.PHASE_DECODE)
    assert replica.report_block(request).SerializeToString() == session.core.report_block(request).SerializeToString()
    assert replica.store.get(session.id).to_bytes() == session.core.store.get(session.id).to_bytes()


def test_a_rectangular_state_keeps_its_format() -> None:
    _, state = open_session(open_request("h2o", budget=8, sink=1, recent=2), "s")
    data = state.to_bytes()
    assert data[:5] == b"KVST1"
    header = data[9:9 + int.from_bytes(data[5:9], "little")]
    assert b"per_head" not in header and b"head_budgets" not in header and b"profile" not in header


def test_redis_replicas_decide_byte_for_byte_as_the_embedded_manager(redis_server) -> None:
    request = per_head_request("snapkv", "caote", "global")
    embedded = PerHeadSession(request, seed=6, core=ManagerCore(InMemoryStateStore(), new_session_id=lambda: "p1"))

    async def replay() -> None:
        store = RedisStateStore.from_url(redis_server.url)
        other = RedisStateStore.from_url(redis_server.url)  # a second replica on the same Redis
        try:
            cores = [AsyncManagerCore(store, new_session_id=lambda: "p1"), AsyncManagerCore(other)]
            assert (await cores[0].open_session(request)).SerializeToString() == embedded.opened.SerializeToString()
            for index, (new_tokens, phase) in enumerate(SCHEDULE):
                report, _, _ = embedded.build(new_tokens, phase)
                answer = embedded.core.report_block(report)
                embedded.apply(report, answer)
                remote = await cores[index % 2].report_block(report)  # replicas take turns
                assert remote.SerializeToString() == answer.SerializeToString()
            stored = await other.get("p1")
            assert stored.to_bytes() == embedded.core.store.get("p1").to_bytes()
            info = await cores[1].get_session(pb.GetSessionRequest(session_id="p1"))
            assert list(info.head_cache_lengths) == embedded.lengths.ravel().tolist()
        finally:
            await store.close()
            await other.close()

    asyncio.run(replay())


def test_a_retried_sequence_returns_the_stored_answer() -> None:
    session = PerHeadSession(per_head_request("h2o", "caote", "adahead"), seed=8)
    report, _, _ = session.build(14)
    first = session.core.report_block(report)
    state = session.core.store.get(session.id).to_bytes()
    assert session.core.report_block(report).SerializeToString() == first.SerializeToString()
    assert session.core.store.get(session.id).to_bytes() == state  # nothing decided again
    changed = pb.ReportBlockRequest()
    changed.CopyFrom(report)
    changed.layers[0].head_lengths[0] += 1  # another request under the same number
    changed.layers[0].head_lengths[1] -= 1
    with pytest.raises(FailedPrecondition):
        session.core.report_block(changed)


def test_adopt_session_takes_every_heads_positions() -> None:
    request = per_head_request("h2o", "", "adahead")
    positions = [[np.array([0, 3, 5, 9]), np.array([1, 2, 9])], [np.arange(10), np.array([9])],
                 [np.array([], dtype=np.int64), np.array([4, 9])]]
    response, state = adopt_session(request, positions, "a1")
    assert response.per_head_budgets and list(response.head_budgets) == [8] * (LAYERS * HEADS)
    assert state.head_cache_lengths.tolist() == [[4, 3], [10, 1], [0, 2]]
    assert state.last_position == 9 and state.cache_lengths == [7, 11, 2]
    assert all(a.shape == p.shape and not a.any() for a, p in zip(state.accumulators, state.positions))
    for layer, heads in enumerate(positions):
        for head, expected in enumerate(heads):
            assert state.positions[layer * HEADS + head].tolist() == [expected.tolist()]
    # The adopted session goes on with the next report at each head's own length.
    core = ManagerCore(InMemoryStateStore())
    core.store.create(state)
    session = PerHeadSession.__new__(PerHeadSession)
    session.core, session.opened, session.request = core, response, request
    session.rng, session.layers, session.heads = np.random.default_rng(0), LAYERS, HEADS
    session.lengths, session.sequence, session.next_position = state.head_cache_lengths.copy(), 0, 10
    report, _, _ = session.build(2)
    answer = core.report_block(report)
    session.apply(report, answer)
    assert answer.sequence == 1 and session.lengths.sum() == sum(answer.head_budgets)
    # The rectangular form still works for per-head sessions (a (heads, L) array is heads' rows).
    _, state = adopt_session(request, [np.array([[0, 1], [0, 2]])] * LAYERS, "a2")
    assert state.head_cache_lengths.tolist() == [[2, 2]] * LAYERS


@pytest.mark.parametrize("positions, field", [
    ([[np.array([0, 1])]] * LAYERS, "positions[0]"),
    ([[np.array([0, 1]), np.array([1, 0])]] * LAYERS, "positions[0][1]"),
    ([[np.array([0.0, 1.0]), np.array([1])]] * LAYERS, "positions[0][0].dtype"),
    ([[np.array([[0, 1]]), np.array([1])]] * LAYERS, "positions[0][0].shape"),
    ([[np.array([-1]), np.array([1])]] * LAYERS, "positions[0][0]"),
    ([[np.array([0]), np.array([1])]] * (LAYERS - 1), "positions"),
])
def test_adopt_session_refuses_malformed_head_positions(positions, field: str) -> None:
    with pytest.raises(InvalidArgument) as error:
        adopt_session(per_head_request("h2o"), positions, "a")
    assert error.value.field == field


def test_the_state_size_estimate_bounds_every_decided_state() -> None:
    request = per_head_request("h2o", "caote", "global")
    settings_state = open_session(request, "s")[1]
    estimate = _bytes_at_budget(settings_state.settings, settings_state.layer_budgets, True)
    # tokens x layers x heads at the budget, plus one block of 8 per head, int32 + float32 each.
    assert estimate == (8 * LAYERS * HEADS + 8 * LAYERS * HEADS) * 8
    session = run_against_reference(request, seed=12)
    assert session.core.store.get(session.id).array_bytes <= estimate
    with pytest.raises(ResourceExhausted):
        open_session(request, "t", max_state_bytes=estimate - 1)
    open_session(request, "t", max_state_bytes=estimate)


# --- epicache (per layer, rectangular) --------------------------------------------------------


@pytest.mark.parametrize("tokens", [8, 13])
def test_epicache_budgets_are_the_profiles(tokens: int) -> None:
    profile = make_profile(layers=4, seed=3)
    request = per_head_request("h2o", allocator="epicache", budget=tokens, profile=profile_bytes(profile),
                               num_layers=4)
    opened = ManagerCore(InMemoryStateStore()).open_session(request)
    expected = profile.epicache(tokens, sink=1, recent=2)[:, 0].tolist()
    assert list(opened.layer_budgets) == expected and sum(expected) == 4 * tokens
    assert not opened.per_head_budgets and not opened.head_budgets
    assert len(set(expected)) > 1  # not uniform: the profile decided


def test_epicache_sessions_keep_their_budgets_and_evict_rectangularly() -> None:
    profile = make_profile(layers=LAYERS, seed=4)
    request = per_head_request("h2o", allocator="epicache", budget=8, profile=profile_bytes(profile))
    core = ManagerCore(InMemoryStateStore())
    session = Session(core, core.open_session(request), np.random.default_rng(0), num_layers=LAYERS, heads=HEADS)
    expected = profile.epicache(8, sink=1, recent=2)[:, 0].tolist()
    for new_tokens in (20, 10, 1, 1):
        response = session.report(new_tokens)
        assert list(response.layer_budgets) == expected
    assert [p.shape[1] for p in session.positions] == expected
    state = core.store.get(session.id)
    assert SessionState.from_bytes(state.to_bytes()).to_bytes() == state.to_bytes()
    assert state.settings.layer_budgets == tuple(expected) and len(state.settings.profile_sha256) == 64
    assert not state.settings.profile_curves  # epicache keeps its budgets, not the curves


def test_epicache_takes_a_floor() -> None:
    profile = make_profile(layers=LAYERS, seed=5)
    request = per_head_request("h2o", allocator="epicache", budget=40, floor=0.5, profile=profile_bytes(profile))
    budgets = list(ManagerCore(InMemoryStateStore()).open_session(request).layer_budgets)
    assert budgets == epicache_budgets(profile.sensitivity, 40, HEADS, floor=20)[:, 0].tolist()
    assert min(budgets) >= 20
