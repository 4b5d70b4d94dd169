"""Every RPC of CacheManagerService and WorkerService fuzzed through real gRPC, with the
generators of benchmarks/fuzz.py (which runs them for 10,000+ requests): requests generated
field by field from their descriptors, valid requests with one field changed, raw bytes.

Against a redis-server, `kvevict manager serve` on it and `kvevict worker serve` (a tiny
checkpoint) using that manager, every call ends with a status a client can act on (never
UNKNOWN or INTERNAL); bytes that are no message are INVALID_ARGUMENT; each manager call gets the
status, and when OK the bytes, that an in-process ManagerCore gives for the same calls; both
servers stay up and SERVING after every case; a well-formed generation running alongside
streams exactly what it streamed alone.

Reproducible: every run draws the same examples (seed 0, whatever the tests' source says);
KVEVICT_FUZZ_SEED=N draws other ones, KVEVICT_FUZZ_SCALE=4 runs four times as many. A failing
case is written as JSON that `benchmarks/fuzz.py --replay FILE` sends again to fresh servers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from benchmarks import fuzz
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import worker_pb2
from tests.conftest import NO_REDIS
from tests.servers import REDIS_SERVER

SEED = int(os.environ.get("KVEVICT_FUZZ_SEED", "0"))
SCALE = float(os.environ.get("KVEVICT_FUZZ_SCALE", "1"))

GENERATED = [kind for kind in fuzz.KINDS if kind.startswith("generated:")]
MUTATED = [kind for kind in fuzz.KINDS if kind.startswith("mutated:")]
METHODS = sorted(fuzz.RPCS)
# Cases per test (x SCALE): about 570 in all, under a minute on two cores.
EXAMPLES = {"generated": 24, "mutated": 36, "mutated:ReportBlock": 80, "generated:ListPolicies": 4,
            "decodable": 8, "undecodable": 10}


def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=max(1, round(examples * SCALE)), deadline=None, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=True)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    if REDIS_SERVER is None:
        pytest.skip(NO_REDIS)
    with fuzz.Servers.started(tmp_path_factory.mktemp("fuzz")) as started:
        yield started


@pytest.fixture(scope="module")
def companion(servers):
    running = fuzz.Companion(servers).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def failures_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-failures")


def fuzz_cases(servers: fuzz.Servers, companion: fuzz.Companion, strategy, examples: int, failures_dir: Path) -> None:
    """Runs hypothesis over `strategy`'s cases (the generation alongside watching) and fails on
    the first case that breaks a rule, saving it for --replay."""
    @fuzz_settings(examples)
    @seed(SEED)
    @given(case=strategy)
    def one(case: fuzz.Case) -> None:
        results = servers.run(case)
        failures = fuzz.judge(case, results) + fuzz.check_servers(servers, case)
        if failures:
            saved = failures_dir / f"case-{len(list(failures_dir.iterdir()))}.json"
            saved.write_text(json.dumps([case.to_json()], indent=1))
            steps = "\n".join(f"  {i} {s.method} ({s.role}, {s.what or '-'}): {r.code} {r.details[:200]}\n"
                              f"    {s.request_text()}" for i, (s, r) in enumerate(zip(case.steps, results)))
            pytest.fail("\n".join(f.describe() for f in failures) + f"\n{steps}\nreplay: .venv/bin/python "
                        f"benchmarks/fuzz.py --replay {saved}", pytrace=False)

    with companion.watching():
        one()


# -- the generators and the rules, without servers ----------------------------------------------


def test_every_rpc_of_both_services_is_fuzzed_every_way():
    described = {method.name for service in fuzz.SERVICES for method in service.methods}
    assert described == {"OpenSession", "ReportBlock", "CloseSession", "GetSession", "ListPolicies", "Generate", "Score"}
    assert {kind.split(":")[1] for kind in GENERATED} == described
    assert {kind.split(":")[1] for kind in fuzz.KINDS if kind.startswith("raw:")} == described
    # ListPolicies has no field to change; its raw bytes carry unknown fields.
    assert {kind.split(":")[1].split("(")[0] for kind in MUTATED} == described - {"ListPolicies"}


def _templates(message, prefix: str = "") -> set[str]:
    """Every field path (indices left out) of a message type, nested messages included."""
    out = set()
    for field in message.DESCRIPTOR.fields:
        out.add(prefix + field.name)
        if field.type == field.TYPE_MESSAGE:
            sub = fuzz.GetMessageClass(field.message_type)()
            out |= _templates(sub, prefix + field.name + ("[]." if field.is_repeated else "."))
    return out


@pytest.mark.parametrize("method", METHODS)
def test_generated_requests_set_every_field_of_the_request_type(method):
    """Over a few hundred draws, every field of the request (and of each nested message) is set
    at least once, and every oneof member chosen."""
    cls = fuzz.RPCS[method].request
    seen: set[str] = set()

    @settings(max_examples=300, database=None, deadline=None, derandomize=True, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(fuzz.messages(cls))
    def draw(message):
        seen.update(site.template.replace("[]", "") for site in fuzz.sites(message)
                    if site.index is None and _is_set(site))

    draw()
    expected = {t.replace("[]", "") for t in _templates(cls())}
    assert expected <= seen, sorted(expected - seen)


def _is_set(site: fuzz.Site) -> bool:
    if site.field.is_repeated:
        return len(getattr(site.owner, site.field.name)) > 0
    if site.field.has_presence:
        return site.owner.HasField(site.field.name)
    return getattr(site.owner, site.field.name) != site.field.default_value


def _full_requests(method: str) -> list:
    """Valid requests of `method` that set every field (one per member of a oneof)."""
    eviction = worker_pb2.EvictionOptions(
        policy=pb.PolicySpec(base="snapkv", wrapper="caote", sink_tokens=1, recent_tokens=2, window=4, pool_kernel=3,
                             seed=5),
        budget=pb.BudgetSpec(tokens=24, allocator="pyramid"), block_size=8)
    sampling = worker_pb2.SamplingOptions(temperature=0.7, top_p=0.9, seed=3)
    if method == "OpenSession":
        request = pb.OpenSessionRequest(
            geometry=pb.ModelGeometry(num_layers=2, num_kv_heads=2, num_query_heads=4, head_dim=8, sliding_windows=[0, 6]),
            policy=eviction.policy, budget=eviction.budget, block_size=8, statistics_dtype=1)
        return [request]
    if method == "ReportBlock":
        builder = fuzz.CaseBuilder("full")
        opened = builder.oracle.core.open_session(pb.OpenSessionRequest(
            geometry=pb.ModelGeometry(num_layers=2, num_kv_heads=2, num_query_heads=2, head_dim=8),
            policy=pb.PolicySpec(base="h2o", wrapper="caote"), budget=pb.BudgetSpec(tokens=8), block_size=4))
        from tests.test_manager_support import Session
        import numpy as np

        return [Session(builder.oracle.core, opened, np.random.default_rng(0), num_layers=2, heads=2).build(6)[0]]
    if method == "Score":
        return [worker_pb2.ScoreRequest(text="def add", eviction=eviction),
                worker_pb2.ScoreRequest(token_ids=worker_pb2.TokenIds(ids=[5, 6, 7]), eviction=eviction)]
    common = dict(eviction=eviction, sampling=sampling, max_new_tokens=4, stop=["\n"], keep_conversation=True,
                  conversation_id=fuzz.CONVERSATION, end_conversation=True)
    chat = worker_pb2.ChatPrompt(messages=[worker_pb2.ChatMessage(role="user", content="hi")])
    return [worker_pb2.GenerateRequest(text="def", **common),
            worker_pb2.GenerateRequest(token_ids=worker_pb2.TokenIds(ids=[5, 6]), **common),
            worker_pb2.GenerateRequest(chat=chat, **common)]


@pytest.mark.parametrize("method", ["OpenSession", "ReportBlock", "GetSession", "CloseSession", "Generate", "Score"])
def test_mutations_reach_every_field_of_a_request(method):
    """Changing one field at a time, every field (nested ones and each element's included) of
    requests that set them all gets changed. Fields are drawn uniformly, so with ~40 fields per
    request 1000 draws leave none out unless the mutator cannot reach it (300 once missed one)."""
    requests = _full_requests(method) if method not in ("GetSession", "CloseSession") else [
        fuzz.RPCS[method].request(session_id=fuzz.SESSION)]
    present = {site.template for request in requests for site in fuzz.sites(request)}
    assert {t.replace("[]", "") for t in present} >= {t.replace("[]", "") for t in _templates(requests[0])}
    changed: set[str] = set()

    @settings(max_examples=1000, database=None, deadline=None, derandomize=True, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(requests).flatmap(fuzz.mutated))
    def draw(mutation):
        changed.add(_template_of(mutation[1].split(":")[0]))

    draw()
    assert present - changed == set()


def _template_of(path: str) -> str:
    import re

    return re.sub(r"\[\d+\]", "[]", path)


def _step(method: str, data: bytes, **fields) -> fuzz.Step:
    return fuzz.Step(method, data, **fields)


def test_the_rules_flag_unknown_internal_undecodable_setup_and_oracle_disagreements():
    ok = fuzz.Result("GetSession", "OK", "", 0.0)
    cases = {
        "status UNKNOWN": ([_step("ListPolicies", b"")], [fuzz.Result("ListPolicies", "UNKNOWN", "boom", 0.0)]),
        "status INTERNAL": ([_step("Score", b"")], [fuzz.Result("Score", "INTERNAL", "bug", 0.0)]),
        "status DEADLINE_EXCEEDED": ([_step("Score", b"")], [fuzz.Result("Score", "DEADLINE_EXCEEDED", "", 60.0)]),
        "status lost in transport": ([_step("OpenSession", b"")], [fuzz.Result(
            "OpenSession", "RESOURCE_EXHAUSTED", "Stream removed (received metadata size exceeds hard limit (value "
            "length 20150 vs. 16384))", 0.0)]),
        "undecodable": ([_step("GetSession", b"\x0a\x05ab")], [fuzz.Result("GetSession", "NOT_FOUND", "", 0.0)]),
        "setup": ([_step("GetSession", b"", role="setup")],
                  [fuzz.Result("GetSession", "INVALID_ARGUMENT", "session_id: missing", 0.0)]),
        "oracle status": ([_step("GetSession", b"", expected="INVALID_ARGUMENT")], [ok]),
        "oracle bytes": ([_step("GetSession", b"", expected="OK", expected_response=b"\x08\x01")], [ok]),
    }
    for name, (steps, results) in cases.items():
        assert len(fuzz.judge(fuzz.Case(name, steps), results)) == 1, name
    fine = [_step("GetSession", b"", expected="INVALID_ARGUMENT"), _step("ListPolicies", b"", expected="OK")]
    assert fuzz.judge(fuzz.Case("fine", fine), [fuzz.Result("GetSession", "INVALID_ARGUMENT", "", 0.0),
                                                 fuzz.Result("ListPolicies", "OK", "", 0.0)]) == []


def test_the_oracle_answers_like_the_manager_for_a_session_it_opened():
    builder = fuzz.CaseBuilder("oracle")
    request = pb.OpenSessionRequest(geometry=pb.ModelGeometry(num_layers=2, num_kv_heads=1, num_query_heads=1, head_dim=8),
                                    policy=pb.PolicySpec(base="h2o"), budget=pb.BudgetSpec(tokens=8), block_size=4)
    assert builder.add("OpenSession", request)[0] == "OK"
    assert builder.add("GetSession", pb.GetSessionRequest(session_id=fuzz.SESSION))[0] == "OK"
    assert builder.add("GetSession", pb.GetSessionRequest(session_id="0" * 32))[0] == "NOT_FOUND"
    assert builder.add("CloseSession", b"\x0a\xff")[0] == "INVALID_ARGUMENT"  # not UTF-8: undecodable
    assert builder.case.steps[-1].undecodable


# -- against the servers ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", GENERATED)
def test_requests_generated_from_the_descriptors_get_a_status_a_client_can_act_on(servers, companion, failures_dir, kind):
    fuzz_cases(servers, companion, fuzz.cases(kind, servers.vocab), EXAMPLES.get(kind, EXAMPLES["generated"]),
               failures_dir)


@pytest.mark.parametrize("kind", MUTATED)
def test_valid_requests_with_one_field_changed_get_a_status_a_client_can_act_on(servers, companion, failures_dir, kind):
    fuzz_cases(servers, companion, fuzz.cases(kind, servers.vocab), EXAMPLES.get(kind, EXAMPLES["mutated"]), failures_dir)


@pytest.mark.parametrize("method", METHODS)
def test_raw_bytes_that_decode_are_served_like_the_message_they_decode_to(servers, companion, failures_dir, method):
    fuzz_cases(servers, companion, fuzz.raw_case(method, servers.vocab, decodable=True), EXAMPLES["decodable"],
               failures_dir)


@pytest.mark.parametrize("method", METHODS)
def test_undecodable_bytes_are_invalid_argument(servers, companion, failures_dir, method):
    fuzz_cases(servers, companion, fuzz.raw_case(method, servers.vocab, decodable=False), EXAMPLES["undecodable"],
               failures_dir)


def test_after_the_fuzzing_both_servers_serve_well_formed_requests(servers, companion):
    assert servers.health() == []
    listed = servers.call("ListPolicies", b"")
    assert listed.code == "OK" and pb.ListPoliciesResponse.FromString(listed.response).policies
    generated = servers.call("Generate", worker_pb2.GenerateRequest(text=fuzz.TEXT, max_new_tokens=3).SerializeToString())
    assert generated.code == "OK" and worker_pb2.GenerateResponse.FromString(generated.response).summary.generated_tokens == 3
    assert companion.runs >= 2 and companion.mismatches == []
