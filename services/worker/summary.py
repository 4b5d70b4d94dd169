"""What eviction did to one request, and its human-readable form (no torch: clients use it)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields


@dataclass
class EvictionSummary:
    """What eviction did to one generation."""

    prompt_tokens: int
    generated_tokens: int
    # Tokens evicted per KV head, per layer (not those that left a sliding window: a full cache drops them too).
    evicted_per_layer: list[int]
    final_lengths: list[int]  # tokens per KV head left in each layer's cache
    peak_lengths: list[int]  # largest cache length each layer reached
    layer_budgets: list[int]
    kv_bytes: int  # keys + values held at the end
    # What transformers' own cache would hold without eviction (sliding layers: their window).
    full_cache_bytes: int
    peak_kv_bytes: int
    reports: int
    report_bytes: int
    manager_seconds: float
    prefill_seconds: float
    decode_seconds: float
    manager_fallback: bool = False  # the manager was lost and the session went on in-process
    # Per-head sessions: tokens left in each (layer, KV head), row-major (the per-layer counts
    # above are then averages per KV head); empty otherwise.
    final_head_lengths: list[int] = field(default_factory=list)
    kept_kv_bytes: int = 0  # the kept keys and values alone (kv_bytes less allocation slack)

    @property
    def decode_tokens_per_second(self) -> float:
        return self.generated_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @classmethod
    def from_proto(cls, message) -> "EvictionSummary":
        """From a `kvevict.v1.EvictionSummary` (same field names)."""
        return cls(**{f.name: list(value) if isinstance(value := getattr(message, f.name), Iterable) else value
                      for f in fields(cls)})


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.2f} MiB"


def format_summary(summary: EvictionSummary, policy: str = "") -> str:
    """A per-layer table (budget, evicted, final and peak cache length) and the totals."""
    total_tokens = summary.prompt_tokens + summary.generated_tokens
    lines = [f"== eviction summary{': ' + policy if policy else ''} ==",
             f"tokens: {summary.prompt_tokens} prompt + {summary.generated_tokens} generated",
             f"{'layer':>5} {'budget':>7} {'evicted':>8} {'cached':>7} {'peak':>6}"]
    for layer, (budget, evicted, final, peak) in enumerate(zip(
            summary.layer_budgets, summary.evicted_per_layer, summary.final_lengths, summary.peak_lengths)):
        lines.append(f"{layer:>5} {budget:>7} {evicted:>8} {final:>7} {peak:>6}")
    layers = len(summary.final_lengths)
    if summary.final_head_lengths and layers:
        lines.append(_head_counts(summary.final_head_lengths, layers))
    saved = 1 - summary.kv_bytes / summary.full_cache_bytes if summary.full_cache_bytes else 0.0
    lines += [
        f"tokens evicted per KV head: {sum(summary.evicted_per_layer)} over all layers "
        f"({sum(summary.evicted_per_layer) / max(1, total_tokens * len(summary.final_lengths)):.1%} of every layer's tokens)",
        f"KV cache: {_mib(summary.kv_bytes)} used vs {_mib(summary.full_cache_bytes)} full cache "
        f"({saved:.1%} saved; peak {_mib(summary.peak_kv_bytes)})"
        + (f"; kept entries {_mib(summary.kept_kv_bytes)}" if summary.final_head_lengths else ""),
        f"prefill: {summary.prefill_seconds:.2f} s ({summary.prefill_tokens_per_second:.1f} tok/s); "
        f"decode: {summary.decode_seconds:.2f} s ({summary.decode_tokens_per_second:.1f} tok/s)",
        f"manager: {summary.reports} reports, {summary.report_bytes / 1024:.1f} KiB sent, "
        f"{summary.manager_seconds * 1000:.1f} ms deciding",
    ]
    return "\n".join(lines)


def _head_counts(head_lengths: list[int], layers: int) -> str:
    """Per-head sessions: each layer's KV heads' kept tokens, one line per layer ("12: 40 205 7"),
    then the spread over every head."""
    heads = len(head_lengths) // layers
    rows = [head_lengths[layer * heads:(layer + 1) * heads] for layer in range(layers)]
    ordered = sorted(head_lengths)
    spread = (f"tokens per KV head: min {ordered[0]}, median {ordered[len(ordered) // 2]}, max {ordered[-1]} "
              f"over {len(ordered)} heads")
    return "\n".join(["tokens kept per KV head (layer: head 0, head 1, ...):",
                      *(f"{layer:>5}: {' '.join(str(n) for n in row)}" for layer, row in enumerate(rows)), spread])
