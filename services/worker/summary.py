"""Human-readable eviction summary of one generation."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only attributes are read: clients format a summary without importing torch
    from kvevict.worker.generator import EvictionSummary


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
    saved = 1 - summary.kv_bytes / summary.full_cache_bytes if summary.full_cache_bytes else 0.0
    lines += [
        f"tokens evicted per KV head: {sum(summary.evicted_per_layer)} over all layers "
        f"({sum(summary.evicted_per_layer) / max(1, total_tokens * len(summary.final_lengths)):.1%} of every layer's tokens)",
        f"KV cache: {_mib(summary.kv_bytes)} used vs {_mib(summary.full_cache_bytes)} full cache "
        f"({saved:.1%} saved; peak {_mib(summary.peak_kv_bytes)})",
        f"prefill: {summary.prefill_seconds:.2f} s ({summary.prefill_tokens_per_second:.1f} tok/s); "
        f"decode: {summary.decode_seconds:.2f} s ({summary.decode_tokens_per_second:.1f} tok/s)",
        f"manager: {summary.reports} reports, {summary.report_bytes / 1024:.1f} KiB sent, "
        f"{summary.manager_seconds * 1000:.1f} ms deciding",
    ]
    return "\n".join(lines)
