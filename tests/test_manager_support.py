"""Shared helpers of the manager tests (no tests here): requests, a session driver that sends
seeded random statistics and remembers them, and independent reference implementations."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from kvevict import wire
from kvevict.cache_manager import InMemoryStateStore, ManagerCore
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import tensor_pb2

# (layer, requirement, shape) -> values of one statistic
Values = Callable[[int, pb.StatisticRequirement, tuple[int, int]], np.ndarray]
GEOMETRY = dict(num_layers=3, num_kv_heads=2, num_query_heads=4, head_dim=8)


def on_the_wire(values: np.ndarray, dtype: int) -> tuple[tensor_pb2.Tensor, np.ndarray]:
    """`values` encoded as a statistic of wire dtype `dtype`, and what the manager decodes."""
    if dtype == tensor_pb2.DTYPE_BFLOAT16:
        tensor = wire.encode_bfloat16(np.asarray(values, dtype=np.float32))
    else:
        tensor = wire.encode(np.asarray(values).astype({tensor_pb2.DTYPE_FLOAT16: np.float16,
                                                         tensor_pb2.DTYPE_FLOAT32: np.float32}[dtype]))
    return tensor, np.asarray(wire.decode(tensor, "values"), dtype=np.float32)


def open_request(
    base: str = "h2o",
    wrapper: str = "",
    budget: int = 24,
    sink: int | None = None,
    recent: int | None = None,
    window: int = 0,
    pool_kernel: int = 0,
    seed: int = 0,
    dtype: int = tensor_pb2.DTYPE_UNSPECIFIED,
    block_size: int = 8,
    allocator: str = "",
    **geometry: int,
) -> pb.OpenSessionRequest:
    policy = pb.PolicySpec(base=base, wrapper=wrapper, window=window, pool_kernel=pool_kernel, seed=seed)
    if sink is not None:
        policy.sink_tokens = sink
    if recent is not None:
        policy.recent_tokens = recent
    return pb.OpenSessionRequest(
        geometry=pb.ModelGeometry(**{**GEOMETRY, **geometry}),
        policy=policy,
        budget=pb.BudgetSpec(tokens=budget, allocator=allocator),
        block_size=block_size,
        statistics_dtype=dtype,
    )


def random_statistic(rng: np.random.Generator, statistic: int, shape: tuple[int, int]) -> np.ndarray:
    """Plausible values: attention masses and norms >= 0, cosines in [-1, 1]."""
    if statistic == pb.STATISTIC_KEY_COSINE:
        return rng.uniform(-1.0, 1.0, shape)
    if statistic in (pb.STATISTIC_ATTN_SUM, pb.STATISTIC_ATTN_WINDOW):
        raw = rng.exponential(1.0, shape) ** 3  # heavy-tailed like attention
        return raw / raw.sum(axis=-1, keepdims=True) * rng.integers(1, 5)
    return rng.uniform(0.0, 3.0, shape)


@dataclass
class Session:
    """One session driven through a ManagerCore, with the test's own view of the cache."""

    core: ManagerCore
    opened: pb.OpenSessionResponse
    rng: np.random.Generator
    num_layers: int = GEOMETRY["num_layers"]
    heads: int = GEOMETRY["num_kv_heads"]
    sequence: int = 0
    next_position: int = 0
    # Per layer (heads, L) positions of the tokens the test believes are cached.
    positions: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.positions = [np.zeros((self.heads, 0), np.int64) for _ in range(self.num_layers)]

    @property
    def id(self) -> str:
        return self.opened.session_id

    def build(
        self, new_tokens: int, phase: int = pb.PHASE_PREFILL, values: Values | None = None
    ) -> tuple[pb.ReportBlockRequest, list[list[np.ndarray]]]:
        """Next report with statistics from `values` (default: seeded random); also returns
        them as the manager will decode them."""
        values = values or (lambda layer, req, shape: random_statistic(self.rng, req.statistic, shape))
        new = np.arange(self.next_position, self.next_position + new_tokens, dtype=np.int64)
        request = pb.ReportBlockRequest(
            session_id=self.id, sequence=self.sequence + 1, phase=phase, positions=wire.encode(new)
        )
        sent = []
        for layer in range(self.num_layers):
            length = self.positions[layer].shape[1] + new_tokens
            encoded = [on_the_wire(values(layer, req, (self.heads, length)), req.dtype)
                        for req in self.opened.statistics]
            request.layers.add(layer=layer, cache_length=length, values=[tensor for tensor, _ in encoded])
            sent.append([decoded for _, decoded in encoded])
        return request, sent

    def apply(self, request: pb.ReportBlockRequest, response: pb.ReportBlockResponse) -> list[np.ndarray | None]:
        """Updates the test's view with a response; returns each layer's keep mask (None = keep all)."""
        new = wire.decode(request.positions, "positions")
        masks: list[np.ndarray | None] = [None] * self.num_layers
        for keep in response.keeps:
            masks[keep.layer] = wire.decode_bits(keep.keep, "keep")
        for layer in range(self.num_layers):
            cached = np.concatenate([self.positions[layer], np.broadcast_to(new, (self.heads, new.size))], axis=1)
            mask = masks[layer]
            self.positions[layer] = cached if mask is None else cached[mask].reshape(self.heads, -1)
        self.sequence = request.sequence
        self.next_position = int(new[-1]) + 1
        return masks

    def report(self, new_tokens: int, phase: int = pb.PHASE_PREFILL, values: Values | None = None) -> pb.ReportBlockResponse:
        request, _ = self.build(new_tokens, phase, values)
        response = self.core.report_block(request)
        self.apply(request, response)
        return response

    def state_bytes(self) -> bytes:
        return self.core.store.get(self.id).to_bytes()


def start(request: pb.OpenSessionRequest, seed: int = 0, core: ManagerCore | None = None) -> Session:
    core = core or ManagerCore(InMemoryStateStore())
    geometry = request.geometry
    return Session(
        core, core.open_session(request), np.random.default_rng(seed),
        num_layers=geometry.num_layers, heads=geometry.num_kv_heads,
    )


# --- independent reference implementations -------------------------------------------------


def reference_max_pool(scores: np.ndarray, kernel: int) -> np.ndarray:
    """Max over the window [j - k//2, j + k//2] clipped to the row, one token at a time."""
    half = kernel // 2
    out = np.empty_like(scores)
    for j in range(scores.shape[-1]):
        out[..., j] = scores[..., max(0, j - half) : j + half + 1].max(axis=-1)
    return out


def reference_caote(h: np.ndarray, excluded_deviation: np.ndarray) -> np.ndarray:
    """a_j * ||v_j - o_{-j}||, a = h / sum(h)."""
    h = h.astype(np.float64)
    return h / h.sum(axis=-1, keepdims=True) * excluded_deviation.astype(np.float64)


def reference_fast_caote(h: np.ndarray, mean_deviation: np.ndarray) -> np.ndarray:
    """a_j / (1 - a_j) * ||v_j - mean v||, a = h / sum(h)."""
    h = h.astype(np.float64)
    a = h / h.sum(axis=-1, keepdims=True)
    return a / (1.0 - a) * mean_deviation.astype(np.float64)


def reference_keep(scores: np.ndarray, protected: np.ndarray, budget: int) -> np.ndarray:
    """Protected tokens, then the best scores; ties go to the more recent token (sorted, not partitioned)."""
    heads, length = scores.shape
    keep = np.zeros((heads, length), dtype=bool)
    if length <= budget:
        keep[:] = True
        return keep
    for h in range(heads):
        keep[h, protected[h]] = True
        free = budget - int(protected[h].sum())
        candidates = sorted((j for j in range(length) if not protected[h, j]), key=lambda j: (-scores[h, j], -j))
        keep[h, candidates[:free]] = True
    return keep


def assert_top_selection(mask: np.ndarray, scores: np.ndarray, protected: np.ndarray, budget: int) -> None:
    """`mask` keeps `budget` per head: all protected tokens plus the top-scored others.

    Where it differs from the sorted reference, the tokens involved must tie with the
    reference's threshold to float rounding (the manager and the test compute in different orders).
    """
    heads, length = scores.shape
    assert mask.shape == (heads, length)
    assert (mask.sum(axis=-1) == budget).all(), mask.sum(axis=-1)
    assert mask[protected].all(), "a protected token was evicted"
    expected = reference_keep(scores, protected, budget)
    if np.array_equal(mask, expected):
        return
    for h in np.nonzero((mask != expected).any(axis=-1))[0]:
        kept_free = expected[h] & ~protected[h]
        threshold = scores[h, kept_free].min()
        differing = scores[h, mask[h] != expected[h]]
        np.testing.assert_allclose(differing, threshold, rtol=1e-6, err_msg=f"head {h} is not the top set")
