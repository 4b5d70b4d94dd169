"""The worker's performance sections of benchmarks/perf.py, each returning a markdown table:

* split: one generation with the manager embedded vs over gRPC with its state in Redis (a
  private redis-server and `kvevict manager serve` started here), synchronous and pipelined;
* capture: a prefill block with each policy's statistics measured inside attention vs the full
  cache on SDPA;
* memory: KV bytes and peak RSS against the context at a fixed budget;
* decode: decode tokens/s at a long context, evicting to a budget vs the full cache;
* end_to_end: SmolLM2-135M generation with EvictingCache / the worker's loop vs plain
  `model.generate` on the full cache.
"""

from __future__ import annotations

import contextlib
import json
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.servers: the process helpers

import kvevict  # noqa: E402
from benchmarks.perf_timing import Timing, markdown, repeat, time_call  # noqa: E402
from kvevict.v1 import cache_manager_pb2 as pb  # noqa: E402
from kvevict.worker.cache_session import CacheSession, EvictionSettings  # noqa: E402
from kvevict.worker.generator import EvictingGenerator  # noqa: E402
from kvevict.worker.manager_client import EmbeddedManagerClient  # noqa: E402
from kvevict.worker.model_loader import load_model  # noqa: E402
from kvevict.worker.remote_manager import RemoteManagerClient  # noqa: E402

SMOLLM = "smollm2-135m-instruct"
# SmolLM2's own dtype where the CPU computes it fast; without AVX-512 torch emulates bfloat16
# matmuls (7x float32's time on an AVX2 core), so there the model runs in float32.
FAST_BFLOAT16 = torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AMX"))
MODEL_DTYPE = torch.bfloat16 if FAST_BFLOAT16 else torch.float32
MODEL_DTYPE_NAME = str(MODEL_DTYPE).removeprefix("torch.")


def dtype_for(name: str) -> str:
    """The dtype a benchmark loads model `name` in: SmolLM2's MODEL_DTYPE, the small shipped
    checkpoints float32."""
    return MODEL_DTYPE_NAME if name == SMOLLM else "float32"
SUITE_PROMPTS = ROOT / "benchmarks" / "results" / "suite" / "prompts.jsonl"


def settings(policy: str, budget: int, block: int, pipelined: bool = False) -> EvictionSettings:
    return EvictionSettings(policy=kvevict.policy(policy).spec(), budget=pb.BudgetSpec(tokens=budget),
                            block_size=block, pipelined=pipelined)


def smollm_available() -> bool:
    from kvevict.worker.model_fetch import is_converted, model_dir

    return is_converted(model_dir(SMOLLM))


def suite_prompt_ids(tokenizer, tokens: int) -> torch.Tensor:
    """The first suite prompt (a RULER needle task) as ids, cut or repeated to `tokens`."""
    record = json.loads(SUITE_PROMPTS.read_text().splitlines()[0])
    ids = tokenizer(record["context"] + record["question"]).input_ids
    while len(ids) < tokens:
        ids = ids + ids[1:]
    return torch.tensor(ids[:tokens])


# -- split ---------------------------------------------------------------------------------
def split_table(quick: bool) -> str:
    from tests.servers import RedisServer, start_manager

    cases = [("models/demo-py", "caote+h2o", 96, 32, 48, None)]
    if not quick and smollm_available():
        cases.append((SMOLLM, "caote+keydiff", 128, 128, 16, 1024))
    repeats = 2 if quick else 11  # wall times vary by +-15% here: enough for a 3% ratio's median
    rows = []
    # Without redis-server (make test installs it), the manager keeps its state in memory.
    store = contextlib.nullcontext(None) if shutil.which("redis-server") is None else None
    with tempfile.TemporaryDirectory() as tmp, store or RedisServer(Path(tmp)) as redis, \
            start_manager(redis.url if redis else "memory://") as manager:
        remote = RemoteManagerClient(manager.address, timeout_s=30)
        for name, policy, budget, block, new, tokens in cases:
            model, tokenizer = load_model(name, dtype=dtype_for(name))
            ids = (suite_prompt_ids(tokenizer, tokens) if tokens else
                   torch.tensor(tokenizer((ROOT / "examples" / "demo_prompt.py").read_text()).input_ids))
            timings = {(where, mode): Timing() for where in ("embedded", "remote") for mode in ("sync", "pipelined")}
            outputs = {}
            for rep in range(repeats + 1):  # interleaved, so drift hits every configuration alike
                for (where, mode), timing in timings.items():
                    client = EmbeddedManagerClient() if where == "embedded" else remote
                    generator = EvictingGenerator(model, client, settings(policy, budget, block, mode == "pipelined"))
                    result = time_call(lambda: generator.generate(ids, new), timing if rep else Timing())
                    outputs[(where, mode)] = result.token_ids
            assert outputs[("embedded", "sync")] == outputs[("remote", "sync")], "remote decided otherwise"
            assert outputs[("embedded", "pipelined")] == outputs[("remote", "pipelined")], "remote decided otherwise"
            label = (f"{Path(name).name} ({dtype_for(name)}), {ids.numel()} + {new} "
                     f"tokens, {policy}, budget {budget}, block {block}")
            for mode in ("sync", "pipelined"):
                embedded, over_grpc = timings[("embedded", mode)], timings[("remote", mode)]
                rows.append((label, mode, embedded.wall_p(50), over_grpc.wall_p(50), over_grpc.wall_p(99),
                             over_grpc.wall_p(50) / embedded.wall_p(50), embedded.cpu_p(50), over_grpc.cpu_p(50)))
        remote.close()
    remote_name = "gRPC + Redis" if store is None else "gRPC + memory://"
    return markdown(["generation", "reports", "embedded wall s p50", f"{remote_name} wall s p50", "p99",
                     "remote / embedded (wall)", "embedded CPU s", "remote CPU s (worker)"], rows)


# -- capture -------------------------------------------------------------------------------
CAPTURE_POLICIES = ("h2o", "tova", "snapkv", "keydiff", "caote+h2o", "caote+tova", "caote+snapkv", "fastcaote+snapkv",
                    "caote+keydiff")


def capture_table(quick: bool) -> str:
    name = "models/demo-py" if quick or not smollm_available() else SMOLLM
    model, tokenizer = load_model(name, dtype=dtype_for(name))
    tokens, block = (256, 64) if quick else (1024, 128)
    ids = suite_prompt_ids(tokenizer, tokens)
    repeats = 2 if quick else 5
    blocks = tokens // block

    def prefill(policy: str | None):
        chosen = (settings(policy, 10 * tokens, block) if policy else
                  EvictionSettings(policy=pb.PolicySpec(base="streaming", sink_tokens=0, recent_tokens=0),
                                   budget=pb.BudgetSpec(tokens=10 * tokens), block_size=block))
        session = CacheSession(model, EmbeddedManagerClient(), chosen)
        try:
            session.prefill(ids)
        finally:
            session.close()

    full = repeat(lambda: prefill(None), repeats)
    rows = [("full cache (SDPA, no statistics)", full.wall_p(50) / blocks * 1e3, full.cpu_p(50) / blocks * 1e3, 1.0)]
    for policy in CAPTURE_POLICIES[:3] if quick else CAPTURE_POLICIES:
        timing = repeat(lambda: prefill(policy), repeats)
        rows.append((policy, timing.wall_p(50) / blocks * 1e3, timing.cpu_p(50) / blocks * 1e3,
                     timing.cpu_p(50) / full.cpu_p(50)))
    caption = (f"{Path(name).name} ({dtype_for(name)}), {tokens} tokens in {block}-token "
               f"blocks, nothing evicted (statistics measured)")
    return caption + "\n\n" + markdown(["policy", "wall ms / block", "CPU ms / block", "CPU vs full cache"], rows)


# -- memory and decode on a SmolLM2-shaped model ---------------------------------------------
def smollm_shaped(layers: int) -> torch.nn.Module:
    """SmolLM2-135M's layer shape (576 hidden, 9 query / 3 KV heads of 64, 1536 MLP), random,
    with `layers` layers: per-layer costs as the real model's, in a fraction of the time."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=32768,
                         rope_theta=100000.0, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(config, dtype=MODEL_DTYPE).eval()


def _rss_bytes() -> int:
    """This process's resident set now (Linux /proc)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def _memory_child(context: int, budget: int, block: int, layers: int) -> dict:
    """In a fresh process: prefill `context` tokens evicting to `budget`; peak KV bytes, and the
    resident set before every forward (its largest, and its growth over the model's)."""
    torch.set_num_threads(1)
    model = smollm_shaped(layers)
    ids = torch.randint(10, 49000, (context,), generator=torch.Generator().manual_seed(0))
    baseline, samples = _rss_bytes(), []
    generator = EvictingGenerator(model, EmbeddedManagerClient(), settings("caote+h2o", budget, block))
    result = generator.generate(ids, 1, observer=lambda *_: samples.append(_rss_bytes()))
    peak = max(samples + [_rss_bytes()])
    return {"peak_kv_bytes": result.summary.peak_kv_bytes, "full_cache_bytes": result.summary.full_cache_bytes,
            "rss_mb": peak / 2**20, "rss_growth_mb": (peak - baseline) / 2**20}


def memory_table(quick: bool) -> str:
    contexts = (1024, 2048) if quick else (1024, 2048, 4096, 8192, 16384)
    budget, block, layers = 512, 32, 4
    per_token = layers * 3 * 64 * 2 * MODEL_DTYPE.itemsize  # layers x KV heads x head dim x (K, V) x bytes
    rows = []
    for context in contexts:
        code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.perf_worker import _memory_child; "
                f"print(json.dumps(_memory_child({context}, {budget}, {block}, {layers})))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append((context, measured["peak_kv_bytes"] / 1e6, measured["peak_kv_bytes"] / (budget * per_token),
                     measured["full_cache_bytes"] / 1e6, measured["rss_mb"], measured["rss_growth_mb"]))
    caption = (f"SmolLM2-shaped ({layers} layers), caote+h2o, budget {budget}, block {block}, {MODEL_DTYPE_NAME}; "
               f"the budget's bytes: {budget * per_token / 1e6:.2f} MB")
    return caption + "\n\n" + markdown(["context", "peak KV MB", "peak KV / budget's bytes", "full cache KV MB",
                                        "peak RSS MB (sampled per forward)", "RSS growth MB (over the loaded model)"], rows)


def decode_table(quick: bool) -> str:
    context, budget, block, layers = (2048, 256, 128, 2) if quick else (16384, 1024, 128, 4)
    steps = 2 * block
    model = smollm_shaped(layers)
    ids = torch.randint(10, 49000, (context,), generator=torch.Generator().manual_seed(0))
    rows = []
    for policy in ("caote+h2o", "tova"):
        session = CacheSession(model, EmbeddedManagerClient(), settings(policy, budget, block))
        try:
            logits = session.prefill(ids)
            timing = Timing()
            for _ in range(steps):
                token = int(torch.argmax(logits))
                logits = time_call(lambda: session.decode(token), timing)
            held = max(session.cache.length(layer) for layer in range(layers))
        finally:
            session.close()
        rows.append((f"{policy}, budget {budget}", held, 1 / timing.wall_p(50), 1 / timing.cpu_p(50),
                     timing.wall_p(99) * 1e3))
    # The full cache: `context` tokens of keys and values (their values do not change the time).
    cache = DynamicCache()
    generator = torch.Generator().manual_seed(1)
    for layer in range(layers):
        shape = (1, 3, context, 64)
        cache.update(torch.randn(shape, generator=generator).to(MODEL_DTYPE),
                     torch.randn(shape, generator=generator).to(MODEL_DTYPE), layer)
    timing, token = Timing(), torch.tensor([[11]])
    with torch.inference_mode():
        for step in range(steps):
            position = torch.tensor([[context + step]])
            time_call(lambda: model(input_ids=token, position_ids=position, past_key_values=cache, use_cache=True,
                                    logits_to_keep=1), timing)
    rows.append(("full cache (transformers, SDPA)", context + steps, 1 / timing.wall_p(50), 1 / timing.cpu_p(50),
                 timing.wall_p(99) * 1e3))
    full_rate = rows[-1][3]
    rows = [(*row, row[3] / full_rate) for row in rows]
    caption = (f"SmolLM2-shaped ({layers} layers, per-layer costs as the real model's), context {context}, "
               f"{steps} decode steps (reports every {block}), {MODEL_DTYPE_NAME}, 1 thread")
    return caption + "\n\n" + markdown(["cache", "tokens held per head", "tokens/s (wall p50)", "tokens/s (CPU p50)",
                                        "step p99 ms", "speed vs full cache (CPU)"], rows)


# -- end to end on SmolLM2-135M ------------------------------------------------------------
def end_to_end_table(quick: bool) -> str:
    if quick or not smollm_available():
        name, tokens, new = "models/demo-py", 512, 16
    else:
        name, tokens, new = SMOLLM, 2048, 32
    model, tokenizer = load_model(name, dtype=dtype_for(name))
    ids = suite_prompt_ids(tokenizer, tokens)
    repeats = 2 if quick else 5
    budget, block = max(64, tokens // 8), 128

    def plain():
        return model.generate(ids[None], max_new_tokens=new, min_new_tokens=new, do_sample=False)

    def with_cache():
        with kvevict.EvictingCache(model, "caote+keydiff", budget=budget, block_size=block) as cache:
            return model.generate(ids[None], past_key_values=cache, max_new_tokens=new, min_new_tokens=new,
                                  do_sample=False)

    def worker_loop():
        return EvictingGenerator(model, EmbeddedManagerClient(), settings("caote+keydiff", budget, block)).generate(
            ids, new)

    rows = []
    base = None
    for label, call in (("model.generate, full cache", plain), (f"model.generate + EvictingCache (budget {budget})",
                                                                 with_cache),
                        (f"EvictingGenerator (budget {budget})", worker_loop)):
        timing = repeat(call, repeats)
        base = base or timing
        rows.append((label, timing.wall_p(50), timing.wall_p(99), timing.cpu_p(50), timing.cpu_p(50) / base.cpu_p(50)))
    caption = (f"{Path(name).name} ({dtype_for(name)}), {tokens}-token prompt + "
               f"{new} tokens, caote+keydiff, block {block}, 1 thread")
    return caption + "\n\n" + markdown(["generation", "wall s p50", "wall s p99", "CPU s p50", "CPU vs plain"], rows)
