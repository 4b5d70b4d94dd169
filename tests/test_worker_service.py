"""WorkerService through real gRPC: `kvevict worker serve` subprocesses on free ports, serving a tiny
checkpoint saved to a temporary directory.

What a client gets is what EvictingGenerator gives in-process (tokens, text, every summary
number); deltas concatenate to the text; prompts as text, ids or chat; stop strings, max tokens
and EOS end a generation with their finish reason; a cancelled call stops generating and closes
its session; concurrent calls give the sequential outputs; Score equals a plain transformers
forward when nothing is evicted; each bad request gets its status code naming the field and the
server keeps serving; health, reflection, the manager unreachable (fail-open on and off), SIGTERM.
"""

from __future__ import annotations

import json
import math
import re
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from transformers import AutoModelForCausalLM

from kvevict import wire
from kvevict.cli import main
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import worker_pb2, worker_pb2_grpc
from kvevict.worker.cache_session import EvictionSettings
from kvevict.worker.generator import EvictingGenerator, GenerationResult
from kvevict.worker.manager_client import EmbeddedManagerClient
from kvevict.worker.model_loader import load_model
from kvevict.worker.prompts import eos_token_ids
from kvevict.worker.sampling import SamplingConfig
from kvevict.worker.scoring import score_tokens
from tests.checkpoints import TEXT, save_tiny_checkpoint
from tests.reflection_v1 import check_reflection_v1
from tests.servers import ServerProcess, channel, free_port, start_manager, wait_until

WORKER_READY = re.compile(r"event=worker\.ready .*\bport=(\d+)")
TIMEOUT = 60  # seconds per call; generous: the machine is shared
EVICTING = worker_pb2.EvictionOptions(policy=pb.PolicySpec(base="tova", wrapper="caote"),
                                      budget=pb.BudgetSpec(tokens=16), block_size=8)
GREEDY = worker_pb2.SamplingOptions()
SAMPLED = worker_pb2.SamplingOptions(temperature=1.0, top_p=0.9, seed=3)
PROMPT = TEXT * 2  # 70 tokens: several prefill blocks, evicting from the first report
SUMMARY_NUMBERS = ("prompt_tokens", "generated_tokens", "evicted_per_layer", "final_lengths", "peak_lengths",
                   "layer_budgets", "kv_bytes", "full_cache_bytes", "peak_kv_bytes", "reports", "report_bytes",
                   "manager_fallback")
LIMITS = ("--max-queue", "3", "--max-prompt-tokens", "300", "--max-new-tokens-limit", "400",
          "--default-max-new-tokens", "6")


def worker_argv(model: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "kvevict.cli", "worker", "serve", "--port", "0", "--metrics-port", "0",
            "--model", str(model), "--threads", "1", *flags]


def start_workers(*argvs: list[str], timeout_s: float = 120.0) -> list[ServerProcess]:
    """Starts every worker at once (imports overlap), then waits for each ready line."""
    workers = [ServerProcess(argv, WORKER_READY, name=f"worker[{i}]") for i, argv in enumerate(argvs)]
    try:
        for worker in workers:
            worker.wait_ready(timeout_s)
    except BaseException:
        for worker in workers:
            worker.kill()
        raise
    return workers


def address(worker: ServerProcess) -> str:
    return f"127.0.0.1:{worker.match.group(1)}"


@dataclass
class Worker:
    process: ServerProcess
    stub: worker_pb2_grpc.WorkerServiceStub
    channel: grpc.Channel

    @property
    def address(self) -> str:
        return address(self.process)


def _connect(process: ServerProcess) -> Worker:
    chan = channel(address(process))
    return Worker(process, worker_pb2_grpc.WorkerServiceStub(chan), chan)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-chat"), chat_template=True)


@pytest.fixture(scope="module")
def plain_checkpoint(tmp_path_factory) -> Path:
    """No chat template."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-plain"), seed=1)


# The shared worker's eviction defaults: EVICTING's policy and block, a budget nothing here reaches.
DEFAULT_EVICTION = ("--policy", "caote+tova", "--block-size", "8")


@pytest.fixture(scope="module")
def worker(checkpoint):
    """The worker most tests share: embedded manager, small limits, DEFAULT_EVICTION."""
    (process,) = start_workers(worker_argv(checkpoint, *LIMITS, *DEFAULT_EVICTION))
    connected = _connect(process)
    yield connected
    connected.channel.close()
    process.kill()


@dataclass
class Reference:
    model: torch.nn.Module
    tokenizer: object

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text).input_ids

    def generate(self, prompt_ids, max_new_tokens: int, sampling=GREEDY, eviction=EVICTING) -> GenerationResult:
        """EvictingGenerator in this process, as the worker runs it (one CPU thread)."""
        settings = EvictionSettings(policy=eviction.policy, budget=eviction.budget, block_size=eviction.block_size)
        config = SamplingConfig(temperature=sampling.temperature, top_p=sampling.top_p or 1.0, seed=sampling.seed)
        with _one_thread():
            return EvictingGenerator(self.model, EmbeddedManagerClient(), settings).generate(
                prompt_ids, max_new_tokens, config, eos_token_ids=eos_token_ids(self.tokenizer, self.model))

    def text(self, token_ids) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


class _one_thread:
    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


@pytest.fixture(scope="module")
def reference(checkpoint) -> Reference:
    model, tokenizer = load_model(str(checkpoint))
    return Reference(model, tokenizer)


@dataclass
class Streamed:
    deltas: list[str]
    token_ids: list[int]
    final: worker_pb2.GenerateResponse

    @property
    def text(self) -> str:
        return "".join(self.deltas)


def generate(stub, **request) -> Streamed:
    deltas, ids, final = [], [], None
    for response in stub.Generate(worker_pb2.GenerateRequest(**request), timeout=TIMEOUT):
        assert final is None, "nothing may follow the final message"
        deltas.append(response.text)
        ids.extend(response.token_ids)
        if response.HasField("summary"):
            final = response
    assert final is not None and final.finish_reason != worker_pb2.FINISH_REASON_UNSPECIFIED
    return Streamed(deltas, ids, final)


def assert_same_summary(wire_summary: worker_pb2.EvictionSummary, summary) -> None:
    for name in SUMMARY_NUMBERS:
        got = getattr(wire_summary, name)
        assert (list(got) if not isinstance(got, (int, bool)) else got) == getattr(summary, name), name


def finish(reason: int) -> str:
    return worker_pb2.FinishReason.Name(reason)


# -- generation equals the in-process generator ------------------------------------------------


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_generate_streams_exactly_what_the_generator_gives_in_process(worker, reference, sampling):
    expected = reference.generate(reference.ids(PROMPT), 24, sampling)
    got = generate(worker.stub, text=PROMPT, eviction=EVICTING, sampling=sampling, max_new_tokens=24)
    assert got.token_ids == expected.token_ids
    assert got.text == reference.text(expected.token_ids)
    assert len(got.deltas) == len(expected.token_ids) + 1  # a message per token, then the final one
    assert finish(got.final.finish_reason) == ("FINISH_REASON_EOS" if len(expected.token_ids) < 24 else "FINISH_REASON_LENGTH")
    summary = got.final.summary
    assert_same_summary(summary, expected.summary)
    assert sum(summary.evicted_per_layer) > 0 and summary.kv_bytes < summary.full_cache_bytes  # it did evict
    assert summary.prefill_seconds > 0 and summary.decode_seconds > 0 and summary.manager_seconds > 0


def test_sampled_generation_ending_in_eos_finishes_eos(worker, reference):
    hot = worker_pb2.SamplingOptions(temperature=1.5, top_p=1.0)
    ids = reference.ids(PROMPT)
    for seed in range(40):  # the random model samples its EOS now and then: find a seed that does
        hot.seed = seed
        expected = reference.generate(ids, 60, hot)
        if len(expected.token_ids) < 60:
            break
    else:
        pytest.fail("no seed of 40 sampled an EOS within 60 tokens")
    got = generate(worker.stub, text=PROMPT, eviction=EVICTING, sampling=hot, max_new_tokens=60)
    assert finish(got.final.finish_reason) == "FINISH_REASON_EOS"
    assert got.token_ids == expected.token_ids and got.token_ids[-1] in eos_token_ids(reference.tokenizer, reference.model)
    assert got.text == reference.text(expected.token_ids)
    assert_same_summary(got.final.summary, expected.summary)


def test_token_id_and_chat_prompts_generate_like_their_tokens_in_process(worker, reference):
    ids = reference.ids(PROMPT)
    by_ids = generate(worker.stub, token_ids=worker_pb2.TokenIds(ids=ids), eviction=EVICTING, max_new_tokens=10)
    assert by_ids.token_ids == reference.generate(ids, 10).token_ids
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": TEXT}]
    rendered = reference.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|assistant|>")
    chat_ids = reference.tokenizer(rendered, add_special_tokens=False).input_ids
    expected = reference.generate(chat_ids, 10, SAMPLED)
    chat = worker_pb2.ChatPrompt(messages=[worker_pb2.ChatMessage(**m) for m in messages])
    got = generate(worker.stub, chat=chat, eviction=EVICTING, sampling=SAMPLED, max_new_tokens=10)
    assert got.token_ids == expected.token_ids
    assert got.final.summary.prompt_tokens == len(chat_ids)


def test_stop_string_ends_generation_and_is_not_returned(worker, reference):
    expected = reference.generate(reference.ids(PROMPT), 40, SAMPLED)
    pieces = [reference.text(expected.token_ids[:k]) for k in range(len(expected.token_ids) + 1)]
    full = pieces[-1]
    # A printable stop string across a token boundary, a few tokens in.
    stop = next(full[i - 1:i + 1] for k in range(4, len(pieces)) for i in [len(pieces[k - 1])]
                if 0 < i < len(full) and full[i - 1:i + 1].isprintable() and "\ufffd" not in full[i - 1:i + 1]
                and pieces[k - 1] == full[:i])
    cut = full.index(stop)
    stopped_at = next(k for k, text in enumerate(pieces) if stop in text)  # tokens until it appears
    got = generate(worker.stub, text=PROMPT, eviction=EVICTING, sampling=SAMPLED, max_new_tokens=40,
                   stop=["never produced", stop])
    assert finish(got.final.finish_reason) == "FINISH_REASON_STOP"
    assert got.text == full[:cut]
    assert got.token_ids == expected.token_ids[:stopped_at] and stopped_at < 40
    assert got.final.summary.generated_tokens == stopped_at


def test_max_new_tokens_ends_with_length_and_zero_means_the_workers_default(worker):
    for asked, expected in ((3, 3), (0, 6)):  # --default-max-new-tokens 6
        got = generate(worker.stub, text=PROMPT, max_new_tokens=asked)
        assert finish(got.final.finish_reason) == "FINISH_REASON_LENGTH"
        assert len(got.token_ids) == got.final.summary.generated_tokens == expected
    # Without `eviction`: the worker's defaults (caote+tova, budget 512), so nothing is evicted here.
    unset = got.final.summary
    assert sum(unset.evicted_per_layer) == 0 and list(unset.layer_budgets) == [512, 512]


@pytest.mark.parametrize("options", [
    worker_pb2.EvictionOptions(budget=pb.BudgetSpec(tokens=16)),
    worker_pb2.EvictionOptions(policy=pb.PolicySpec(base="tova", wrapper="caote"), budget=pb.BudgetSpec(tokens=16)),
], ids=["budget-only", "no-block-size"])
def test_eviction_options_fields_left_unset_take_the_workers_defaults(worker, reference, options):
    """The worker runs caote+tova with block 8 by default: a request that sets only some fields of
    EvictionOptions generates exactly as EVICTING (caote+tova, budget 16, block 8) in process."""
    ids = reference.ids(PROMPT)
    expected = reference.generate(ids, 12, SAMPLED, eviction=EVICTING)
    got = generate(worker.stub, text=PROMPT, eviction=options, sampling=SAMPLED, max_new_tokens=12)
    assert got.token_ids == expected.token_ids
    assert_same_summary(got.final.summary, expected.summary)
    assert list(got.final.summary.layer_budgets) == [16, 16] and sum(got.final.summary.evicted_per_layer) > 0
    scored = worker.stub.Score(worker_pb2.ScoreRequest(token_ids=worker_pb2.TokenIds(ids=ids), eviction=options),
                               timeout=TIMEOUT)
    with _one_thread():
        in_process = score_tokens(reference.model, EmbeddedManagerClient(), EvictionSettings(
            policy=EVICTING.policy, budget=EVICTING.budget, block_size=EVICTING.block_size), torch.tensor(ids))
    assert np.array_equal(wire.decode(scored.token_logprobs, "token_logprobs"), in_process.token_logprobs.numpy())


# -- cancellation and concurrency ----------------------------------------------------------


def test_cancelled_generation_stops_and_closes_its_session_and_the_worker_goes_on(worker, reference):
    call = worker.stub.Generate(worker_pb2.GenerateRequest(text=PROMPT, eviction=EVICTING, max_new_tokens=400),
                                timeout=TIMEOUT)
    for _, _ in zip(range(3), call):
        pass
    call.cancel()
    with pytest.raises(grpc.RpcError) as caught:
        for _ in call:
            pass
    assert caught.value.code() == grpc.StatusCode.CANCELLED
    line = wait_until(lambda: worker.process.lines(r"event=generate\.job .*outcome=cancelled"), 30,
                      what="the cancelled job's log line")[-1]
    assert int(re.search(r"\btokens=(\d+)", line).group(1)) < 400  # stopped early...
    assert re.search(r"\bopen_sessions=0\b", line)  # ...and its manager session is closed
    health = health_pb2_grpc.HealthStub(worker.channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    ids = reference.ids(PROMPT)
    assert generate(worker.stub, text=PROMPT, eviction=EVICTING, max_new_tokens=5).token_ids == \
        reference.generate(ids, 5).token_ids


def test_concurrent_generations_equal_sequential_ones(worker):
    from kvevict.worker.summary import EvictionSummary

    requests = [dict(text=TEXT[i * 7:] + TEXT, eviction=EVICTING, max_new_tokens=12,
                     sampling=SAMPLED if i % 2 else GREEDY) for i in range(4)]
    sequential = [generate(worker.stub, **r) for r in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        concurrent = list(pool.map(lambda r: generate(worker.stub, **r), requests))
    for one, other in zip(sequential, concurrent):
        assert (one.token_ids, one.text) == (other.token_ids, other.text)
        assert_same_summary(one.final.summary, EvictionSummary.from_proto(other.final.summary))


def test_requests_beyond_the_queue_are_refused_resource_exhausted(worker):
    """--max-queue 3: one generation runs, three wait, the other four are refused at once."""
    refusals = r"event=generate\.rejected .*code=RESOURCE_EXHAUSTED"
    before = len(worker.process.lines(refusals))
    calls = [worker.stub.Generate(worker_pb2.GenerateRequest(text=PROMPT, max_new_tokens=400), timeout=TIMEOUT)
             for _ in range(8)]
    wait_until(lambda: len(worker.process.lines(refusals)) >= before + 4, 30, what="four refusals")
    for call in calls:
        call.cancel()
    codes = [call.code() for call in calls]
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 4, codes
    assert codes.count(grpc.StatusCode.CANCELLED) == 4, codes
    assert "max queue 3" in next(c.details() for c in calls if c.code() == grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert generate(worker.stub, text=PROMPT, max_new_tokens=2).final.summary.generated_tokens == 2


# -- scoring -------------------------------------------------------------------------------


def test_score_without_eviction_equals_a_plain_transformers_forward(worker, checkpoint, reference):
    ids = reference.ids(PROMPT)
    response = worker.stub.Score(worker_pb2.ScoreRequest(
        text=PROMPT, eviction=worker_pb2.EvictionOptions(policy=pb.PolicySpec(base="h2o"), budget=pb.BudgetSpec(tokens=1000),
                                                         block_size=16)), timeout=TIMEOUT)
    logprobs = wire.decode(response.token_logprobs, "token_logprobs")
    assert logprobs.dtype == np.float32 and logprobs.shape == (len(ids) - 1,) == (response.scored_tokens,)
    plain = AutoModelForCausalLM.from_pretrained(checkpoint)  # stock attention, no cache, no eviction
    with torch.no_grad(), _one_thread():
        logits = plain(torch.tensor([ids])).logits[0, :-1].float()
    expected = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()
    assert np.abs(logprobs - expected).max() < 1e-4
    assert math.isclose(response.total_logprob, float(logprobs.astype(np.float64).sum()), rel_tol=1e-6)
    assert math.isclose(response.perplexity, math.exp(-float(logprobs.astype(np.float64).mean())), rel_tol=1e-6)
    assert sum(response.summary.evicted_per_layer) == 0 and response.summary.prompt_tokens == len(ids)

    evicting = worker.stub.Score(worker_pb2.ScoreRequest(token_ids=worker_pb2.TokenIds(ids=ids), eviction=EVICTING),
                                 timeout=TIMEOUT)
    evicted = wire.decode(evicting.token_logprobs, "token_logprobs")
    assert np.abs(evicted - expected).max() > 1e-3  # the evicted cache changes the predictions
    assert sum(evicting.summary.evicted_per_layer) > 0
    with _one_thread():
        in_process = score_tokens(reference.model, EmbeddedManagerClient(), EvictionSettings(
            policy=EVICTING.policy, budget=EVICTING.budget, block_size=EVICTING.block_size), torch.tensor(ids))
    assert np.array_equal(evicted, in_process.token_logprobs.numpy())
    assert math.isclose(evicting.perplexity, math.exp(-float(evicted.astype(np.float64).mean())), rel_tol=1e-6)


# -- bad requests --------------------------------------------------------------------------

INVALID = grpc.StatusCode.INVALID_ARGUMENT
TOO_LARGE = grpc.StatusCode.RESOURCE_EXHAUSTED
BAD_GENERATE = [
    ({}, INVALID, "prompt"),
    ({"text": ""}, INVALID, "text"),
    ({"token_ids": worker_pb2.TokenIds()}, INVALID, "token_ids.ids"),
    ({"token_ids": worker_pb2.TokenIds(ids=[5, 6, 7, 10**6])}, INVALID, "token_ids.ids[3]"),
    ({"token_ids": worker_pb2.TokenIds(ids=[-1])}, INVALID, "token_ids.ids[0]"),
    ({"chat": worker_pb2.ChatPrompt()}, INVALID, "chat.messages"),
    ({"text": "x", "sampling": worker_pb2.SamplingOptions(temperature=-1)}, INVALID, "sampling.temperature"),
    ({"text": "x", "sampling": worker_pb2.SamplingOptions(top_p=1.5)}, INVALID, "sampling.top_p"),
    ({"text": "x", "stop": [""]}, INVALID, "stop[0]"),
    ({"text": "x", "eviction": worker_pb2.EvictionOptions(policy=pb.PolicySpec(base="nope"), budget=pb.BudgetSpec(tokens=8))},
     INVALID, "eviction.policy.base"),
    ({"text": "x", "eviction": worker_pb2.EvictionOptions(policy=pb.PolicySpec(base="tova"), budget=pb.BudgetSpec())},
     INVALID, "eviction.budget.tokens"),
    ({"text": "x", "eviction": worker_pb2.EvictionOptions(policy=pb.PolicySpec(wrapper="caote"))}, INVALID,
     "eviction.policy.base"),
    ({"text": "x", "eviction": worker_pb2.EvictionOptions(policy=pb.PolicySpec(base="tova", wrapper="zap"),
                                                          budget=pb.BudgetSpec(tokens=8))}, INVALID, "eviction.policy.wrapper"),
    ({"text": "x", "eviction": worker_pb2.EvictionOptions(policy=pb.PolicySpec(base="tova", sink_tokens=40),
                                                          budget=pb.BudgetSpec(tokens=16))}, INVALID,
     "eviction.policy.sink_tokens"),
    ({"text": "x", "max_new_tokens": 401}, TOO_LARGE, "max_new_tokens"),
    ({"text": TEXT * 10}, TOO_LARGE, "text"),
    ({"token_ids": worker_pb2.TokenIds(ids=[5] * 301)}, TOO_LARGE, "token_ids"),
]


@pytest.mark.parametrize("request_fields,code,field", BAD_GENERATE, ids=[f for _, _, f in BAD_GENERATE])
def test_bad_generate_request_gets_its_code_naming_the_field(worker, request_fields, code, field):
    with pytest.raises(grpc.RpcError) as caught:
        generate(worker.stub, **request_fields)
    assert caught.value.code() == code
    assert caught.value.details().startswith(f"{field}: "), caught.value.details()


BAD_SCORE = [
    ({}, INVALID, "input"),
    ({"text": "d"}, INVALID, "text"),  # one token: nothing to predict
    ({"token_ids": worker_pb2.TokenIds(ids=[5, 299])}, INVALID, "token_ids.ids[1]"),
    ({"text": "def add", "eviction": worker_pb2.EvictionOptions(policy=pb.PolicySpec(base="nope"), budget=pb.BudgetSpec(tokens=8))},
     INVALID, "eviction.policy.base"),
    ({"text": TEXT * 10}, TOO_LARGE, "text"),
]


@pytest.mark.parametrize("request_fields,code,field", BAD_SCORE, ids=[f for _, _, f in BAD_SCORE])
def test_bad_score_request_gets_its_code_naming_the_field(worker, request_fields, code, field):
    with pytest.raises(grpc.RpcError) as caught:
        worker.stub.Score(worker_pb2.ScoreRequest(**request_fields), timeout=TIMEOUT)
    assert caught.value.code() == code
    assert caught.value.details().startswith(f"{field}: "), caught.value.details()


def test_worker_keeps_serving_after_bad_requests(worker):
    for request_fields, _, _ in BAD_GENERATE:
        with pytest.raises(grpc.RpcError):
            generate(worker.stub, **request_fields)
    assert generate(worker.stub, text=PROMPT, max_new_tokens=2).final.summary.generated_tokens == 2
    assert worker.process.process.poll() is None
    assert not worker.process.lines(r"level=error|Traceback")


# -- health, reflection, CLI ---------------------------------------------------------------


def test_health_is_serving_and_reflection_lists_the_services(worker):
    health = health_pb2_grpc.HealthStub(worker.channel)
    for service in ("", "kvevict.v1.WorkerService"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT).status == \
            health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(worker.channel)
    answers = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=TIMEOUT)
    services = {s.name for answer in answers for s in answer.list_services_response.service}
    assert {"kvevict.v1.WorkerService", "grpc.health.v1.Health"} <= services


def test_reflection_v1_lists_the_services_and_resolves_their_files(worker):
    check_reflection_v1(worker.channel, "kvevict.v1.WorkerService", {"Generate", "Score"})


def test_cli_client_generate_streams_text_then_the_summary(worker, reference, capsys):
    ids = reference.ids(PROMPT)
    expected = reference.generate(ids, 8, SAMPLED)
    status = main(["client", "generate", "--worker", worker.address, PROMPT, "--policy", "tova", "--wrapper", "caote",
                   "--budget", "16", "--block-size", "8", "--max-new-tokens", "8", "--temperature", "1.0",
                   "--top-p", "0.9", "--seed", "3"])
    out = capsys.readouterr().out
    assert status == 0
    assert out.startswith(reference.text(expected.token_ids) + "\n\nfinish reason: ")
    assert "== eviction summary: caote+tova, budget 16 (uniform), block 8 ==" in out
    assert f"tokens: {len(ids)} prompt + {len(expected.token_ids)} generated" in out
    rows = re.findall(r"^\s+(\d+)\s+16\s+(\d+)\s+(\d+)\s+(\d+)$", out, flags=re.M)
    assert [(int(r[1]), int(r[2])) for r in rows] == list(zip(expected.summary.evicted_per_layer,
                                                              expected.summary.final_lengths))


def test_cli_client_chat_token_ids_and_score(worker, reference, tmp_path, capsys):
    messages = [{"role": "user", "content": TEXT}]
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps(messages))
    chat_ids = reference.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_tokens = len(reference.tokenizer(chat_ids, add_special_tokens=False).input_ids)
    assert main(["client", "generate", "--worker", worker.address, "--chat", str(chat), "--max-new-tokens", "4"]) == 0
    assert f"tokens: {prompt_tokens} prompt + 4 generated" in capsys.readouterr().out
    assert main(["client", "generate", "--worker", worker.address, "--token-ids", "5 6 7", "--max-new-tokens", "2"]) == 0
    assert "tokens: 3 prompt + 2 generated" in capsys.readouterr().out
    scored = len(reference.ids(PROMPT)) - 1
    assert main(["client", "score", "--worker", worker.address, "--text", PROMPT, "--budget", "16",
                 "--block-size", "8"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"^tokens scored: {scored}$", out, flags=re.M)
    total = float(re.search(r"^total log-prob: (-?[\d.]+) nats", out, flags=re.M).group(1))
    perplexity = float(re.search(r"^perplexity: ([\d.]+)$", out, flags=re.M).group(1))
    assert math.isclose(perplexity, math.exp(-total / scored), rel_tol=1e-3)
    assert "== eviction summary: tova, budget 16 (uniform), block 8 ==" in out
    assert main(["client", "generate", "--worker", worker.address, "--token-ids", "1,2,100000"]) == 2
    assert "INVALID_ARGUMENT: token_ids.ids[2]: " in capsys.readouterr().err


def test_cli_client_json_is_what_the_generator_and_scoring_give_in_process(worker, reference, capsys):
    ids = reference.ids(PROMPT)
    expected = reference.generate(ids, 8, SAMPLED)
    assert main(["client", "generate", "--worker", worker.address, PROMPT, "--policy", "caote+tova", "--budget", "16",
                 "--block-size", "8", "--max-new-tokens", "8", "--temperature", "1.0", "--top-p", "0.9", "--seed", "3",
                 "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["token_ids"] == expected.token_ids and got["completion"] == reference.text(expected.token_ids)
    assert got["finish_reason"] in ("length", "eos") and got["policy"] == "caote+tova, budget 16 (uniform), block 8"
    assert {k: v for k, v in got["summary"].items() if k in SUMMARY_NUMBERS} == \
        {name: getattr(expected.summary, name) for name in SUMMARY_NUMBERS}
    assert main(["client", "score", "--worker", worker.address, "--text", PROMPT, "--policy", "caote+tova",
                 "--budget", "16", "--block-size", "8", "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    with _one_thread():
        in_process = score_tokens(reference.model, EmbeddedManagerClient(), EvictionSettings(
            policy=EVICTING.policy, budget=EVICTING.budget, block_size=EVICTING.block_size), torch.tensor(ids))
    assert scored["token_logprobs"] == in_process.token_logprobs.tolist()
    assert scored["scored_tokens"] == len(ids) - 1 and math.isclose(scored["perplexity"], in_process.perplexity,
                                                                   rel_tol=1e-6)


# -- workers in trouble: no chat template, manager unreachable, SIGTERM --------------------


@pytest.fixture(scope="module")
def spare_workers(plain_checkpoint):
    """Started together, on a checkpoint without a chat template: [0] manager unreachable,
    fail-open off; [1] manager unreachable, fail-open on; [2] for the SIGTERM test; [3] with a
    real `kvevict manager serve` (in-memory state), the manager process as `.manager`."""
    manager = start_manager()
    dead = f"127.0.0.1:{free_port()}"
    unreachable = ("--manager", dead, "--manager-timeout", "0.2", "--manager-retries", "1")
    try:
        processes = start_workers(worker_argv(plain_checkpoint, *unreachable, "--no-fail-open"),
                                  worker_argv(plain_checkpoint, *unreachable, "--fail-open"),
                                  worker_argv(plain_checkpoint, "--grace", "2.5", "--max-new-tokens-limit", "4000"),
                                  worker_argv(plain_checkpoint, "--manager", manager.address, "--no-fail-open"))
    except BaseException:
        manager.kill()
        raise
    workers = [_connect(p) for p in processes]
    workers[3].manager = manager
    yield workers
    for w in workers:
        w.channel.close()
        w.process.kill()
    manager.kill()


@pytest.fixture(scope="module")
def plain_reference(plain_checkpoint) -> Reference:
    model, tokenizer = load_model(str(plain_checkpoint))
    return Reference(model, tokenizer)


def test_generation_through_a_remote_manager_equals_the_embedded_one(spare_workers, plain_reference):
    remote = spare_workers[3]
    expected = plain_reference.generate(plain_reference.ids(PROMPT), 20, SAMPLED)
    got = generate(remote.stub, text=PROMPT, eviction=EVICTING, sampling=SAMPLED, max_new_tokens=20)
    assert got.token_ids == expected.token_ids
    assert_same_summary(got.final.summary, expected.summary)
    assert not got.final.summary.manager_fallback and got.final.summary.reports == expected.summary.reports > 0
    assert len(remote.manager.lines(r"event=session\.open")) == len(remote.manager.lines(r"event=session\.close")) == 1
    scored = remote.stub.Score(worker_pb2.ScoreRequest(text=PROMPT, eviction=EVICTING), timeout=TIMEOUT)
    with _one_thread():
        in_process = score_tokens(plain_reference.model, EmbeddedManagerClient(), EvictionSettings(
            policy=EVICTING.policy, budget=EVICTING.budget, block_size=EVICTING.block_size),
            torch.tensor(plain_reference.ids(PROMPT)))
    assert np.array_equal(wire.decode(scored.token_logprobs, "token_logprobs"), in_process.token_logprobs.numpy())


def test_chat_prompt_without_a_chat_template_is_failed_precondition(spare_workers):
    chat = worker_pb2.ChatPrompt(messages=[worker_pb2.ChatMessage(role="user", content="hi")])
    with pytest.raises(grpc.RpcError) as caught:
        generate(spare_workers[2].stub, chat=chat)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.details().startswith("chat: ")


def test_manager_unreachable_without_fail_open_is_unavailable_and_the_worker_goes_on(spare_workers):
    strict = spare_workers[0]
    for _ in range(2):
        with pytest.raises(grpc.RpcError) as caught:
            generate(strict.stub, text=PROMPT, eviction=EVICTING, max_new_tokens=3)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "manager" in caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:
            strict.stub.Score(worker_pb2.ScoreRequest(text=PROMPT, eviction=EVICTING), timeout=TIMEOUT)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    # Validation comes first: a bad request is still INVALID_ARGUMENT.
    with pytest.raises(grpc.RpcError) as caught:
        generate(strict.stub, text="")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_manager_unreachable_with_fail_open_generates_in_process(spare_workers, plain_reference):
    got = generate(spare_workers[1].stub, text=PROMPT, eviction=EVICTING, max_new_tokens=12)
    expected = plain_reference.generate(plain_reference.ids(PROMPT), 12)
    assert got.final.summary.manager_fallback
    assert got.token_ids == expected.token_ids  # the same policy code decided, in the worker
    assert list(got.final.summary.evicted_per_layer) == expected.summary.evicted_per_layer


def test_sigterm_finishes_what_fits_in_the_grace_period_and_cancels_the_rest(spare_workers):
    """--grace 2.5: the generation running at SIGTERM completes; a long one queued behind it is
    cancelled when the grace period ends; the process exits 0."""
    worker = spare_workers[2]
    queued = r"event=generate\.queued"
    short = worker.stub.Generate(worker_pb2.GenerateRequest(text=PROMPT, max_new_tokens=120), timeout=TIMEOUT)
    first = next(short)
    long = worker.stub.Generate(worker_pb2.GenerateRequest(text=PROMPT, max_new_tokens=4000), timeout=TIMEOUT)
    wait_until(lambda: len(worker.process.lines(queued)) == 2, 30, what="the long generation queued")
    assert not worker.process.lines(r"event=generate\.done")  # the short one still runs
    started = time.monotonic()
    worker.process.send_signal(signal.SIGTERM)
    rest = list(short)
    assert rest[-1].HasField("summary")
    assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == 120
    with pytest.raises(grpc.RpcError) as caught:
        for _ in long:
            pass
    assert caught.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    assert worker.process.stop(timeout_s=30) == 0
    assert time.monotonic() - started < 20
    assert worker.process.lines(r"event=generate\.job .*outcome=cancelled")
    assert worker.process.lines(r"event=worker\.stopped")
