"""Observer queries: the queries of tokens not yet in the cache (a question still to come, a
reconstruction of the context) as the observation window of window statistics (TOVA, SnapKV,
CAOTE's window reference, the per-query output errors).

`QueryCapture` rides along in one forward of those tokens alone, at their true positions, and
keeps each layer's queries after RoPE; `ObserverQueries` then gives, for any cache, the attention
those queries would pay it (GQA group mean, summed over the observers), in float32. Their memory
is a few queries per layer, nothing per cached token.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

CAPTURE_KWARG = "kvevict_query_capture"
POOLS = ("sum", "max")


@dataclass(frozen=True)
class LayerQueries:
    queries: torch.Tensor  # (Hkv, group, m, d) float32, RoPE applied
    positions: torch.Tensor  # (m,) absolute positions of the observers
    scaling: float
    softcap: float | None
    window: int  # sliding window of the layer, 0 = full attention
    # Per observer (Hkv, g, m): the log-sum-exp of its logits over keys it saw that are not in
    # the cache scored (a speculative forward's own keys): they stay in the softmax's
    # denominator, so a cached token's probability is the share of attention it really got.
    excluded: torch.Tensor | None = None


@dataclass
class QueryCapture:
    """What attention hands over during the capture forward: layer -> its queries."""

    positions: torch.Tensor
    layers: dict[int, LayerQueries] = field(default_factory=dict)
    # Several forwards (lookahead: one token each) append their queries instead of replacing them.
    accumulate: bool = False
    # Leading queries of the forward that do not observe (a reconstruction's repeat prompt).
    skip: int = 0

    def record(self, layer: int, query: torch.Tensor, num_kv_heads: int, scaling: float,
               softcap: float | None, sliding_window: int | None) -> None:
        """query (1, Hq, m, d) as attention receives it."""
        query = query[:, :, self.skip:]
        _, num_query_heads, m, head_dim = query.shape
        grouped = query[0].float().reshape(num_kv_heads, num_query_heads // num_kv_heads, m, head_dim)
        previous = self.layers.get(layer) if self.accumulate else None
        if previous is not None:
            grouped = torch.cat([previous.queries, grouped], dim=2)
        self.layers[layer] = LayerQueries(grouped, self.positions[: grouped.shape[2]].to(query.device), scaling,
                                          softcap, sliding_window or 0)


class ObserverQueries:
    """The captured queries of every layer, as an observation window.

    `every_query`: every captured query observes, whatever window a statistic asks for (a
    reconstruction's queries cover the whole repeated context; its last `window` would only
    repeat the context's last tokens). `pool`: how the attention statistics (`attention`) combine
    the observers: "sum" as ATTN_WINDOW sums its window, or "max" over the observers and the
    query heads of each KV head, KVzip's score (the per-query output errors are always summed by
    the collector). Probabilities are over the cache the statistics are computed on: keys that
    the observers' own forward cached (a speculative forward's) are not in it.
    """

    def __init__(self, capture: QueryCapture, every_query: bool = False, pool: str = "sum") -> None:
        if pool not in POOLS:
            raise ValueError(f"observer pool must be one of {', '.join(POOLS)}, got {pool!r}")
        self.layers = dict(capture.layers)
        self.every_query = every_query
        self.pool = pool
        self.others: list[ObserverQueries] = []  # further sets, each combined by its own rule, added up
        self._heads: dict[int, ObserverQueries] = {}  # for_head's

    def joined(self, other: "ObserverQueries") -> "ObserverQueries":
        """These observers and `other`'s: attention statistics add each set's, the per-query
        errors see the queries of both (question-aware with reconstruction)."""
        joined = ObserverQueries(QueryCapture(torch.empty(0)), self.every_query, self.pool)
        joined.layers = self.layers
        joined.others = [*self.others, other]
        return joined

    def for_head(self, head: int) -> "ObserverQueries":
        """These observers as seen by KV head `head` alone (its group's query heads): what a cache
        whose heads hold different tokens measures head by head. Built once per head."""
        cached = self._heads.get(head)
        if cached is None:
            cached = ObserverQueries(QueryCapture(torch.empty(0)), self.every_query, self.pool)
            cached.layers = {layer: replace(q, queries=q.queries[head : head + 1],
                                            excluded=None if q.excluded is None else q.excluded[head : head + 1])
                             for layer, q in self.layers.items()}
            cached.others = [other.for_head(head) for other in self.others]
            self._heads[head] = cached
        return cached

    def attention(self, layer: int, keys: torch.Tensor, key_positions: torch.Tensor, window: int) -> torch.Tensor:
        """Attention (Hkv, L) of the last `window` observers over `keys` (Hkv, L, d) float32 at
        `key_positions` (Hkv, L), summed over them (as ATTN_WINDOW sums its window's queries) or,
        with pool "max", their maximum; joined sets' attention added."""
        probs, _ = self._own_probabilities(layer, keys, key_positions, window)
        own = probs.amax(dim=(1, 2)) if self.pool == "max" else probs.mean(dim=1).sum(dim=1)
        return sum((other.attention(layer, keys, key_positions, window) for other in self.others), own)

    def probabilities(self, layer: int, keys: torch.Tensor, key_positions: torch.Tensor,
                      window: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per query head (Hkv, g, m, L): the last `window` observers' probabilities and logits
        (every observer's with `every_query`; joined sets' queries after these)."""
        parts = [self._own_probabilities(layer, keys, key_positions, window),
                 *(other.probabilities(layer, keys, key_positions, window) for other in self.others)]
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p for p, _ in parts], dim=2), torch.cat([s for _, s in parts], dim=2)

    def _own_probabilities(self, layer: int, keys: torch.Tensor, key_positions: torch.Tensor,
                           window: int) -> tuple[torch.Tensor, torch.Tensor]:
        observed = self.layers[layer]
        count = observed.queries.shape[2] if self.every_query else window
        queries, positions = observed.queries[:, :, -count:], observed.positions[-count:]
        scores = torch.einsum("hgqd,hkd->hgqk", queries, keys) * observed.scaling
        if observed.softcap is not None:
            scores = observed.softcap * torch.tanh(scores / observed.softcap)
        if observed.window:  # the observers see only what their own window holds
            seen = key_positions.to(keys.device)[:, None, :] > positions[None, :, None] - observed.window
            scores = scores.masked_fill(~seen[:, None], float("-inf"))
        if observed.excluded is not None:
            total = torch.logaddexp(torch.logsumexp(scores, dim=-1), observed.excluded[:, :, -count:])
            return torch.exp(scores - total[..., None]).nan_to_num(0.0), scores
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row seeing nothing weighs nothing
        return probs, scores


# KVzip's reconstruction prompts (kvpress's KVzipPress.prepare): the first chunk of the context is
# asked for whole, a later one from the last tokens of the chunk before it.
REPEAT_FIRST = "\n\nRepeat the previous context exactly."
REPEAT_PART = "\n\nRepeat the part of the previous context exactly, starting with"
# Tokens of the previous chunk quoted after REPEAT_PART (kvpress: prev_postfix_size).
REPEAT_OVERLAP = 8


@dataclass(frozen=True)
class RepeatPrompt:
    """Token ids of a reconstruction request: `first` (or `part` followed by the chunk's
    REPEAT_OVERLAP preceding tokens) then `suffix`, then the context tokens to repeat."""

    first: tuple[int, ...]
    part: tuple[int, ...]
    suffix: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tokenizer, chat_template: bool = False) -> "RepeatPrompt":
        """KVzip's wording. `chat_template`: the suffix is what the tokenizer's chat template
        puts after a user turn (the assistant's header), as kvpress's KVzipPress does; without
        it a newline, as kvpress does for raw-text prompts (and as the suite ran KVzip)."""
        suffix = "\n"
        if chat_template and getattr(tokenizer, "chat_template", None):
            dummy = "dummy context"
            separator = "\n" + "#" * len(dummy)
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": dummy + separator}],
                                                     add_generation_prompt=True, tokenize=False)
            suffix = rendered.split(separator)[1]

        def ids(text: str) -> tuple[int, ...]:
            return tuple(tokenizer.encode(text, add_special_tokens=False))

        return cls(first=ids(REPEAT_FIRST), part=ids(REPEAT_PART), suffix=ids(suffix))

    def request(self, context: list[int], start: int) -> list[int]:
        """The ids before the repeat of context[start:]."""
        lead = list(self.first) if start == 0 else [*self.part, *context[max(0, start - REPEAT_OVERLAP): start]]
        return lead + list(self.suffix)
