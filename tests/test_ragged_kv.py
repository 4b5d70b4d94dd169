"""The ragged KV cache (kvevict.worker.ragged_kv): every layout against a brute-force list of tokens
per head, bytes against the storage really allocated, and ragged attention against SDPA over the
full rectangular cache with the evicted entries masked out (-inf)."""

from __future__ import annotations

import doctest
import random

import pytest
import torch

from kvevict.worker import ragged_kv
from kvevict.worker.ragged_kv import LAYOUTS, RaggedKV, headroom, ragged_attention

SDPA = torch.nn.functional.scaled_dot_product_attention


def test_docstring_examples_run():
    assert doctest.testmod(ragged_kv).failed == 0


# -- storage against a list-of-tokens model --------------------------------------------------------

class TokenLists:
    """The brute-force cache: per head a Python list of (key row, value row, position)."""

    def __init__(self, heads: int) -> None:
        self.heads = [[] for _ in range(heads)]

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        for h, tokens in enumerate(self.heads):
            tokens.extend((keys[0, h, i], values[0, h, i], int(positions[i])) for i in range(keys.shape[2]))

    def keep(self, masks: list[torch.Tensor]) -> None:
        for h, mask in enumerate(masks):
            tokens = self.heads[h]
            self.heads[h] = [t for i, t in enumerate(tokens) if i >= len(mask) or bool(mask[i])]


def assert_same(layer: ragged_kv.RaggedLayer, model: TokenLists) -> None:
    assert layer.lengths() == [len(t) for t in model.heads]
    for h, tokens in enumerate(model.heads):
        k, v, p = layer.head(h)
        assert p.tolist() == [t[2] for t in tokens]
        if tokens:
            assert torch.equal(k, torch.stack([t[0] for t in tokens]))
            assert torch.equal(v, torch.stack([t[1] for t in tokens]))


def assert_attention_over(layer: ragged_kv.RaggedLayer, model: TokenLists, gen: torch.Generator) -> None:
    """One query (the decode path) and two per head outside the cache (block=0), group 2: softmax
    over the listed tokens."""
    heads, dim = layer.num_kv_heads, layer.head_dim
    store = RaggedKV(1, heads, dim)
    store.layers[0] = layer
    for q_len in (1, 2):
        query = torch.randn(1, 2 * heads, q_len, dim, generator=gen)
        out, _ = ragged_attention(query, store, 0, block=0)
        for h, tokens in enumerate(model.heads):
            got = out[0, :, 2 * h : 2 * h + 2]  # (q, G, d)
            if not tokens:
                assert bool((got == 0).all())
                continue
            keys, values = torch.stack([t[0] for t in tokens]), torch.stack([t[1] for t in tokens])
            weights = torch.softmax(query[0, 2 * h : 2 * h + 2].double() @ keys.double().T * dim**-0.5, dim=-1)
            torch.testing.assert_close(got.transpose(0, 1).double(), weights @ values.double(), rtol=1e-5,
                                       atol=1e-6)


def allocated_bytes(layer: ragged_kv.RaggedLayer) -> int:
    """Bytes of the distinct storages behind every head's keys and values."""
    storages = {}
    for h in range(layer.num_kv_heads):
        for tensor in layer.head(h)[:2]:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr() or id(tensor)] = storage.nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_appends_and_keeps_match_a_list_of_tokens(layout):
    rng = random.Random(7)
    gen = torch.Generator().manual_seed(7)
    heads, dim = 4, 8
    layer = ragged_kv.make_layer(layout, heads, dim)
    model = TokenLists(heads)
    position = 0
    for step in range(60):
        if step % 3 == 2:  # a keep: per head a random mask over a random prefix, sometimes all False
            masks = []
            for n in layer.lengths():
                covered = rng.randint(0, n)
                p_keep = rng.choice([0.0, 0.3, 0.8, 1.0])
                masks.append(torch.rand(covered, generator=gen) < p_keep)
            if rng.random() < 0.4:  # heads keeping the same count: packed runs of equal heads
                masks = [torch.arange(n) < min(layer.lengths()) // 2 for n in layer.lengths()]
            layer.keep(masks)
            model.keep(masks)
        else:
            q = rng.choice([1, 1, 3, 8, 20])
            keys, values = torch.randn(2, 1, heads, q, dim, generator=gen)
            positions = torch.arange(position, position + q)
            position += q
            layer.append(keys, values, positions)
            model.append(keys, values, positions)
        assert_same(layer, model)
        assert_attention_over(layer, model, gen)
        assert layer.kv_bytes() == allocated_bytes(layer)
        assert layer.kv_bytes() >= layer.kept_bytes() == sum(layer.lengths()) * 2 * dim * 4


def test_keep_frees_memory_and_refuses_a_mask_longer_than_its_head():
    for layout in LAYOUTS:
        layer = ragged_kv.make_layer(layout, 3, 16)
        layer.append(torch.randn(1, 3, 512, 16), torch.randn(1, 3, 512, 16), torch.arange(512))
        before = layer.kv_bytes()
        layer.keep([torch.arange(512) < 300, torch.arange(512) < 20, torch.arange(512) < 1])
        assert layer.lengths() == [300, 20, 1]
        assert layer.kv_bytes() == allocated_bytes(layer) < before, layout
        with pytest.raises(ValueError, match="KV head 1 covers 21 tokens"):
            layer.keep([torch.ones(300, dtype=torch.bool), torch.ones(21, dtype=torch.bool),
                        torch.ones(1, dtype=torch.bool)])


def lukv_like(heads: int, mean: int) -> list[int]:
    """Budgets as lukv draws them: a quarter of the heads share what the 0.2x floors leave."""
    big = max(1, heads // 4)
    floor = round(0.2 * mean)
    rest = heads * mean - (heads - big) * floor
    return [rest // big + (1 if i < rest % big else 0) for i in range(big)] + [floor] * (heads - big)


@pytest.mark.parametrize("layout,within", [("per_head", True), ("packed", True), ("padded16", False),
                                           ("padded64", False)])
def test_bytes_within_5_percent_of_the_kept_entries_through_decode(layout, within):
    """Uneven budgets (mean 1024 per head): per_head and packed hold the kept entries plus at most
    5% through 200 decode steps; a padded layout holds every head at the longest one's length."""
    heads, dim = 8, 16
    budgets = lukv_like(heads, 1024)
    assert sum(budgets) == heads * 1024 and min(budgets) == 205
    layer = ragged_kv.make_layer(layout, heads, dim)
    layer.append(torch.randn(1, heads, 4096, dim), torch.randn(1, heads, 4096, dim), torch.arange(4096))
    layer.keep([torch.arange(4096) < b for b in budgets])
    worst = 0.0
    for step in range(200):
        layer.append(torch.randn(1, heads, 1, dim), torch.randn(1, heads, 1, dim), torch.tensor([4096 + step]))
        worst = max(worst, layer.kv_bytes() / layer.kept_bytes())
        assert layer.kv_bytes() == allocated_bytes(layer)
    assert (worst <= 1.05) == within, (layout, worst)
    if layout.startswith("padded"):
        bucket = int(layout[len("padded"):])
        longest = max(layer.lengths())
        assert layer.kv_bytes() == 2 * heads * (-(-longest // bucket) * bucket) * dim * 4


def test_headroom_bounds_the_slack():
    for n in (0, 1, 205, 1024, 9216):
        assert headroom(n) == max(8, n // 64)


# -- conversions ------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
def test_from_and_to_rectangular(layout):
    gen = torch.Generator().manual_seed(1)
    heads, length, dim = 3, 10, 4
    keys, values = torch.randn(2, 2, 1, heads, length, dim, generator=gen)
    # An evicted rectangular cache: heads at different positions, as PrunableCache holds them.
    positions = torch.stack([torch.randperm(30, generator=gen)[:length].sort().values for _ in range(heads)])
    plain = [torch.arange(length)] * 2
    cache = RaggedKV.from_rectangular(list(keys), list(values), [positions, plain[0]], layout=layout)
    assert cache.lengths(0) == [length] * heads
    for h in range(heads):
        assert cache.positions(0, h).tolist() == positions[h].tolist()
    k, v, p, valid = cache.to_rectangular(0)
    assert torch.equal(k, keys[0]) and torch.equal(v, values[0]) and torch.equal(p, positions) and bool(valid.all())
    masks = [torch.tensor([True] * 7 + [False] * 3), torch.zeros(length, dtype=torch.bool), torch.arange(length) == 4]
    cache = RaggedKV.from_rectangular(list(keys), list(values), [positions, plain[1]], layout=layout,
                                      keep=[masks, [torch.ones(length, dtype=torch.bool)] * heads])
    assert cache.lengths(0) == [7, 0, 1] and cache.lengths(1) == [length] * heads
    k, v, p, valid = cache.to_rectangular(0)
    assert k.shape == (1, heads, 7, dim) and valid.sum(dim=1).tolist() == [7, 0, 1]
    assert torch.equal(k[0, 0], keys[0, 0, 0, :7]) and torch.equal(v[0, 2, :1], values[0, 0, 2, 4:5])
    assert p[2].tolist() == [int(positions[2, 4])] + [-1] * 6 and bool((k[0, 1] == 0).all())
    assert cache.kept_bytes() == (8 + length * heads) * 2 * dim * 4


# -- exact attention against masked SDPA over the rectangular cache ----------------------------------

KV_HEADS, DIM, OLD = 4, 16, 40
# Old tokens each head keeps: empty, one, some, all (the block is appended to each); and heads
# keeping equal counts, which the packed layout attends in one call (a run of heads).
KEPT = (0, 1, 17, OLD)
RUNS = (17, 17, 17, 3)


def evicted_case(group: int, q_len: int, block: int, dtype: torch.dtype, seed: int, layout: str,
                 window: int = 0, kept_old: tuple[int, ...] = KEPT):
    """A rectangular cache of OLD + block tokens, per head KEPT[h] of the OLD old ones kept (at
    random), the block appended; returns the ragged store, the query and the reference's inputs."""
    gen = torch.Generator().manual_seed(seed)
    length = OLD + block
    keys, values = (torch.randn(2, 1, KV_HEADS, length, DIM, generator=gen) * 2).to(dtype)
    query = (torch.randn(1, KV_HEADS * group, q_len, DIM, generator=gen) * 2).to(dtype)
    keep_old = torch.zeros(KV_HEADS, OLD, dtype=torch.bool)
    for h, kept in enumerate(kept_old):
        keep_old[h, torch.randperm(OLD, generator=gen)[:kept]] = True
    store = RaggedKV.from_rectangular([keys[:, :, :OLD]], [values[:, :, :OLD]], [torch.arange(OLD)], layout=layout,
                                      keep=[list(keep_old)])
    if block:
        store.append(0, keys[:, :, OLD:], values[:, :, OLD:], torch.arange(OLD, length))
    # The reference's visibility (Hkv, q, L): kept old tokens, causal in the block, the window.
    key_index = torch.arange(length)
    query_pos = torch.arange(length - q_len, length) if block else torch.full((q_len,), length + 5)
    visible = torch.cat([keep_old, torch.ones(KV_HEADS, block, dtype=torch.bool)], dim=1)[:, None, :]
    visible = visible & (key_index[None, None, :] <= query_pos[None, :, None])
    if window:
        visible = visible & (key_index[None, None, :] > query_pos[None, :, None] - window)
    return store, query, keys, values, visible, query_pos


def reference(query, keys, values, visible, group, dtype, scale=None):
    """SDPA over the full rectangular cache, evicted entries -inf; a row that sees nothing: 0."""
    mask = visible.repeat_interleave(group, dim=0)[None]
    out = SDPA(query.to(dtype), keys.to(dtype), values.to(dtype), attn_mask=mask, enable_gqa=group > 1, scale=scale)
    return out.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0).transpose(1, 2)


# float32: summation order alone (keys compacted vs masked in place).
FP32 = dict(rtol=1e-5, atol=2e-6)
# bfloat16: the tolerance bfloat16 SDPA itself meets against float32 SDPA on the same inputs:
# rtol one bfloat16 ulp (2^-7), atol 2^-10 x max|V| for outputs near 0 (sums of rounded products).
# Over these cases bfloat16 SDPA on the rectangular cache needs atol 0.0007 x max|V| at that
# rtol and ragged attention 0.0005; every case below checks SDPA meets it as well as ours.
def bf16_tolerance(values: torch.Tensor) -> dict:
    return dict(rtol=2**-7, atol=2**-10 * float(values.float().abs().max()))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("group", (1, 3, 8))
@pytest.mark.parametrize("q_len,window", [(1, 0), (8, 0), (128, 0), (1, 12), (128, 50)])
@pytest.mark.parametrize("dtype,kept", [(torch.float32, KEPT), (torch.float32, RUNS), (torch.bfloat16, KEPT)])
def test_attention_equals_masked_sdpa_on_the_rectangular_cache(layout, group, q_len, window, dtype, kept):
    store, query, keys, values, visible, query_pos = evicted_case(group, q_len, q_len, dtype, 3 + q_len, layout,
                                                                  window, kept)
    assert store.lengths(0) == [k + q_len for k in kept]
    if layout == "packed" and kept == RUNS:
        assert store.layers[0].runs() == [(0, 3), (3, 1)]
    out, probs = ragged_attention(query, store, 0, sliding_window=window or None, probabilities_from=0)
    # Without probabilities a decode step takes its own path (_decode_rows): the same output.
    plain, none = ragged_attention(query, store, 0, sliding_window=window or None)
    assert none is None and torch.equal(plain, out)
    ref32 = reference(query, keys, values, visible, group, torch.float32)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref32, **FP32)
    else:
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(reference(query, keys, values, visible, group, dtype).float(), ref32,
                                   **bf16_tolerance(values))
        torch.testing.assert_close(out.float(), ref32, **bf16_tolerance(values))
    # Probabilities: the reference's at each head's kept columns, in cache order, zeros after.
    logits = torch.einsum("hgqd,hkd->hgqk", query[0].float().view(KV_HEADS, group, q_len, DIM),
                          keys[0].float()) * DIM**-0.5
    ref_probs = torch.softmax(logits.masked_fill(~visible[:, None], float("-inf")), dim=-1)
    expected = torch.zeros_like(probs)
    for h in range(KV_HEADS):
        n = store.lengths(0)[h]
        expected[h, :, :, :n] = ref_probs[h][:, :, store.positions(0, h)]  # positions = rectangular columns
    torch.testing.assert_close(probs, expected, **FP32)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("group", (1, 3, 8))
def test_an_empty_head_attends_to_nothing_and_a_one_token_head_returns_its_value(layout, group):
    """Queries outside the cache (block=0): head 0 holds no token -> output 0 and probabilities 0;
    head 1 holds one token -> its value, exactly; the others as masked SDPA."""
    store, query, keys, values, visible, _ = evicted_case(group, 5, 0, torch.float32, 11, layout)
    assert store.lengths(0) == list(KEPT)
    out, probs = ragged_attention(query, store, 0, block=0, probabilities_from=2)
    assert bool((out[0, :, :group] == 0).all()) and bool((probs[0] == 0).all())
    one_value = store.layers[0].head(1)[1][0]
    assert torch.equal(out[0, :, group : 2 * group], one_value.expand(5, group, DIM))
    assert probs.shape == (KV_HEADS, group, 3, OLD) and bool((probs[1, :, :, 0] == 1).all())
    torch.testing.assert_close(out, reference(query, keys, values, visible, group, torch.float32), **FP32)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kept", (KEPT, RUNS, (9, 9, 9, 9)))
@pytest.mark.parametrize("q_len", (1, 8))
def test_a_given_scaling_is_applied(layout, kept, q_len):
    store, query, keys, values, visible, _ = evicted_case(3, q_len, q_len, torch.float32, 4, layout, 0, kept)
    out, _ = ragged_attention(query, store, 0, scaling=0.37)
    torch.testing.assert_close(out, reference(query, keys, values, visible, 3, torch.float32, scale=0.37), **FP32)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_decode_step_over_a_layer_with_every_head_empty_is_zero(layout):
    store = RaggedKV(1, 3, 8, layout=layout)
    store.append(0, torch.randn(1, 3, 4, 8), torch.randn(1, 3, 4, 8), torch.arange(4))
    store.keep(0, [torch.zeros(4, dtype=torch.bool)] * 3)
    assert store.lengths(0) == [0, 0, 0] and store.kept_bytes() == 0
    for q_len in (1, 3):
        out, _ = ragged_attention(torch.randn(1, 6, q_len, 8), store, 0, block=0)
        assert out.shape == (1, q_len, 6, 8) and bool((out == 0).all())


def test_decode_over_a_head_holding_only_its_new_token():
    store, query, keys, values, visible, _ = evicted_case(3, 1, 1, torch.float32, 5, "per_head")
    out, _ = ragged_attention(query, store, 0)
    assert torch.equal(out[0, 0, :3], values[0, 0, OLD].expand(3, DIM))  # head 0: only the new token


def test_softcapped_attention_and_probabilities_subset():
    store, query, keys, values, visible, _ = evicted_case(2, 8, 8, torch.float32, 9, "packed")
    out, probs = ragged_attention(query, store, 0, softcap=5.0, probabilities_from=6)
    scores = torch.einsum("hgqd,hkd->hgqk", query[0].view(KV_HEADS, 2, 8, DIM), keys[0]) * DIM**-0.5
    scores = (5.0 * torch.tanh(scores / 5.0)).masked_fill(~visible[:, None], float("-inf"))
    ref = torch.einsum("hgqk,hkd->hgqd", torch.softmax(scores, dim=-1), values[0])
    torch.testing.assert_close(out, ref.reshape(1, 2 * KV_HEADS, 8, DIM).transpose(1, 2), **FP32)
    assert probs.shape == (KV_HEADS, 2, 2, OLD + 8)
    assert ragged_attention(query, store, 0, softcap=5.0)[1] is None


def test_refuses_a_block_that_is_not_in_the_cache():
    store, query, *_ = evicted_case(1, 8, 0, torch.float32, 2, "per_head")
    with pytest.raises(ValueError, match="fewer than the block of 8"):
        ragged_attention(query, store, 0)
