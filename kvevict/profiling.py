"""What `kvevict profile` computes, as pure numpy functions: LU-KV's per-(layer, KV head) utility
curves from attention probabilities, and EpiCache's layer sensitivity from keys measured with
and without a restricted attention mask. kvevict.profile_command runs the model; the allocators
that read the result are in kvevict.cache_manager.head_budgets.

Utility (LU-KV, arXiv 2602.08585). A profiling text is cut at a few points c (probes): tokens
before c are the context whose cache is compressed, the `future` tokens after it play the
decoding steps. LU-KV's oracle importance of context token j in KV head h is the largest
contribution it makes to the head's output over those steps,

    I[h, j] = max_k  mean_a  A[h, a, k, j] * ||W_O^(a) v[h, j]||

(a: the query heads sharing KV head h, their group mean as kvevict reduces GQA everywhere; A
the attention probabilities of future step k; W_O^(a) query head a's slice of the output
projection; without value norms the norms are 1). A head that keeps b tokens keeps those a
heuristic `metric` ranks first (what an eviction policy would keep at the cut), and its utility
is the importance it keeps, U_h(b) = sum of I over them. Curves are sampled at kept fractions
b = round(r x c) of the grid r, divided by the probe's total importance over every layer and
head, and averaged over the probes (so each probe weighs the same and heads stay comparable).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from kvevict.cache_manager.policies.snapkv import max_pool

# SnapKV's observation window and max-pool kernel (METHODS.md, kvevict's snapkv policy defaults).
SNAPKV_WINDOW = 32
SNAPKV_KERNEL = 7
METRICS = ("snapkv", "h2o", "tova", "oracle")
# EpiCache's similarity window (tokens per cosine) and its mask's overlap ratio.
SIMILARITY_WINDOW = 100
OVERLAP_RATIO = 0.5


def profile_grid(octaves: int = 8, per_octave: int = 8) -> np.ndarray:
    """Kept fractions 0 and 2 ** (-k / per_octave) for k = octaves x per_octave .. 0: as fine at
    1% of the cache as at 50% in relative terms, where the curves bend most.

    >>> grid = profile_grid(2, 2)
    >>> grid.round(3).tolist()
    [0.0, 0.25, 0.354, 0.5, 0.707, 1.0]
    """
    steps = octaves * per_octave
    return np.concatenate([[0.0], 2.0 ** (-np.arange(steps, -1, -1) / per_octave)])


DEFAULT_GRID = profile_grid()


def probe_cuts(length: int, future: int, probes: int, min_context: int = 2 * SNAPKV_WINDOW) -> list[int]:
    """Cut points of a text of `length` tokens: `probes` contexts evenly spaced from half the
    text to its end minus the `future` tokens each probe needs after its cut.

    >>> probe_cuts(1000, 100, 4)
    [500, 633, 767, 900]
    """
    last = length - future
    if future < 1 or probes < 1:
        raise ValueError(f"future and probes must be >= 1, got {future} and {probes}")
    if last < min_context:
        raise ValueError(f"the text has {length} tokens; profiling needs at least {min_context + future} "
                         f"({min_context} of context before the {future} future tokens)")
    first = max(min_context, min(last, math.ceil(length / 2)))
    return sorted({int(math.floor(x + 0.5)) for x in np.linspace(first, last, probes)})


def _group_mean(probs: np.ndarray, queries: slice, cut: int) -> np.ndarray:
    # (Hkv, g, q, L) -> (Hkv, q, cut): the GQA group as one virtual query (its mean attention).
    return probs[:, :, queries, :cut].mean(axis=1, dtype=np.float64)


def oracle_importance(probs: np.ndarray, cut: int, future: int, value_norms: np.ndarray | None = None) -> np.ndarray:
    """LU-KV's oracle importance (kv_heads, cut) of the first `cut` tokens from the attention of
    the `future` queries after the cut: the largest group-mean contribution norm over those steps.

    probs: (kv_heads, group, queries, keys) attention probabilities; value_norms: (kv_heads,
    group, keys) ||W_O^(a) v_j||, or None for 1.

    >>> probs = np.zeros((1, 1, 4, 4)); probs[0, 0, 2, :3] = [.5, .2, .3]; probs[0, 0, 3] = [.1, .6, .1, .2]
    >>> oracle_importance(probs, cut=2, future=2).tolist()
    [[0.5, 0.6]]
    """
    if cut + future > probs.shape[2]:
        raise ValueError(f"cut {cut} + future {future} is past the {probs.shape[2]} queries")
    steps = probs[:, :, cut:cut + future, :cut].astype(np.float64)
    if value_norms is not None:
        steps = steps * value_norms[:, :, None, :cut]
    return steps.mean(axis=1).max(axis=1)


def metric_scores(probs: np.ndarray, cut: int, metric: str, value_norms: np.ndarray | None = None,
                  future: int = 0) -> np.ndarray:
    """What a policy scores the first `cut` tokens with at the cut (kv_heads, cut), from the
    attention of the queries before it: snapkv (the last 32 queries' attention summed, max-pooled
    over 7 tokens), h2o (every query's attention summed), tova (the last query's attention), or
    oracle (oracle_importance itself: the best any metric can do; needs `future`).

    >>> probs = np.tile(np.eye(4)[None, None], (1, 2, 1, 1))
    >>> metric_scores(probs, cut=3, metric="h2o").tolist()
    [[1.0, 1.0, 1.0]]
    """
    if metric == "oracle":
        return oracle_importance(probs, cut, future, value_norms)
    if metric == "snapkv":
        window = _group_mean(probs, slice(max(cut - SNAPKV_WINDOW, 0), cut), cut).sum(axis=1)
        return max_pool(window, SNAPKV_KERNEL)
    if metric == "h2o":
        return _group_mean(probs, slice(0, cut), cut).sum(axis=1)
    if metric == "tova":
        return _group_mean(probs, slice(cut - 1, cut), cut)[:, 0]
    raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")


def retained_utility(importance: np.ndarray, scores: np.ndarray, grid: np.ndarray = DEFAULT_GRID) -> np.ndarray:
    """Importance kept (kv_heads, len(grid)) when each head keeps round(r x tokens) tokens of the
    best-scored (higher score first, among equal scores the more recent token), r in `grid`.

    >>> retained_utility(np.array([[1., 2., 3., 4.]]), np.array([[0., 5., 1., 5.]]), np.array([0., .5, 1.])).tolist()
    [[0.0, 6.0, 10.0]]
    """
    heads, tokens = importance.shape
    columns = np.broadcast_to(np.arange(tokens), (heads, tokens))
    order = np.lexsort((-columns, -scores), axis=-1)
    kept = np.concatenate([np.zeros((heads, 1)), np.cumsum(np.take_along_axis(importance, order, axis=-1), axis=-1)],
                          axis=-1)
    counts = np.floor(np.asarray(grid) * tokens + 0.5).astype(np.int64)
    return kept[:, counts]


@dataclass(frozen=True)
class LayerUtility:
    """One layer's raw curves: retained (probes, kv_heads, grid) importance kept, totals (probes,
    kv_heads) importance there is."""

    retained: np.ndarray
    totals: np.ndarray


def layer_utility(probs: np.ndarray, cuts: Sequence[int], future: int, metric: str = "snapkv",
                  value_norms: np.ndarray | None = None, grid: np.ndarray = DEFAULT_GRID) -> LayerUtility:
    """One layer's curves at every probe (see the module docstring), unnormalised.

    >>> probs = np.full((1, 1, 6, 6), 1 / 6)
    >>> layer_utility(probs, cuts=[3], future=2, metric="h2o", grid=np.array([0., 1.])).totals.round(3).tolist()
    [[0.5]]
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    retained, totals = [], []
    for cut in cuts:
        importance = oracle_importance(probs, cut, future, value_norms)
        scores = importance if metric == "oracle" else metric_scores(probs, cut, metric)
        retained.append(retained_utility(importance, scores, grid))
        totals.append(importance.sum(axis=-1))
    return LayerUtility(np.asarray(retained), np.asarray(totals))


def normalize_curves(layers: Sequence[LayerUtility]) -> np.ndarray:
    """Curves (layers, kv_heads, grid): each probe divided by its total over every layer and head,
    then the probes averaged; at the grid's last point they sum to 1 over all heads.

    >>> a = LayerUtility(np.array([[[0., 3.]]]), np.array([[3.]]))
    >>> b = LayerUtility(np.array([[[0., 1.]]]), np.array([[1.]]))
    >>> normalize_curves([a, b]).tolist()
    [[[0.0, 0.75]], [[0.0, 0.25]]]
    """
    retained = np.stack([layer.retained for layer in layers])  # (L, P, H, G)
    totals = np.stack([layer.totals for layer in layers]).sum(axis=(0, 2))  # (P,)
    scale = np.divide(1.0, totals, out=np.zeros_like(totals), where=totals > 0)
    return (retained * scale[None, :, None, None]).mean(axis=1)


def profile_curves(probs_per_layer: Iterable[np.ndarray], cuts: Sequence[int], future: int, metric: str = "snapkv",
                   value_norms: Iterable[np.ndarray | None] | None = None,
                   grid: np.ndarray = DEFAULT_GRID) -> np.ndarray:
    """LU-KV utility curves (layers, kv_heads, grid) of a profiling text from each layer's
    attention probabilities (kv_heads, group, queries, keys), taken one layer at a time (an
    iterator keeps one layer in memory), and optionally each layer's value norms.

    >>> rng = np.random.default_rng(0)
    >>> layers = [rng.dirichlet(np.ones(8), size=(2, 1, 8)) for _ in range(3)]
    >>> curves = profile_curves(layers, cuts=[4], future=4, metric="oracle", grid=np.array([0., .5, 1.]))
    >>> curves.shape, round(float(curves[..., -1].sum()), 6)
    ((3, 2, 3), 1.0)
    """
    norms = value_norms if value_norms is not None else iter(lambda: None, 0)
    return normalize_curves([layer_utility(p, cuts, future, metric, n, grid) for p, n in zip(probs_per_layer, norms)])


# --- EpiCache's layer sensitivity ------------------------------------------------------------------


def block_mask(length: int, block: int, sink: int, overlap: int) -> np.ndarray:
    """EpiCache's restricted attention (length, length), True = visible: causal within blocks of
    `block` tokens, plus the last `overlap` tokens of the previous block, plus the first `sink`
    tokens for every later query.

    >>> print(block_mask(6, 3, 1, 1).astype(int))
    [[1 0 0 0 0 0]
     [1 1 0 0 0 0]
     [1 1 1 0 0 0]
     [1 0 1 1 0 0]
     [1 0 1 1 1 0]
     [1 0 1 1 1 1]]
    """
    if block < 1 or sink < 0 or overlap < 0:
        raise ValueError(f"block must be >= 1, sink and overlap >= 0; got {block}, {sink}, {overlap}")
    query = np.arange(length)[:, None]
    key = np.arange(length)[None, :]
    same_block = (query // block == key // block) & (key <= query)
    previous = (key // block == query // block - 1) & (key >= (query // block) * block - overlap) & (overlap > 0)
    sinks = (query >= sink) & (key < sink)
    return same_block | previous | sinks


def key_similarity(full_keys: Sequence[np.ndarray], restricted_keys: Sequence[np.ndarray],
                   window: int = SIMILARITY_WINDOW) -> np.ndarray:
    """EpiCache's layer scores (layers,): per layer, the cosine similarity of the keys (kv_heads,
    tokens, head_dim) of the full-attention pass and of the restricted one, over windows of
    `window` tokens (each window's keys flattened), averaged over heads and windows. 1 = the
    layer's keys do not depend on the attention that was cut; lower = more sensitive.

    >>> keys = np.ones((1, 4, 2))
    >>> key_similarity([keys, keys], [keys, -keys], window=2).tolist()
    [1.0, -1.0]
    """
    scores = []
    for full, restricted in zip(full_keys, restricted_keys, strict=True):
        full = np.asarray(full, dtype=np.float64)
        restricted = np.asarray(restricted, dtype=np.float64)
        if full.shape != restricted.shape or full.ndim != 3:
            raise ValueError(f"keys must be (kv_heads, tokens, head_dim) of equal shapes, got {full.shape} "
                             f"and {restricted.shape}")
        starts = np.arange(0, full.shape[1], window)
        dots = np.add.reduceat((full * restricted).sum(-1), starts, axis=1)
        norms = np.sqrt(np.add.reduceat((full * full).sum(-1), starts, axis=1)
                        * np.add.reduceat((restricted * restricted).sum(-1), starts, axis=1))
        # torch.nn.functional.cosine_similarity's eps, as EpiCache measures it.
        scores.append(float((dots / np.maximum(norms, 1e-8)).mean()))
    return np.asarray(scores)
