"""`kvevict client generate` / `kvevict client score`: WorkerService from the terminal."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import grpc

from kvevict import wire
from kvevict.cli_options import budget_spec, policy_label, policy_spec
from kvevict.grpc_options import channel_options
from kvevict.security_options import client_security
from kvevict.v1 import worker_pb2, worker_pb2_grpc
from kvevict.worker import output
from kvevict.worker.summary import EvictionSummary


def eviction_options(args: argparse.Namespace) -> worker_pb2.EvictionOptions:
    return worker_pb2.EvictionOptions(policy=policy_spec(args), budget=budget_spec(args), block_size=args.block_size)


def parse_token_ids(text: str) -> list[int]:
    """`1,2,3` or `1 2 3`."""
    try:
        return [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--token-ids must be integers separated by commas or spaces, got {text!r}") from None


def read_chat(path: Path) -> worker_pb2.ChatPrompt:
    """A JSON list of {"role", "content"} objects, or an object with such a list under "messages"."""
    data = json.loads(path.read_text())
    messages = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ValueError(f"{path}: expected a JSON list of {{\"role\", \"content\"}} objects")
    return worker_pb2.ChatPrompt(messages=[worker_pb2.ChatMessage(role=str(m.get("role", "")),
                                                                  content=str(m.get("content", "")))
                                           for m in messages])


def generate_request(args: argparse.Namespace) -> worker_pb2.GenerateRequest:
    request = worker_pb2.GenerateRequest(
        sampling=worker_pb2.SamplingOptions(temperature=args.temperature, top_p=args.top_p, seed=args.seed),
        max_new_tokens=args.max_new_tokens, stop=args.stop or [],
        keep_conversation=getattr(args, "keep_conversation", False), conversation_id=getattr(args, "conversation", ""))
    if not request.conversation_id:  # a conversation keeps its first turn's eviction settings
        request.eviction.CopyFrom(eviction_options(args))
    if args.token_ids is not None:
        request.token_ids.ids.extend(parse_token_ids(args.token_ids))
    elif args.chat is not None:
        request.chat.CopyFrom(read_chat(args.chat))
    else:
        request.text = args.prompt if args.prompt is not None else args.prompt_file.read_text()
    return request


def run_generate(args: argparse.Namespace) -> int:
    request = generate_request(args)
    text, token_ids = [], []
    security = client_security(args, "")
    with security.channel(args.worker, channel_options()) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        final = None
        try:
            for response in stub.Generate(request, timeout=args.timeout, metadata=security.metadata):
                text.append(response.text)
                token_ids.extend(response.token_ids)
                if response.text and not args.json:
                    sys.stdout.write(response.text)
                    sys.stdout.flush()
                if response.HasField("summary"):
                    final = response
        except grpc.RpcError as error:
            return _rpc_failed(error)
    if final is None:
        print("kvevict: error: the stream ended without a summary", file=sys.stderr)
        return 1
    summary = EvictionSummary.from_proto(final.summary)
    if final.conversation_id:
        print(f"conversation: {final.conversation_id}", file=sys.stderr)
    if args.json:
        print(output.generation_json("".join(text), token_ids, final.finish_reason, summary, policy_label(args)))
    else:
        print("\n")
        print(output.generation_text(final.finish_reason, summary, policy_label(args)))
    return 0


def run_score(args: argparse.Namespace) -> int:
    request = worker_pb2.ScoreRequest(eviction=eviction_options(args))
    if args.token_ids is not None:
        request.token_ids.ids.extend(parse_token_ids(args.token_ids))
    else:
        request.text = args.text if args.text is not None else args.file.read_text()
    security = client_security(args, "")
    with security.channel(args.worker, channel_options()) as channel:
        try:
            response = worker_pb2_grpc.WorkerServiceStub(channel).Score(request, timeout=args.timeout,
                                                                        metadata=security.metadata)
        except grpc.RpcError as error:
            return _rpc_failed(error)
    logprobs = wire.decode(response.token_logprobs, "token_logprobs")
    show = output.score_json if args.json else output.score_text
    print(show(logprobs, response.total_logprob, response.perplexity, EvictionSummary.from_proto(response.summary),
               policy_label(args)))
    return 0


def _rpc_failed(error: grpc.RpcError) -> int:
    print(f"\nkvevict: error: {error.code().name}: {error.details()}", file=sys.stderr)
    return 2 if error.code() == grpc.StatusCode.INVALID_ARGUMENT else 1
