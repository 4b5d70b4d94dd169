"""WorkerService over gRPC (grpc.aio): generation and scoring with an evicting KV cache.

The servicer is thin: it validates a request (`prompts`), queues a job for the model thread
(`scheduler`: one request at a time, in arrival order, at most `max_queue` waiting), streams
what the job produces and maps failures to status codes:

    no or a wrong token / client certificate ............... UNAUTHENTICATED
    a client certificate not allowed ....................... PERMISSION_DENIED
    request bytes that are not a request message ........... INVALID_ARGUMENT
    request field invalid (named in the details) ........... INVALID_ARGUMENT
    conversation_id unknown, expired or another client's ... NOT_FOUND
    chat prompt, tokenizer without chat template ........... FAILED_PRECONDITION
    queue full; prompt or max_new_tokens above the limits .. RESOURCE_EXHAUSTED
    model still loading; shutting down; manager
      unreachable with fail-open off ....................... UNAVAILABLE
    manager lost the session (fail-open off) ............... ABORTED
    manager refused the session (a limit; fail-open off) ... RESOURCE_EXHAUSTED
    manager refused the worker's report (fail-open off) .... UNAVAILABLE
    anything else (a bug, logged with its traceback) ....... INTERNAL

Generate streams one message per generated token (its id, and the text it completes, possibly
empty while a character or a possible stop string is incomplete), then a final message with the
remaining text, the finish reason and the eviction summary. A cancelled call (client gone,
deadline, shutdown) stops the generation at its next token; the generator then closes the
manager session. Score runs to completion once started (it has no per-token hook).

Health (grpc.health.v1) is NOT_SERVING while the model loads and SERVING from then on for ""
and "kvevict.v1.WorkerService"; reflection (grpc.reflection.v1 and v1alpha) lists WorkerService,
Health and itself. Prometheus metrics
(kvevict.worker.metrics) are served over HTTP on `metrics_port` (0: a free one, -1: none), on the
same host as gRPC, from before the model loads.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import grpc
import torch
from grpc_health.v1 import health_pb2

from kvevict import wire
from kvevict.cache_manager.errors import Aborted, InvalidArgument, ManagerError, NotFound, ResourceExhausted
from kvevict.logs import RateLimitedLog, log_event
from kvevict.grpc_options import DEFAULT_MAX_MESSAGE_BYTES, server_options
from kvevict.grpc_server import ServiceHealth, bind, status_details
from kvevict.request_decoding import RequestDecodingInterceptor
from kvevict.security_options import ClientSecurity, ServerSecurity
from kvevict.metrics import DISABLED_PORT, MetricsServer, check_metrics_port
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import worker_pb2, worker_pb2_grpc
from kvevict.worker import prompts
from kvevict.worker.completion import Completion, complete
from kvevict.worker.conversations import Conversation, ConversationError, ConversationStore
from kvevict.worker.generator import EvictingGenerator
from kvevict.worker.summary import EvictionSummary
from kvevict.worker.manager_client import EmbeddedManagerClient, ManagerClient
from kvevict.worker.metrics import WorkerMetrics
from kvevict.worker.model_loader import default_threads, geometry_of, load_model
from kvevict.worker.prompts import ErrorKind, EvictionDefaults, Limits, RequestError
from kvevict.worker.remote_manager import ManagerUnavailable, RemoteManagerClient
from kvevict.worker.scheduler import ModelScheduler, QueueFull
from kvevict.worker.scoring import score_tokens

log = logging.getLogger("kvevict.worker")

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name
_KIND_CODES = {ErrorKind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
               ErrorKind.TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
               ErrorKind.PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION}
# The `outcome` of kvevict_worker_requests_total of a failed request, by its status code (else
# "error"); the model still loading or the worker shutting down are "rejected" (see _runtime).
_CONVERSATION_CODES = {"not_found": (grpc.StatusCode.NOT_FOUND, "conversation_id"),
                       "busy": (grpc.StatusCode.FAILED_PRECONDITION, "conversation_id"),
                       "full": (grpc.StatusCode.RESOURCE_EXHAUSTED, "keep_conversation")}
_CODE_OUTCOMES = {grpc.StatusCode.CANCELLED: "cancelled", grpc.StatusCode.INVALID_ARGUMENT: "invalid",
                  grpc.StatusCode.FAILED_PRECONDITION: "invalid", grpc.StatusCode.RESOURCE_EXHAUSTED: "rejected"}


@dataclass(frozen=True)
class WorkerConfig:
    """Everything `worker serve` is configured with (flags / KVEVICT_* environment variables)."""

    model: str
    eviction: EvictionDefaults
    limits: Limits = Limits()
    host: str = "127.0.0.1"
    port: int = 50052  # 0 = any free port (logged in the ready line)
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None  # CPU threads of the model (None: default_threads())
    trust_remote_code: bool = False
    manager: str = "embedded"  # or host:port of a CacheManagerService
    manager_timeout_s: float = 5.0
    manager_retry_budget_s: float = 15.0  # of retries per manager call: covers a manager or Redis restart
    manager_retries: int | None = None  # an extra cap on retries per call (None: the budget alone)
    manager_security: ClientSecurity = ClientSecurity()  # TLS and token of the manager channel
    security: ServerSecurity = ServerSecurity()  # TLS and tokens of this worker's own clients
    max_queue: int = 16  # requests waiting behind the running one
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    grace_s: float = 10.0
    metrics_port: int = 9465  # Prometheus /metrics; 0 = any free port, -1 = none
    max_conversations: int = 16  # conversations kept between requests (keep_conversation)
    conversation_ttl_s: float = 600.0  # a kept conversation unused this long is dropped

    def __post_init__(self) -> None:
        check_metrics_port(self.metrics_port)
        if self.max_conversations < 0 or self.conversation_ttl_s <= 0:
            raise ValueError(f"need max conversations >= 0 and conversation TTL > 0, got {self.max_conversations} "
                             f"and {self.conversation_ttl_s}")
        for name in ("port", "max_queue", "grace_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.manager_retries is not None and self.manager_retries < 0:
            raise ValueError(f"manager_retries must be >= 0, got {self.manager_retries}")
        for name in ("manager_timeout_s", "manager_retry_budget_s", "max_message_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        limits = self.limits
        if limits.max_new_tokens_limit < 1 or not 1 <= limits.default_max_new_tokens <= limits.max_new_tokens_limit:
            raise ValueError(f"need 1 <= default max new tokens ({limits.default_max_new_tokens}) <= "
                             f"max new tokens limit ({limits.max_new_tokens_limit})")
        if limits.max_prompt_tokens < 1:
            raise ValueError(f"max prompt tokens must be >= 1, got {limits.max_prompt_tokens}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


@dataclass(frozen=True)
class ModelRuntime:
    """The loaded model and what requests are checked against."""

    model: torch.nn.Module
    tokenizer: object
    eos_token_ids: frozenset[int]
    vocab_size: int
    geometry: pb.ModelGeometry

    @classmethod
    def load(cls, config: WorkerConfig) -> ModelRuntime:
        model, tokenizer = load_model(config.model, device=config.device, dtype=config.dtype,
                                      trust_remote_code=config.trust_remote_code)
        return cls(model=model, tokenizer=tokenizer, eos_token_ids=frozenset(prompts.eos_token_ids(tokenizer, model)),
                   vocab_size=prompts.vocabulary_size(model), geometry=geometry_of(model))


class TrackingManagerClient:
    """A ManagerClient that counts the sessions it opened and has not closed yet (the logs show
    that a cancelled request closed its session)."""

    def __init__(self, inner: ManagerClient) -> None:
        self.inner = inner
        self.open_sessions = 0
        self._lock = threading.Lock()

    def open_session(self, request: pb.OpenSessionRequest) -> pb.OpenSessionResponse:
        response = self.inner.open_session(request)
        with self._lock:
            self.open_sessions += 1
        return response

    def report_block(self, request: pb.ReportBlockRequest) -> pb.ReportBlockResponse:
        return self.inner.report_block(request)

    def close_session(self, request: pb.CloseSessionRequest) -> pb.CloseSessionResponse:
        try:
            return self.inner.close_session(request)
        finally:  # a failed close leaves the session to its TTL: nothing more to do here
            with self._lock:
                self.open_sessions -= 1

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()


def make_manager(config: WorkerConfig, metrics: WorkerMetrics | None = None) -> TrackingManagerClient:
    if config.manager == "embedded":
        return TrackingManagerClient(EmbeddedManagerClient())
    security = config.manager_security
    return TrackingManagerClient(RemoteManagerClient(config.manager, timeout_s=config.manager_timeout_s,
                                                     retries=config.manager_retries,
                                                     retry_budget_s=config.manager_retry_budget_s,
                                                     max_message_bytes=config.max_message_bytes,
                                                     on_retry=None if metrics is None else metrics.retried,
                                                     credentials=security.credentials(), token=security.token))


def summary_to_proto(summary: EvictionSummary) -> worker_pb2.EvictionSummary:
    """Every field of the generator's summary."""
    return worker_pb2.EvictionSummary(
        prompt_tokens=summary.prompt_tokens, generated_tokens=summary.generated_tokens,
        evicted_per_layer=summary.evicted_per_layer, final_lengths=summary.final_lengths,
        layer_budgets=summary.layer_budgets, kv_bytes=summary.kv_bytes, full_cache_bytes=summary.full_cache_bytes,
        peak_kv_bytes=summary.peak_kv_bytes, reports=summary.reports, prefill_seconds=summary.prefill_seconds,
        decode_seconds=summary.decode_seconds, manager_seconds=summary.manager_seconds,
        manager_fallback=summary.manager_fallback, peak_lengths=summary.peak_lengths,
        report_bytes=summary.report_bytes, final_head_lengths=summary.final_head_lengths,
        kept_kv_bytes=summary.kept_kv_bytes,
    )


class Cancelled(Exception):
    """Raised inside the model thread when the request's call is gone."""


@dataclass
class _Delta:
    text: str
    token_id: int


@dataclass
class _Job:
    """What runs on the model thread for one call, with the call's cancel flag and timings."""

    request_id: str
    identity: str = ""  # the caller (kvevict.auth): owner of the conversations it keeps
    cancel: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None
    tokens: int = 0  # generated so far
    outcome: str | None = None  # how the call ended, once known (counted once)

    def check(self, _=None) -> None:
        if self.cancel.is_set():
            raise Cancelled()

    def begin(self) -> None:
        self.started = time.perf_counter()
        self.check()

    @property
    def queue_seconds(self) -> float:
        return (self.started or time.perf_counter()) - self.submitted


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    """Validate, queue for the model, stream back; errors become status codes."""

    def __init__(self, config: WorkerConfig, manager: TrackingManagerClient, scheduler: ModelScheduler,
                 metrics: WorkerMetrics | None = None) -> None:
        self.config = config
        self.authenticator = config.security.authenticator
        # A client can make every call fail: its rejections must not flood the log.
        self._rejections = RateLimitedLog(log)
        self.manager = manager
        self.scheduler = scheduler
        self.metrics = metrics
        self.conversations = ConversationStore(config.max_conversations, config.conversation_ttl_s)
        self.runtime: ModelRuntime | None = None  # set once the model is loaded
        self.stopping = False

    # -- Generate -------------------------------------------------------------------------
    async def Generate(self, request: worker_pb2.GenerateRequest, context):
        # The interceptor refused callers without an identity; conversations belong to this one.
        job = _Job(request_id=uuid.uuid4().hex[:12], identity=self.authenticator.identity(context))
        responses = self._generate(job, request, context)
        try:
            async for response in responses:
                yield response
        except BaseException as error:
            self._settle(job, "generate", _unsettled_outcome(error))
            raise
        finally:
            await responses.aclose()

    async def _generate(self, job: _Job, request: worker_pb2.GenerateRequest, context):
        runtime = await self._runtime(context, job, "generate")
        limits = self.config.limits
        continuing = request.conversation_id

        def inputs():  # tokenizing and rendering templates can take a while: off the event loop
            _check_conversation_fields(request)
            if request.end_conversation:
                return None, None, 0, [], None
            settings = None if continuing else prompts.eviction_settings(request, self.config.eviction,
                                                                         runtime.geometry, request.sampling.seed)
            return (prompts.prompt_ids(request, runtime.tokenizer, runtime.vocab_size, limits),
                    prompts.sampling_config(request.sampling), prompts.max_new_tokens(request.max_new_tokens, limits),
                    prompts.stop_strings(request.stop), settings)

        try:
            prompt, sampling, max_new_tokens, stop, settings = await asyncio.to_thread(inputs)
        except RequestError as error:
            await self._abort(context, job, "generate", _KIND_CODES[error.kind], str(error))
        conversation = await self._conversation(context, job, request)
        if request.end_conversation:
            await self._end_conversation(context, job, conversation)
            yield worker_pb2.GenerateResponse()
            return
        if conversation is not None:
            settings = conversation.session.settings
            if conversation.last_token is not None:  # generated by the previous turn, never fed
                prompt = torch.cat([torch.tensor([conversation.last_token]), prompt])
        kept_id: list[str] = []

        def finish_conversation(completion: Completion | None) -> None:
            """On the model thread, once the turn ended (completion None: it failed mid-turn,
            and the generator closed the session): keep the cache for the next turn, or let it go."""
            if completion is not None and request.keep_conversation:
                kept = conversation or Conversation(session=completion.session, last_token=None, owner=job.identity)
                kept.session = completion.session
                kept.last_token = completion.token_ids[-1] if completion.token_ids else None
                kept_id.append(self.conversations.keep(kept))
            elif conversation is not None:
                self.conversations.drop(conversation)
                conversation.session.close()  # closed already unless the turn never reached the generator

        loop = asyncio.get_running_loop()
        stream: asyncio.Queue[_Delta | None] = asyncio.Queue()

        def emit(item: _Delta | None) -> None:  # from the model thread
            _call_soon(loop, stream.put_nowait, item)

        def generate() -> Completion:
            self._close_expired()
            try:
                job.begin()
            except Cancelled:
                if conversation is not None:  # nothing was fed: the conversation is untouched
                    self.conversations.keep(conversation)
                raise

            def on_delta(token_id: int, text: str) -> None:
                job.check()
                job.tokens += 1
                emit(_Delta(text, token_id))

            completion = None
            try:
                generator = EvictingGenerator(runtime.model, self.manager, settings, metrics=self.metrics)
                completion = complete(generator, runtime.tokenizer, prompt, max_new_tokens, sampling,
                                      runtime.eos_token_ids, stop, on_delta=on_delta, on_prefill_block=job.check,
                                      session=None if conversation is None else conversation.session,
                                      keep_session=bool(request.keep_conversation))
                return completion
            finally:
                finish_conversation(completion)

        try:
            future = await self._submit(context, job, "generate", self._logged(job, "generate", generate))
        except BaseException:
            if conversation is not None:  # refused before it was queued: the conversation is untouched
                self.conversations.keep(conversation)
            raise
        log_event(log, logging.INFO, "generate.queued", request=job.request_id, prompt_tokens=prompt.numel(),
                  max_new_tokens=max_new_tokens, in_flight=self.scheduler.in_flight)
        future.add_done_callback(lambda _: emit(None))  # after the last delta: the stream's end
        streamed = False
        try:
            while (delta := await stream.get()) is not None:
                yield worker_pb2.GenerateResponse(text=delta.text, token_ids=[delta.token_id])
            streamed = True
        finally:  # cancelled (CancelledError) or closed at a yield (GeneratorExit): the call is gone
            if not streamed:
                job.cancel.set()  # the model thread stops at its next token
                if future.cancel() and conversation is not None:  # never started: the conversation is untouched
                    self.conversations.keep(conversation)
                log_event(log, logging.INFO, "generate.cancelled", request=job.request_id)
        outcome = await self._outcome(context, job, "generate", future)
        log_event(log, logging.INFO, "generate.done", request=job.request_id, peer=context.peer(),
                  prompt_tokens=outcome.summary.prompt_tokens, generated_tokens=len(outcome.token_ids),
                  finish=worker_pb2.FinishReason.Name(outcome.finish_reason),
                  queue_s=f"{job.queue_seconds:.3f}", prefill_s=f"{outcome.summary.prefill_seconds:.3f}",
                  decode_s=f"{outcome.summary.decode_seconds:.3f}", evicted=sum(outcome.summary.evicted_per_layer),
                  manager_fallback=outcome.summary.manager_fallback, continued=bool(conversation),
                  kept=bool(kept_id))
        self._settle(job, "generate", "ok")
        yield worker_pb2.GenerateResponse(text=outcome.tail, finish_reason=outcome.finish_reason,
                                          summary=summary_to_proto(outcome.summary),
                                          conversation_id=kept_id[0] if kept_id else "")

    async def _conversation(self, context, job: _Job, request: worker_pb2.GenerateRequest) -> Conversation | None:
        """The conversation the request continues (taken: no other request can use it), after
        checking a kept one would fit; None for a new one."""
        try:
            if request.keep_conversation:
                self.conversations.check_room(request.conversation_id)
            return self.conversations.take(request.conversation_id, job.identity) if request.conversation_id else None
        except ConversationError as error:
            code, field_name = _CONVERSATION_CODES[error.kind]
            await self._abort(context, job, "generate", code, f"{field_name}: {error}")

    async def _end_conversation(self, context, job: _Job, conversation: Conversation) -> None:
        """Closes the conversation's session on the model thread (no forward may be using it)."""
        self.conversations.drop(conversation)

        def end() -> None:
            self._close_expired()
            conversation.session.close()

        future = await self._submit(context, job, "generate", end)
        await asyncio.wrap_future(future)
        log_event(log, logging.INFO, "generate.conversation_ended", request=job.request_id)
        self._settle(job, "generate", "ok")

    def _close_expired(self) -> None:
        """Closes the sessions of expired conversations (on the model thread, before a job)."""
        for conversation in self.conversations.expired():
            conversation.session.close()

    def close_conversations(self) -> None:
        """Shutdown: every kept conversation's session closes (the model thread has stopped)."""
        for conversation in self.conversations.clear():
            conversation.session.close()

    # -- Score ----------------------------------------------------------------------------
    async def Score(self, request: worker_pb2.ScoreRequest, context) -> worker_pb2.ScoreResponse:
        job = _Job(request_id=uuid.uuid4().hex[:12])
        try:
            return await self._score(job, request, context)
        except BaseException as error:
            self._settle(job, "score", _unsettled_outcome(error))
            raise

    async def _score(self, job: _Job, request: worker_pb2.ScoreRequest, context) -> worker_pb2.ScoreResponse:
        runtime = await self._runtime(context, job, "score")
        def inputs():
            return (prompts.score_ids(request, runtime.tokenizer, runtime.vocab_size, self.config.limits),
                    prompts.eviction_settings(request, self.config.eviction, runtime.geometry))

        try:
            token_ids, settings = await asyncio.to_thread(inputs)
        except RequestError as error:
            await self._abort(context, job, "score", _KIND_CODES[error.kind], str(error))

        def score():
            job.begin()
            return score_tokens(runtime.model, self.manager, settings, token_ids, metrics=self.metrics)

        future = await self._submit(context, job, "score", self._logged(job, "score", score))
        log_event(log, logging.INFO, "score.queued", request=job.request_id, tokens=token_ids.numel(),
                  in_flight=self.scheduler.in_flight)
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        future.add_done_callback(lambda _: _call_soon(loop, _resolve, done))
        try:
            await done
        except asyncio.CancelledError:
            job.cancel.set()
            future.cancel()
            log_event(log, logging.INFO, "score.cancelled", request=job.request_id)
            raise
        result = await self._outcome(context, job, "score", future)
        logprobs = result.token_logprobs.float()
        log_event(log, logging.INFO, "score.done", request=job.request_id, peer=context.peer(),
                  tokens=token_ids.numel(), queue_s=f"{job.queue_seconds:.3f}",
                  seconds=f"{result.summary.prefill_seconds:.3f}", perplexity=f"{result.perplexity:.4f}",
                  evicted=sum(result.summary.evicted_per_layer), manager_fallback=result.summary.manager_fallback)
        self._settle(job, "score", "ok")
        return worker_pb2.ScoreResponse(token_logprobs=wire.encode(logprobs.numpy()),
                                        total_logprob=result.total_logprob,
                                        perplexity=result.perplexity, scored_tokens=logprobs.numel(),
                                        summary=summary_to_proto(result.summary))

    # -- shared ---------------------------------------------------------------------------
    async def _runtime(self, context, job: _Job, method: str) -> ModelRuntime:
        if self.stopping:
            await self._abort(context, job, method, grpc.StatusCode.UNAVAILABLE, "the worker is shutting down",
                              outcome="rejected")
        if self.runtime is None:
            await self._abort(context, job, method, grpc.StatusCode.UNAVAILABLE, "the model is still loading",
                              outcome="rejected")
        return self.runtime

    async def _submit(self, context, job: _Job, method: str, run: Callable[[], object]) -> Future:
        try:
            return self.scheduler.submit(run)
        except QueueFull as error:
            await self._abort(context, job, method, grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))

    def _logged(self, job: _Job, method: str, run: Callable[[], object]) -> Callable[[], object]:
        """`run` on the model thread, logging how it ended (after the generator closed its session)."""

        def logged():
            outcome = "ok"
            try:
                return run()
            except Cancelled:
                outcome = "cancelled"
                raise
            except BaseException as error:
                outcome = type(error).__name__
                raise
            finally:
                log_event(log, logging.INFO if outcome in ("ok", "cancelled") else logging.WARNING, f"{method}.job",
                          request=job.request_id, outcome=outcome, tokens=job.tokens if method == "generate" else None,
                          queue_s=f"{job.queue_seconds:.3f}",
                          run_s=f"{time.perf_counter() - job.started:.3f}" if job.started else None,
                          open_sessions=self.manager.open_sessions)

        return logged

    async def _outcome(self, context, job: _Job, method: str, future: Future):
        """The finished job's result, or an abort with the status of its failure."""
        if future.cancelled():  # dropped from the queue by a shutdown
            await self._abort(context, job, method, grpc.StatusCode.UNAVAILABLE, "the worker is shutting down",
                              outcome="cancelled")
        error = future.exception()
        if error is None:
            return future.result()
        code, details = _status_of(error)
        if code == grpc.StatusCode.INTERNAL:
            log.error("%s", f"event={method}.internal request={job.request_id}", exc_info=error)
        await self._abort(context, job, method, code, details)

    def _settle(self, job: _Job, method: str, outcome: str) -> None:
        """Counts how the call ended, once (the first outcome known wins)."""
        if job.outcome is None:
            job.outcome = outcome
            if self.metrics is not None:
                self.metrics.request_done(method, outcome)

    async def _abort(self, context, job: _Job, method: str, code: grpc.StatusCode, details: str,
                     outcome: str | None = None):
        self._settle(job, method, outcome or _CODE_OUTCOMES.get(code, "error"))
        details = status_details(details)
        if code != grpc.StatusCode.INTERNAL:
            self._rejections.event(logging.INFO, f"{method}.rejected", request=job.request_id, code=code.name,
                                   error=details)
        await context.abort(code, details)


def _check_conversation_fields(request: worker_pb2.GenerateRequest) -> None:
    """What a request continuing or ending a conversation may not set."""
    if request.end_conversation:
        if not request.conversation_id:
            raise RequestError("end_conversation", "needs the conversation_id of the conversation to end")
        if request.WhichOneof("prompt") is not None or request.keep_conversation:
            raise RequestError("end_conversation", "ends the conversation without generating: send no prompt and "
                               "no keep_conversation")
    elif request.conversation_id and request.HasField("eviction"):
        raise RequestError("eviction", "a conversation keeps the eviction settings of its first turn; leave "
                           "eviction unset when continuing it")


def _call_soon(loop: asyncio.AbstractEventLoop, callback, *args) -> None:
    """Runs `callback(*args)` on the event loop, from any thread (dropped once the loop is closed:
    nobody is listening any more)."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        pass


def _unsettled_outcome(error: BaseException) -> str:
    """The outcome of a call that ended without one: the client went away, or a bug."""
    return "cancelled" if isinstance(error, (asyncio.CancelledError, GeneratorExit)) else "error"


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status of a job's failure."""
    if isinstance(error, Cancelled):
        return grpc.StatusCode.CANCELLED, "cancelled"
    if isinstance(error, InvalidArgument):
        request_error = prompts.eviction_error(error)
        if request_error is not None:
            return grpc.StatusCode.INVALID_ARGUMENT, str(request_error)
        # Not the caller's fault, and not a bug of this worker alone: a manager of another version
        # or configuration refused what this worker sends (fail-open decides in-process instead).
        return grpc.StatusCode.UNAVAILABLE, f"the cache manager refused the worker's report: {error}"
    if isinstance(error, ManagerUnavailable):
        return grpc.StatusCode.UNAVAILABLE, f"cache manager unavailable (fail-open is off): {error}"
    if isinstance(error, (NotFound, Aborted)):
        return grpc.StatusCode.ABORTED, f"the cache manager lost the session (fail-open is off): {error}"
    if isinstance(error, ResourceExhausted):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"cache manager overloaded: {error}"
    if isinstance(error, ManagerError):
        return grpc.StatusCode.UNAVAILABLE, f"cache manager failed: {error}"
    return grpc.StatusCode.INTERNAL, "internal error"


class WorkerServer:
    """The running server: `start()` binds and returns the port, `load()` loads the model and
    turns health SERVING, `stop()` drains and closes."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        threads = config.threads or default_threads()
        # Intra-op threads are set on the model thread itself (OpenMP settings are per thread).
        self.scheduler = ModelScheduler(config.max_queue, initializer=lambda: torch.set_num_threads(threads))
        self.metrics = None
        self.metrics_server = None
        if config.metrics_port != DISABLED_PORT:
            self.metrics = WorkerMetrics(queue_depth=lambda: self.scheduler.waiting)
            self.metrics_server = MetricsServer(self.metrics.registry)
        self.manager = make_manager(config, self.metrics)
        self.servicer = WorkerServicer(config, self.manager, self.scheduler, self.metrics)
        # Counted first (every outcome), then refused without credentials, then decoded.
        interceptors = [] if self.metrics is None else [self.metrics.rpcs.interceptor()]
        interceptors += [*config.security.interceptors(), RequestDecodingInterceptor()]
        self.server = grpc.aio.server(options=server_options(config.max_message_bytes), interceptors=interceptors)
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(self.servicer, self.server)
        self.health = ServiceHealth(self.server, SERVICE_NAME)
        self.port = 0
        self.metrics_port = DISABLED_PORT

    async def start(self) -> int:
        """Binds gRPC, then the metrics port (OSError if either is taken), and starts serving."""
        self.port = bind(self.server, self.config.host, self.config.port, self.config.security.credentials())
        if self.metrics_server is not None:
            self.metrics_port = self.metrics_server.start(self.config.host, self.config.metrics_port)
        await self.health.set(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        return self.port

    async def load(self) -> ModelRuntime:
        """Loads the model on the model thread (first in its queue), then reports SERVING."""
        runtime = await asyncio.wrap_future(self.scheduler.submit(lambda: ModelRuntime.load(self.config)))
        try:  # the defaults of requests without `eviction` must be valid for this model
            prompts.eviction_settings(worker_pb2.ScoreRequest(), self.config.eviction, runtime.geometry)
        except RequestError as error:
            raise ValueError(f"the default eviction settings (--policy, --budget, ...) are invalid: "
                             f"{error.field.removeprefix('eviction.')}: {error.message}") from None
        self.servicer.runtime = runtime
        await self.health.set(health_pb2.HealthCheckResponse.SERVING)
        return runtime

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING and no new calls; running calls get `grace_s` to finish, then are cancelled
        (their generations stop at the next token); then the model thread and manager close."""
        self.servicer.stopping = True
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.config.grace_s if grace_s is None else grace_s)
        await asyncio.to_thread(self.scheduler.close)
        self.servicer.close_conversations()
        self.manager.close()
        if self.metrics_server is not None:
            self.metrics_server.stop()


async def serve(config: WorkerConfig) -> int:
    """Runs until SIGTERM or SIGINT, then stops gracefully. Logs `event=worker.ready ... port=N`
    once the model is loaded and health is SERVING. Returns the exit status."""
    server = WorkerServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    port = await server.start()
    metrics_port = None if server.metrics_server is None else server.metrics_port
    log_event(log, logging.INFO, "worker.listening", host=config.host, port=port, metrics_port=metrics_port,
              model=config.model)
    load = asyncio.ensure_future(server.load())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait((load, stopped), return_when=asyncio.FIRST_COMPLETED)
    status = 0
    if load.done():
        if load.exception() is not None:
            error = load.exception()
            log_event(log, logging.ERROR, "worker.load_failed", model=config.model, error=f"{type(error).__name__}: {error}")
            status = 1
        else:
            runtime = load.result()
            log_event(log, logging.INFO, "worker.ready", host=config.host, port=port, metrics_port=metrics_port,
                      model=config.model,
                      device=config.device, dtype=config.dtype, manager=config.manager,
                      fail_open=config.eviction.fail_open, security=config.security.describe(),
                      manager_tls=config.manager_security.tls is not None, layers=runtime.geometry.num_layers,
                      kv_heads=runtime.geometry.num_kv_heads, vocab=runtime.vocab_size, max_queue=config.max_queue)
            await stopped
    else:
        load.cancel()
    log_event(log, logging.INFO, "worker.stopping", grace_s=config.grace_s)
    await server.stop()
    log_event(log, logging.INFO, "worker.stopped")
    return status
