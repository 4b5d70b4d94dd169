"""Pieces of the worker service without a server: streaming detokenization with stop strings, the
FIFO model queue, request validation, and the summary on the wire."""

from __future__ import annotations

import argparse
import dataclasses
import threading
import time

import pytest
from transformers import AutoTokenizer

from kvevict import defaults
from kvevict.cli_options import add_eviction_flags, budget_spec, policy_spec
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import worker_pb2
from kvevict.worker.cache_session import EvictionSettings
from kvevict.worker import prompts
from kvevict.worker.summary import EvictionSummary
from kvevict.worker.prompts import ErrorKind, EvictionDefaults, Limits, RequestError
from kvevict.worker.scheduler import ModelScheduler, QueueFull
from kvevict.worker.server import summary_to_proto
from kvevict.worker.text_stream import REPLACEMENT, TextStream
from tests.checkpoints import save_tiny_checkpoint

MULTIBYTE = "naïve café: 日本語 🙂 ok"
GEOMETRY = pb.ModelGeometry(num_layers=2, num_kv_heads=2, num_query_heads=4, head_dim=8)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = save_tiny_checkpoint(tmp_path_factory.mktemp("tok"), chat_template=True)
    return AutoTokenizer.from_pretrained(path)


def _stream(tokenizer, ids, stop=()):
    stream = TextStream(tokenizer, stop)
    deltas = []
    for token in ids:
        deltas.append(stream.push(token))
        if stream.stopped:
            break
    deltas.append(stream.finish())
    return stream, deltas


def test_deltas_never_split_a_character_and_concatenate_to_the_decoded_text(tokenizer):
    ids = tokenizer(MULTIBYTE).input_ids
    # The characters outside the training text are byte tokens: some ids are half characters.
    assert any(REPLACEMENT in tokenizer.decode([i]) for i in ids)
    _, deltas = _stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids) == MULTIBYTE
    assert not any(REPLACEMENT in delta for delta in deltas)
    assert sum(1 for d in deltas if d) > 5  # streamed, not released at the end


def test_an_incomplete_character_at_the_end_is_released_by_finish(tokenizer):
    ids = tokenizer("ab 🙂").input_ids[:-1]  # the emoji's last byte is missing
    _, deltas = _stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids)
    assert deltas[-1].endswith(REPLACEMENT)


def test_special_tokens_add_no_text(tokenizer):
    ids = tokenizer("def add").input_ids + [tokenizer.eos_token_id]
    _, deltas = _stream(tokenizer, ids)
    assert "".join(deltas) == "def add"


@pytest.mark.parametrize("stop", ["return", "a + b", "🙂", "x\n", "ok"])
def test_stop_string_and_what_follows_are_never_released(tokenizer, stop):
    text = "def add(a, b):\n    return a + b  🙂 x\n ok ok"
    ids = tokenizer(text).input_ids
    stream, deltas = _stream(tokenizer, ids, stop=[stop, "never appears"])
    assert stream.stopped
    assert "".join(deltas) == text[:text.index(stop)]


def test_held_back_prefix_of_a_stop_string_is_released_when_it_is_not_one(tokenizer):
    text = "def add(a, b): return a + b; retur"
    stream, deltas = _stream(tokenizer, tokenizer(text).input_ids, stop=["return b"])
    assert not stream.stopped
    assert "".join(deltas) == text
    assert "retur".endswith(deltas[-1]) and deltas[-1]  # a possible stop string: held until the end


def test_earliest_of_several_stop_strings_wins(tokenizer):
    text = "class Point: def __init__(self, x, y)"
    stream, deltas = _stream(tokenizer, tokenizer(text).input_ids, stop=["(self", "Point", "x"])
    assert stream.stopped and "".join(deltas) == "class "


def test_scheduler_runs_jobs_one_at_a_time_in_arrival_order_and_refuses_beyond_the_queue():
    scheduler = ModelScheduler(max_queue=2)
    release = threading.Event()
    order, running, peak = [], [0], [0]
    lock = threading.Lock()

    def job(i):
        def run():
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            if i == 0:
                release.wait(5)
            order.append(i)
            with lock:
                running[0] -= 1
            return i
        return run

    futures = [scheduler.submit(job(i)) for i in range(3)]  # one running, two waiting
    with pytest.raises(QueueFull):
        scheduler.submit(job(3))
    futures[1].cancel()  # a waiting job leaves the queue...
    futures.append(scheduler.submit(job(4)))  # ...and frees its place
    release.set()
    assert [f.result(5) for f in futures if not f.cancelled()] == [0, 2, 4]
    assert order == [0, 2, 4] and peak[0] == 1
    deadline = time.monotonic() + 5
    while scheduler.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert scheduler.in_flight == 0
    scheduler.close()
    with pytest.raises(QueueFull):
        scheduler.submit(job(5))


def _raises(call, field, kind=ErrorKind.INVALID):
    with pytest.raises(RequestError) as caught:
        call()
    assert caught.value.field == field, str(caught.value)
    assert caught.value.kind == kind
    assert str(caught.value).startswith(f"{field}: ")


LIMITS = Limits(default_max_new_tokens=8, max_new_tokens_limit=50, max_prompt_tokens=20)


def test_prompts_name_the_offending_field(tokenizer):
    def ids(**prompt):
        return lambda: prompts.prompt_ids(worker_pb2.GenerateRequest(**prompt), tokenizer, 299, LIMITS)

    _raises(ids(), "prompt")
    _raises(ids(text=""), "text")
    _raises(ids(token_ids=worker_pb2.TokenIds()), "token_ids.ids")
    _raises(ids(token_ids=worker_pb2.TokenIds(ids=[1, 2, 3, 299])), "token_ids.ids[3]")
    _raises(ids(token_ids=worker_pb2.TokenIds(ids=[1, -2])), "token_ids.ids[1]")
    _raises(ids(text="def add(a, b): return a + b " * 5), "text", ErrorKind.TOO_LARGE)
    _raises(ids(chat=worker_pb2.ChatPrompt()), "chat.messages")
    _raises(ids(chat=worker_pb2.ChatPrompt(messages=[worker_pb2.ChatMessage(content="hi")])), "chat.messages[0].role")
    _raises(lambda: prompts.max_new_tokens(51, LIMITS), "max_new_tokens", ErrorKind.TOO_LARGE)
    assert prompts.max_new_tokens(0, LIMITS) == 8 and prompts.max_new_tokens(50, LIMITS) == 50
    _raises(lambda: prompts.stop_strings(["x", ""]), "stop[1]")
    _raises(lambda: prompts.score_ids(worker_pb2.ScoreRequest(text="d"), tokenizer, 299, LIMITS), "text")
    _raises(lambda: prompts.score_ids(worker_pb2.ScoreRequest(), tokenizer, 299, LIMITS), "input")


def test_chat_prompt_is_rendered_with_the_generation_prompt(tokenizer):
    chat = worker_pb2.ChatPrompt(messages=[worker_pb2.ChatMessage(role="user", content="def add")])
    ids = prompts.prompt_ids(worker_pb2.GenerateRequest(chat=chat), tokenizer, 299, Limits())
    assert tokenizer.decode(ids.tolist()) == "<|user|>def add<eos>\n<|assistant|>"


def test_sampling_and_eviction_are_validated():
    def sampling(**options):
        return lambda: prompts.sampling_config(worker_pb2.SamplingOptions(**options))

    _raises(sampling(temperature=-0.5), "sampling.temperature")
    _raises(sampling(temperature=float("nan")), "sampling.temperature")
    _raises(sampling(top_p=1.5), "sampling.top_p")
    _raises(sampling(top_p=-0.1), "sampling.top_p")
    assert prompts.sampling_config(worker_pb2.SamplingOptions()).top_p == 1.0  # 0 means 1
    defaults = EvictionDefaults(policy=pb.PolicySpec(base="tova"), budget=pb.BudgetSpec(tokens=64), block_size=32)

    def eviction(**options):
        request = worker_pb2.GenerateRequest(eviction=worker_pb2.EvictionOptions(**options))
        return lambda: prompts.eviction_settings(request, defaults, GEOMETRY)

    _raises(eviction(policy=pb.PolicySpec(base="nope"), budget=pb.BudgetSpec(tokens=8)), "eviction.policy.base")
    _raises(eviction(policy=pb.PolicySpec(base="tova"), budget=pb.BudgetSpec(tokens=0)), "eviction.budget.tokens")
    _raises(eviction(policy=pb.PolicySpec(base="tova", sink_tokens=40), budget=pb.BudgetSpec(tokens=16)),
            "eviction.policy.sink_tokens")
    _raises(eviction(policy=pb.PolicySpec(wrapper="caote")), "eviction.policy.base")
    unset = prompts.eviction_settings(worker_pb2.GenerateRequest(), defaults, GEOMETRY)
    assert unset.policy.base == "tova" and unset.budget.tokens == 64 and unset.block_size == 32
    given = eviction(policy=pb.PolicySpec(base="h2o"), budget=pb.BudgetSpec(tokens=8))()
    assert given.policy.base == "h2o" and given.block_size == 32  # block_size 0: the worker's
    budget_only = eviction(budget=pb.BudgetSpec(tokens=8))()  # the policy: the worker's
    assert (budget_only.policy.base, budget_only.budget.tokens, budget_only.block_size) == ("tova", 8, 32)
    policy_only = eviction(policy=pb.PolicySpec(base="h2o"), block_size=4)()  # the budget: the worker's
    assert (policy_only.policy.base, policy_only.budget.tokens, policy_only.block_size) == ("h2o", 64, 4)


def test_the_eviction_defaults_are_one_set_everywhere():
    """The CLI's flags, the worker service's defaults and EvictionSettings (the Python API) all
    default to kvevict.defaults."""
    parser = argparse.ArgumentParser()
    add_eviction_flags(parser)
    args = parser.parse_args([])
    worker, python_api = EvictionDefaults(), EvictionSettings()
    expected = (defaults.BASE, defaults.WRAPPER, defaults.BUDGET_TOKENS, defaults.ALLOCATOR, defaults.BLOCK_SIZE)
    for policy, budget, block_size in ((policy_spec(args), budget_spec(args), args.block_size),
                                       (worker.policy, worker.budget, worker.block_size),
                                       (python_api.policy, python_api.budget, python_api.block_size)):
        assert (policy.base, policy.wrapper, budget.tokens, budget.allocator, block_size) == expected


def test_the_wire_summary_carries_every_field_of_the_generators_summary():
    names = [f.name for f in dataclasses.fields(EvictionSummary)]
    assert set(names) <= set(worker_pb2.EvictionSummary.DESCRIPTOR.fields_by_name)
    summary = EvictionSummary(prompt_tokens=5, generated_tokens=3, evicted_per_layer=[1, 2], final_lengths=[7, 6],
                              peak_lengths=[8, 8], layer_budgets=[6, 6], kv_bytes=100, full_cache_bytes=200,
                              peak_kv_bytes=150, reports=2, report_bytes=64, manager_seconds=0.5,
                              prefill_seconds=0.25, decode_seconds=0.125, manager_fallback=True)
    back = EvictionSummary.from_proto(worker_pb2.EvictionSummary.FromString(summary_to_proto(summary).SerializeToString()))
    assert dataclasses.asdict(back) == dataclasses.asdict(summary)


def test_random_policy_seed_defaults_to_the_sampling_seed():
    defaults = EvictionDefaults(policy=pb.PolicySpec(base="random"), budget=pb.BudgetSpec(tokens=64))
    request = worker_pb2.GenerateRequest(sampling=worker_pb2.SamplingOptions(seed=9))
    assert prompts.eviction_settings(request, defaults, GEOMETRY, sampling_seed=9).policy.seed == 9
    assert defaults.policy.seed == 0  # the worker's defaults are not changed
    request.eviction.CopyFrom(worker_pb2.EvictionOptions(policy=pb.PolicySpec(base="random", seed=4),
                                                         budget=pb.BudgetSpec(tokens=8)))
    assert prompts.eviction_settings(request, defaults, GEOMETRY, sampling_seed=9).policy.seed == 4
