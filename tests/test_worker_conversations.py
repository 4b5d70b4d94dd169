"""Conversations on the worker service: a turn that continues a kept conversation goes on from
its evicted cache, and its tokens equal one CacheSession fed the whole history in the same
order; ids are checked, expire, end, and one request at a time may use a conversation."""

from __future__ import annotations

import time

import grpc
import pytest
import torch

from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import worker_pb2
from kvevict.worker.cache_session import CacheSession, EvictionSettings
from kvevict.worker.manager_client import EmbeddedManagerClient
from kvevict.worker.model_loader import load_model
from kvevict.worker.prompts import eos_token_ids
from tests.checkpoints import TEXT, save_tiny_checkpoint
from tests.test_worker_service import TIMEOUT, _connect, start_workers, worker_argv

EVICTING = worker_pb2.EvictionOptions(policy=pb.PolicySpec(base="tova", wrapper="caote"),
                                      budget=pb.BudgetSpec(tokens=16), block_size=8)
FIRST, SECOND, THIRD = TEXT * 2, "    def norm(self):\n", "        return self.x"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-conversation"), chat_template=True, seed=2)


@pytest.fixture(scope="module")
def worker(checkpoint):
    (process,) = start_workers(worker_argv(checkpoint, "--max-conversations", "2", "--conversation-ttl", "30"))
    connected = _connect(process)
    yield connected
    connected.channel.close()
    process.kill()


@pytest.fixture(scope="module")
def reference(checkpoint):
    return load_model(str(checkpoint))


def turn(stub, **request) -> tuple[list[int], worker_pb2.GenerateResponse]:
    ids, final = [], None
    for response in stub.Generate(worker_pb2.GenerateRequest(**request), timeout=TIMEOUT):
        ids.extend(response.token_ids)
        final = response
    return ids, final


def replay(model, tokenizer, feeds: list[list[int]], max_new_tokens: list[int], eviction=EVICTING) -> list[list[int]]:
    """One CacheSession fed turn by turn: prefill the turn (after the previous turn's last
    token), greedy decode; the tokens of each turn."""
    settings = EvictionSettings(policy=eviction.policy, budget=eviction.budget, block_size=eviction.block_size)
    session = CacheSession(model, EmbeddedManagerClient(), settings)
    eos, turns, last = eos_token_ids(tokenizer, model), [], []
    try:
        for feed, most in zip(feeds, max_new_tokens):
            logits, generated = session.prefill(torch.tensor(last + feed)), []
            while True:
                generated.append(int(torch.argmax(logits)))
                if generated[-1] in eos or len(generated) == most:
                    break
                logits = session.decode(generated[-1])
            turns.append(generated)
            last = generated[-1:]
    finally:
        session.close()
    return turns


def test_a_continued_conversation_equals_one_session_fed_the_whole_history(worker, reference):
    model, tokenizer = reference
    ids1, final1 = turn(worker.stub, text=FIRST, eviction=EVICTING, max_new_tokens=20, keep_conversation=True)
    assert len(final1.conversation_id) == 32
    ids2, final2 = turn(worker.stub, text=SECOND, conversation_id=final1.conversation_id, max_new_tokens=20,
                        keep_conversation=True)
    ids3, final3 = turn(worker.stub, token_ids=worker_pb2.TokenIds(ids=tokenizer(THIRD).input_ids),
                        conversation_id=final2.conversation_id, max_new_tokens=12)
    assert final2.conversation_id == final1.conversation_id and final3.conversation_id == ""
    feeds = [tokenizer(FIRST).input_ids, tokenizer(SECOND, add_special_tokens=False).input_ids,
             tokenizer(THIRD).input_ids]
    assert [ids1, ids2, ids3] == replay(model, tokenizer, feeds, [20, 20, 12])
    assert final1.summary.generated_tokens == 20 and sum(final3.summary.evicted_per_layer) > 0
    # The cache stayed bounded and the history was not prefilled again.
    assert max(final3.summary.peak_lengths) <= 16 + 8
    assert final2.summary.prompt_tokens == len(feeds[1]) + 1
    # Not kept again: gone.
    with pytest.raises(grpc.RpcError) as error:
        turn(worker.stub, text=SECOND, conversation_id=final1.conversation_id)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND and "conversation_id" in error.value.details()


def test_with_nothing_evicted_a_conversation_equals_one_long_prompt(worker, reference):
    model, tokenizer = reference
    roomy = worker_pb2.EvictionOptions(policy=pb.PolicySpec(base="tova"), budget=pb.BudgetSpec(tokens=4096),
                                       block_size=8)
    ids1, final1 = turn(worker.stub, text=FIRST, eviction=roomy, max_new_tokens=10, keep_conversation=True)
    second = tokenizer(SECOND, add_special_tokens=False).input_ids
    ids2, _ = turn(worker.stub, token_ids=worker_pb2.TokenIds(ids=second), conversation_id=final1.conversation_id,
                   max_new_tokens=10)
    history = tokenizer(FIRST).input_ids + ids1 + second
    whole, _ = turn(worker.stub, token_ids=worker_pb2.TokenIds(ids=history), eviction=roomy, max_new_tokens=10)
    assert ids2 == whole


@pytest.mark.parametrize("request_fields,code,field", [
    (dict(text="x", conversation_id="0" * 32), grpc.StatusCode.NOT_FOUND, "conversation_id"),
    (dict(end_conversation=True), grpc.StatusCode.INVALID_ARGUMENT, "end_conversation"),
    (dict(end_conversation=True, conversation_id="0" * 32, text="x"), grpc.StatusCode.INVALID_ARGUMENT,
     "end_conversation"),
    (dict(text="x", conversation_id="0" * 32, eviction=EVICTING), grpc.StatusCode.INVALID_ARGUMENT, "eviction"),
    (dict(chat=worker_pb2.ChatPrompt(messages=[worker_pb2.ChatMessage(role="user", content="hi")]),
          conversation_id="0" * 32), grpc.StatusCode.INVALID_ARGUMENT, "chat"),
])
def test_bad_conversation_requests_get_their_code(worker, request_fields, code, field):
    with pytest.raises(grpc.RpcError) as error:
        turn(worker.stub, **request_fields)
    assert error.value.code() == code and error.value.details().startswith(field)


def test_capacity_end_and_busy(worker):
    _, a = turn(worker.stub, text=FIRST, max_new_tokens=2, keep_conversation=True)
    _, b = turn(worker.stub, text=FIRST, max_new_tokens=2, keep_conversation=True)
    with pytest.raises(grpc.RpcError) as error:  # --max-conversations 2
        turn(worker.stub, text=FIRST, max_new_tokens=2, keep_conversation=True)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "keep_conversation" in error.value.details()
    # Continuing one and keeping it again reuses its slot.
    turn(worker.stub, text=SECOND, conversation_id=a.conversation_id, max_new_tokens=2, keep_conversation=True)
    _, ended = turn(worker.stub, conversation_id=b.conversation_id, end_conversation=True)
    assert ended.finish_reason == worker_pb2.FINISH_REASON_UNSPECIFIED
    with pytest.raises(grpc.RpcError) as error:
        turn(worker.stub, text=SECOND, conversation_id=b.conversation_id)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    # While one request continues `a`, another is refused, and `a` is still there afterwards.
    stream = worker.stub.Generate(worker_pb2.GenerateRequest(text=SECOND, conversation_id=a.conversation_id,
                                                             max_new_tokens=300, keep_conversation=True),
                                  timeout=TIMEOUT)
    next(stream)  # the long turn is running
    with pytest.raises(grpc.RpcError) as error:
        turn(worker.stub, text=SECOND, conversation_id=a.conversation_id)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    *_, last = stream
    assert last.conversation_id == a.conversation_id
    turn(worker.stub, conversation_id=a.conversation_id, end_conversation=True)


def test_a_cancelled_turn_drops_the_conversation(worker):
    _, kept = turn(worker.stub, text=FIRST, max_new_tokens=2, keep_conversation=True)
    stream = worker.stub.Generate(worker_pb2.GenerateRequest(text=SECOND, conversation_id=kept.conversation_id,
                                                             max_new_tokens=300, keep_conversation=True),
                                  timeout=TIMEOUT)
    next(stream)
    stream.cancel()
    deadline = time.monotonic() + 20
    while True:  # the model thread notices at its next token, then drops the mid-turn cache
        try:
            turn(worker.stub, text=SECOND, conversation_id=kept.conversation_id, max_new_tokens=1,
                 keep_conversation=True)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                break
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and time.monotonic() < deadline
            time.sleep(0.05)
            continue
        pytest.fail("a cancelled turn's conversation was continued")


def test_kept_conversations_expire(checkpoint):
    (process,) = start_workers(worker_argv(checkpoint, "--conversation-ttl", "0.5"))
    connected = _connect(process)
    try:
        _, kept = turn(connected.stub, text=FIRST, max_new_tokens=2, keep_conversation=True)
        time.sleep(0.8)
        with pytest.raises(grpc.RpcError) as error:
            turn(connected.stub, text=SECOND, conversation_id=kept.conversation_id)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        connected.channel.close()
        process.kill()


def test_the_store_hands_a_conversation_to_one_request_at_a_time_and_expires_it():
    from kvevict.worker.conversations import Conversation, ConversationError, ConversationStore

    now = [0.0]
    store = ConversationStore(capacity=1, ttl_s=10, clock=lambda: now[0])
    kept = Conversation(session=None, last_token=5)
    key = store.keep(kept)
    with pytest.raises(ConversationError) as error:
        store.check_room()
    assert error.value.kind == "full"
    store.check_room(continuing=key)  # its own slot
    assert store.take(key) is kept
    with pytest.raises(ConversationError) as error:
        store.take(key)
    assert error.value.kind == "busy"
    now[0] = 100.0
    assert store.expired() == []  # in use: never expires under a request
    store.keep(kept)
    now[0] = 109.9
    assert store.expired() == [] and store.take(key) is kept
    store.keep(kept)
    now[0] = 120.0
    with pytest.raises(ConversationError) as error:
        store.take(key)
    assert error.value.kind == "not_found"
    assert store.expired() == [kept] and len(store) == 0


def test_cli_client_keeps_and_continues_a_conversation(worker, capsys):
    from kvevict.cli import main

    flags = ["client", "generate", "--worker", worker.address, "--max-new-tokens", "4", "--json"]
    assert main([*flags, "--keep-conversation", "--policy", "caote+tova", "--budget", "16", "--block-size", "8",
                 FIRST]) == 0
    conversation = capsys.readouterr().err.split("conversation: ")[1].split()[0]
    assert main([*flags, "--conversation", conversation, "--keep-conversation", SECOND]) == 0
    assert capsys.readouterr().err.split("conversation: ")[1].split()[0] == conversation
    assert main([*flags, "--conversation", conversation, SECOND]) == 0
    assert main([*flags, "--conversation", conversation, SECOND]) == 1  # not kept: NOT_FOUND
    assert "NOT_FOUND: conversation_id" in capsys.readouterr().err
