"""The ragged KV cache's layouts (kvevict.worker.ragged_kv) against the rectangular cache: one
layer's decode step (one query) and prefill block (128 queries) over per-head budgets averaging
1024 tokens, the amortised single-token append, and the bytes each layout holds against the kept
entries' bytes. Rectangular = SDPA over (Hkv, 1024, d) as kvevict attention calls it (the same
total tokens); rectangular-rows = the same in the form ragged attention calls SDPA. Calls of every
layout are interleaved, one each per round, so load on a shared machine falls on all alike, and
every variant reads its own tensors (so none finds its keys warm in cache from the call before);
medians and p99 of CPU and wall time, the load average printed.

    .venv/bin/python benchmarks/ragged_attention.py            # the table of docs/HEAD_BUDGETS.md
    .venv/bin/python benchmarks/ragged_attention.py --quick    # few repetitions (the test runs it)
    .venv/bin/python benchmarks/ragged_attention.py --dtype bfloat16
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.perf_timing import Timing, load_line, markdown, time_call  # noqa: E402
from kvevict.worker.ragged_kv import LAYOUTS, RaggedKV, ragged_attention  # noqa: E402

# name: (KV heads, query heads, head dim) of one attention layer.
SHAPES = {"Llama-3.1-8B": (8, 32, 128), "SmolLM2-135M": (3, 9, 64)}
MEAN = 1024  # tokens per KV head on average, every budget pattern
PREFILL = 128
APPENDS = 64
PATTERNS = ("even", "lukv", "one")
# Targets of the product: decode within 20% of the rectangular cache, bytes within 5% of kept.
DECODE_TARGET, BYTES_TARGET = 1.20, 1.05


def budgets(pattern: str, heads: int) -> list[int]:
    """Tokens per KV head, summing to heads x MEAN. `even`: all MEAN. `lukv`: as lukv spreads them
    (docs/HEAD_BUDGETS.md: half the heads or more at the 0.2x floor), a quarter of the heads share
    what the floors leave. `one`: a single head takes all the floors leave (6.6x on 8 heads)."""
    floor = round(0.2 * MEAN)
    if pattern == "even":
        return [MEAN] * heads
    big = max(1, heads // 4) if pattern == "lukv" else 1
    rest = heads * MEAN - (heads - big) * floor
    return [rest // big + (1 if i < rest % big else 0) for i in range(big)] + [floor] * (heads - big)


def build(layout: str, lengths: list[int], dim: int, dtype: torch.dtype, seed: int) -> RaggedKV:
    """A one-layer store holding lengths[h] tokens in head h, kept at random out of max(lengths)."""
    gen = torch.Generator().manual_seed(seed)
    longest = max(lengths)
    keys, values = torch.randn(2, 1, len(lengths), longest, dim, generator=gen).to(dtype)
    masks = []
    for n in lengths:
        mask = torch.zeros(longest, dtype=torch.bool)
        mask[torch.randperm(longest - PREFILL, generator=gen)[: n - PREFILL]] = True
        mask[longest - PREFILL :] = True  # the newest tokens (the prefill block) in every head
        masks.append(mask)
    return RaggedKV.from_rectangular([keys], [values], [torch.arange(longest)], layout=layout, keep=[masks])


def measure(shape: str, pattern: str, dtype: torch.dtype, repeats: int, appends: int = APPENDS) -> list[dict]:
    hkv, hq, dim = SHAPES[shape]
    lengths = budgets(pattern, hkv)
    gen = torch.Generator().manual_seed(0)
    decode_q = torch.randn(1, hq, 1, dim, generator=gen).to(dtype)
    prefill_q = torch.randn(1, hq, PREFILL, dim, generator=gen).to(dtype)
    rect_k, rect_v = torch.randn(2, 1, hkv, MEAN, dim, generator=gen).to(dtype)
    causal = (torch.arange(MEAN)[None, :] <= torch.arange(MEAN - PREFILL, MEAN)[:, None])[None, None]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    group = hq // hkv
    # Its own copy: run right after the rectangular call, shared tensors would be warm in cache.
    rows_k, rows_v = rect_k.clone(), rect_v.clone()
    calls = {"rectangular": (lambda: sdpa(decode_q, rect_k, rect_v, enable_gqa=hq > hkv),
                             lambda: sdpa(prefill_q, rect_k, rect_v, attn_mask=causal, enable_gqa=hq > hkv)),
             # The same rectangular attention in the form ragged attention calls SDPA: batch = KV
             # head, a decode step's G query heads as rows of one product (faster on CPU).
             "rectangular-rows": (lambda: sdpa(decode_q.view(1, hkv, group, dim), rows_k, rows_v),
                                  lambda: sdpa(prefill_q[0].view(hkv, group, PREFILL, dim), rows_k[0][:, None],
                                               rows_v[0][:, None], attn_mask=causal, enable_gqa=group > 1))}
    stores = {layout: build(layout, lengths, dim, dtype, 1) for layout in LAYOUTS}
    for layout, store in stores.items():
        calls[layout] = (lambda s=store: ragged_attention(decode_q, s, 0, block=1),
                         lambda s=store: ragged_attention(prefill_q, s, 0))
    decode = {name: Timing() for name in calls}
    prefill = {name: Timing() for name in calls}
    for phase, timings, rounds in ((0, decode, repeats), (1, prefill, max(3, repeats // 4))):
        for name in calls:  # warm-up
            calls[name][phase]()
        for _ in range(rounds):
            for name in calls:
                time_call(calls[name][phase], timings[name])

    rows = []
    for name in calls:
        append, worst_bytes = Timing(), 1.0
        if name in LAYOUTS:
            # Single-token appends from the state after the keep: reallocations show in the p99.
            store = build(name, lengths, dim, dtype, 2)
            for step in range(appends):
                k, v = torch.randn(2, 1, hkv, 1, dim, generator=gen).to(dtype)
                time_call(lambda: store.append(0, k, v, torch.tensor([max(lengths) + step])), append)
                worst_bytes = max(worst_bytes, store.kv_bytes() / store.kept_bytes())
        ratio = decode[name].cpu_p(50) / decode["rectangular"].cpu_p(50)
        rows.append(dict(shape=shape, pattern=pattern, layout=name, decode=decode[name], prefill=prefill[name],
                         append=append, decode_ratio=ratio,
                         rows_ratio=decode[name].cpu_p(50) / decode["rectangular-rows"].cpu_p(50),
                         prefill_ratio=prefill[name].cpu_p(50) / prefill["rectangular"].cpu_p(50),
                         bytes_ratio=worst_bytes,
                         meets=ratio <= DECODE_TARGET and worst_bytes <= BYTES_TARGET))
    return rows


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f}"


def table(rows: list[dict]) -> str:
    headers = ["shape", "budgets", "layout", "decode CPU p50 / p99 us", "decode wall p50 / p99 us", "decode / rect",
               "decode / rect-rows", "prefill-128 CPU p50 / p99 us", "prefill wall p50 us", "prefill / rect",
               "append CPU p50 / p99 / mean us", "bytes / kept (max)", "meets both"]
    body = []
    for r in rows:
        d, p, a = r["decode"], r["prefill"], r["append"]
        body.append([r["shape"], r["pattern"], r["layout"], f"{us(d.cpu_p(50))} / {us(d.cpu_p(99))}",
                     f"{us(d.wall_p(50))} / {us(d.wall_p(99))}", f"{r['decode_ratio']:.2f}", f"{r['rows_ratio']:.2f}",
                     f"{us(p.cpu_p(50))} / {us(p.cpu_p(99))}", us(p.wall_p(50)), f"{r['prefill_ratio']:.2f}",
                     "-" if not a.cpu else f"{us(a.cpu_p(50))} / {us(a.cpu_p(99))} / {us(sum(a.cpu) / len(a.cpu))}",
                     f"{r['bytes_ratio']:.3f}", ("yes" if r["meets"] else "no") if r["layout"] in LAYOUTS else "-"])
    return markdown(headers, body)


def verdict(rows: list[dict]) -> str:
    """Which layouts meet both targets in every shape and budget pattern measured."""
    layouts = [name for name in LAYOUTS if all(r["meets"] for r in rows if r["layout"] == name)]
    strict = [name for name in layouts if all(r["rows_ratio"] <= DECODE_TARGET for r in rows if r["layout"] == name)]
    return (f"Layouts meeting decode <= {DECODE_TARGET:.2f} x rectangular (CPU p50) and bytes <= "
            f"{BYTES_TARGET:.2f} x kept in every row: {', '.join(layouts) or 'none'}; of those, also within "
            f"{DECODE_TARGET:.2f} x rectangular-rows: {', '.join(strict) or 'none'}.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few repetitions (the test)")
    parser.add_argument("--repeats", type=int, default=None, help="decode rounds (prefill: a quarter); default 200")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--patterns", nargs="+", choices=PATTERNS, default=list(PATTERNS),
                        help="budget patterns (--quick: even and one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    repeats = args.repeats or (3 if args.quick else 200)
    patterns = ["even", "one"] if args.quick and args.patterns == list(PATTERNS) else args.patterns
    dtype = getattr(torch, args.dtype)
    print(f"Measured by `benchmarks/ragged_attention.py{' --quick' if args.quick else ''}` on "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, one torch thread, {args.dtype} "
          f"(CPU; no GPU); {repeats} decode rounds; {load_line()} at the start.\n", flush=True)
    rows = []
    for shape in SHAPES:
        for pattern in patterns:
            rows += measure(shape, pattern, dtype, repeats, appends=16 if args.quick else APPENDS)
            print(f"{shape} {pattern}: {budgets(pattern, SHAPES[shape][0])} done; {load_line()}", file=sys.stderr,
                  flush=True)
    print(table(rows))
    print(f"\n{verdict(rows)}\n\n_{load_line()} at the end._")
    return 0


if __name__ == "__main__":
    sys.exit(main())
