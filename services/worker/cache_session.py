"""One sequence's KV cache under a manager session: block-wise forwards, reports, pruning."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from transformers import DynamicCache

from kvevict import defaults, wire
from kvevict.cache_manager.errors import InvalidArgument, ManagerError, NotFound, ResourceExhausted
from kvevict.logs import session_ref
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import tensor_pb2
from kvevict.worker import attention
from kvevict.worker.attention import COLLECTOR_KWARG
from kvevict.worker.kv_cache import PrunableCache
from kvevict.worker.manager_client import EmbeddedManagerClient, ManagerClient
from kvevict.worker.model_loader import geometry_of
from kvevict.worker.observers import (CAPTURE_KWARG, POOLS, LayerQueries, ObserverQueries, QueryCapture,
                                     RepeatPrompt)
from kvevict.worker.ragged_cache import RAGGED_KWARG, HeadPrunableCache
from kvevict.worker.ragged_statistics import HeadStatisticsCollector
from kvevict.worker.remote_manager import ManagerUnavailable
from kvevict.worker.statistics import Requirement, StatisticsCollector, to_wire

if TYPE_CHECKING:
    from kvevict.worker.metrics import WorkerMetrics

# Sessions are named by session_ref in logs: an id is the key to its session.
log = logging.getLogger(__name__)


def _fallback_reason(error: BaseException) -> str | None:
    """Why fail-open may decide in-process after `error` (None: the error stands): a manager
    that stays unreachable or lost the session (restarted without its state), one that refuses
    the session or a call for load (RESOURCE_EXHAUSTED), or one that rejects the worker's own
    report or geometry (an older or stricter manager). An InvalidArgument naming a field of the
    request's eviction settings is the client's error and fails the request, fail-open or not;
    so does a refused credential (ManagerAuthError), which a fallback would only hide."""
    if isinstance(error, ManagerUnavailable):
        return "unreachable"
    if isinstance(error, NotFound):
        return "lost_session"
    if isinstance(error, ResourceExhausted):
        return "overloaded"
    if isinstance(error, InvalidArgument):
        from kvevict.worker.prompts import eviction_error  # prompts imports this module

        return "rejected_report" if eviction_error(error) is None else None
    return None


# Called before every forward with the new tokens' positions (q,) and every layer's cached
# positions (Hkv, L) including them (per-head sessions: a list of each head's (L_h,)): exactly
# what each query of the forward can see.
ForwardObserver = Callable[[torch.Tensor, list], None]


@dataclass
class EvictionSettings:
    """What a generation asks of the manager."""

    policy: pb.PolicySpec = field(default_factory=defaults.policy_spec)
    budget: pb.BudgetSpec = field(default_factory=defaults.budget_spec)
    block_size: int = defaults.BLOCK_SIZE
    # DTYPE_UNSPECIFIED: the manager chooses per statistic (bfloat16 or float16, 2 bytes each).
    statistics_dtype: int = tensor_pb2.DTYPE_UNSPECIFIED
    # When the manager stays unreachable, lost the session, refuses it for load or rejects the
    # worker's report, go on with the same policy code in-process instead of failing the request.
    fail_open: bool = True
    # Decide period n while period n+1 runs: the report goes out at the end of its period and its
    # keep masks apply at the end of the next one, so the manager's round trip hides behind the
    # model's forwards; the cache peaks at the budget plus two blocks instead of one.
    pipelined: bool = False
    # Lookahead queries (Lookahead Q-Cache): before each prefill block's decision, decode this
    # many pseudo tokens greedily on the current cache, take their queries as the observation
    # window of the window statistics, then discard them (their keys and values included).
    lookahead: int = 0
    # Context reconstruction (KVzip's queries): before each prefill decision, forward
    # `repeat_prompt` then the last `reconstruct` tokens fed so far (all of them when fewer: a
    # chunk bounds the quadratic cost; KVzip's is 2048) on the current cache, observe with every
    # repeated token's query (pooled by `reconstruct_pool`: "max" as KVzip scores, or "sum"), then
    # discard the speculative tokens, keys and values included: only the cache's own entries are
    # scored, each by the share of a query's attention it got with the speculative keys still in
    # the softmax (KVzip's score, no renormalization over the cache). 0: off.
    reconstruct: int = 0
    reconstruct_pool: str = "max"
    repeat_prompt: RepeatPrompt | None = None


def _causal_logsumexp(observed: LayerQueries, keys: torch.Tensor, lead: int) -> torch.Tensor:
    """Per observer (Hkv, g, m): log-sum-exp of its logits over the speculative forward's keys
    (Hkv, lead + m, d) it could see (its own and those before it; within its sliding window)."""
    scores = torch.einsum("hgqd,hkd->hgqk", observed.queries, keys) * observed.scaling
    if observed.softcap is not None:
        scores = observed.softcap * torch.tanh(scores / observed.softcap)
    query_index = torch.arange(lead, keys.shape[1], device=keys.device)[:, None]
    key_index = torch.arange(keys.shape[1], device=keys.device)[None, :]
    visible = key_index <= query_index
    if observed.window:
        visible &= key_index > query_index - observed.window
    return torch.logsumexp(scores.masked_fill(~visible, float("-inf")), dim=-1)


@dataclass
class SessionStats:
    """Counters of one session, for the eviction summary."""

    reports: int = 0
    # Wall time of every manager call (open, reports, close), failed ones and their retries and
    # an in-process fallback's decisions included: what the generation waited for decisions.
    manager_seconds: float = 0.0
    report_bytes: int = 0
    peak_lengths: list[int] = field(default_factory=list)
    peak_kv_bytes: int = 0
    manager_fallback: bool = False


class CacheSession:
    """Runs a model block by block over one sequence, evicting as the manager decides.

    With `metrics` (the worker service's), it counts prompt tokens, evicted tokens, fallbacks and
    report round trips, times the prefill, and keeps the KV-bytes gauges up to date after every
    forward and eviction (its share is taken back out at close()).

    The model attends with kvevict attention while the session is open (`attention.install`:
    a model loaded with another one gets it until close()). At the end of every report period,
    sliding-window layers drop the tokens no later query can see (`PrunableCache.unseen`), whether
    or not the period reports; the manager drops the same ones from its state."""

    def __init__(self, model: torch.nn.Module, manager: ManagerClient, settings: EvictionSettings,
                 observer: ForwardObserver | None = None, metrics: WorkerMetrics | None = None,
                 hf_cache: DynamicCache | None = None, decisions: Executor | None = None) -> None:
        """`decisions`: where a pipelined session's reports are decided (default: a thread of
        its own; an executor that runs them at once gives the same lagged protocol, in order)."""
        if settings.reconstruct < 0:
            raise ValueError(f"reconstruct: a number of context tokens >= 0, got {settings.reconstruct}")
        if settings.reconstruct and settings.repeat_prompt is None:
            raise ValueError("reconstruct needs a repeat_prompt (RepeatPrompt.from_tokenizer)")
        if settings.reconstruct_pool not in POOLS:
            raise ValueError(f"reconstruct_pool must be one of {', '.join(POOLS)}, got {settings.reconstruct_pool!r}")
        self.model = model
        self.manager = manager
        self.settings = settings
        self.observer = observer
        self.metrics = metrics
        self._kv_tracked = (0, 0)  # (kv bytes, full-cache bytes) this session added to the gauges
        self.geometry = geometry_of(model)
        self._open_request = pb.OpenSessionRequest(
            geometry=self.geometry, policy=settings.policy, budget=settings.budget,
            block_size=settings.block_size, statistics_dtype=settings.statistics_dtype)
        self.stats = SessionStats(peak_lengths=[0] * self.geometry.num_layers)
        attention.install(model)
        try:
            opened = self._open()
        except BaseException:
            attention.uninstall(model)
            raise
        self.session_id = opened.session_id
        self.report_every_block = opened.report_every_block
        self.layer_budgets = list(opened.layer_budgets)
        # A per-head session: each KV head keeps its own count (HeadPrunableCache frees what it evicts).
        self.per_head = opened.per_head_budgets
        device = next(model.parameters()).device
        self.device = device
        cache_type, collector_type = ((HeadPrunableCache, HeadStatisticsCollector) if self.per_head
                                      else (PrunableCache, StatisticsCollector))
        self.cache = cache_type(self.geometry.num_layers, self.geometry.num_kv_heads, device,
                                self.geometry.sliding_windows, hf_cache=hf_cache)
        requirements = [Requirement.from_proto(r, opened.statistics_dtype) for r in opened.statistics]
        self.collector = collector_type(requirements, self.geometry.num_layers, self.cache)
        self.cache.listener = self.collector  # evictions between a forward and its report realign the sums
        self._decisions = decisions if decisions is not None or not settings.pipelined else ThreadPoolExecutor(
            1, thread_name_prefix="kvevict-decide")
        self._own_decisions = decisions is None and settings.pipelined
        # A pipelined report in flight: its decision, and the leading tokens it drops per layer.
        self._in_flight: tuple[Future, list[int]] | None = None
        self._next_position = 0
        self._pending_positions: list[torch.Tensor] = []
        self._sequence = 0
        self._decode_steps = 0
        self._closed = False
        self._evicting = True
        self._last_logits: torch.Tensor | None = None  # of the last forward's last position
        self._question_in_context: tuple[list[int], int] | None = None  # observe_question_in_context
        self._fed_ids: list[int] = []  # every token forwarded by prefill/decode: what a reconstruction repeats
        self._unreachable = False  # a call spent its retry budget and the session did not fall back

    def _open(self) -> pb.OpenSessionResponse:
        started = time.perf_counter()
        try:
            return self.manager.open_session(self._open_request)
        except ManagerError as error:
            reason = _fallback_reason(error)
            if not self.settings.fail_open or reason is None:
                raise
            self._note_fallback(error, reason)
            self.manager = EmbeddedManagerClient()
            return self.manager.open_session(self._open_request)
        finally:
            self.stats.manager_seconds += time.perf_counter() - started

    # -- forwards -------------------------------------------------------------------------
    def prefill(self, token_ids: torch.Tensor, on_block: Callable[[int], None] | None = None,
                on_block_logits: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """Feeds prompt tokens (n,) block by block; returns the logits (vocab,) after the last.

        on_block_logits, when given, receives every block's logits (q, vocab) before the block's
        eviction (teacher forcing: what the model predicted with the cache it had then).
        """
        if token_ids.numel() == 0:
            raise ValueError("the prompt has no tokens")
        logits = None
        started = time.perf_counter()
        for chunk in torch.split(token_ids, self.settings.block_size):
            self.begin_prefill_block(chunk.numel())
            block_logits = self._forward(chunk, all_logits=on_block_logits is not None)
            if on_block_logits is not None:
                on_block_logits(block_logits)
            logits = block_logits[-1]
            self.end_prefill_block(chunk.numel())
            if on_block is not None:
                on_block(chunk.numel())
        if self.metrics is not None:
            self.metrics.prefill_done(time.perf_counter() - started)
        return logits

    def decode(self, token_id: int) -> torch.Tensor:
        """Feeds one generated token; returns the logits of the next position."""
        self.begin_decode_step()
        logits = self._forward(torch.tensor([token_id]))[-1]
        self.end_decode_step()
        return logits

    # One period per prefill block; one per `block_size` decode steps. A prefill that follows
    # decode steps (the next turn of a conversation) first ends their period, so the tokens fed
    # decide the reports, whoever drives the forwards (this class or `EvictingCache` in generate).
    def begin_prefill_block(self, count: int) -> None:
        if self._decode_steps:
            self._decode_steps = 0
            self._end_period(pb.PHASE_DECODE)
        self.collector.start_period(count)

    def end_prefill_block(self, count: int) -> None:
        if self.metrics is not None:
            self.metrics.prefilled(count)
        self._end_period(pb.PHASE_PREFILL)

    def begin_decode_step(self) -> None:
        if self._decode_steps == 0:
            self.collector.start_period(self.settings.block_size)

    def end_decode_step(self) -> None:
        self._decode_steps += 1
        if self._decode_steps == self.settings.block_size:
            self._decode_steps = 0
            self._end_period(pb.PHASE_DECODE)

    @property
    def tokens_fed(self) -> int:
        """Tokens of the sequence forwarded so far (the next one's position)."""
        return self._next_position

    def begin_forward(self, count: int) -> torch.Tensor:
        """Declares the next `count` tokens; returns their absolute positions (count,)."""
        positions = torch.arange(self._next_position, self._next_position + count, device=self.device)
        self._next_position += count
        self._pending_positions.append(positions)
        self.cache.append_positions(positions)
        if self.observer is not None:  # per-head: each head's positions, the block's appended
            self.observer(positions, [self.cache.positions(layer) for layer in range(self.cache.num_layers)]
                          if not self.per_head else
                          [[torch.cat([row, positions]) for row in self.cache.head_positions(layer)]
                           for layer in range(self.cache.num_layers)])
        return positions

    def forward_kwargs(self) -> dict:
        """What the model's forward needs beside the tokens: the statistics collector (read by
        kvevict attention), and a per-head session's cache."""
        return {COLLECTOR_KWARG: self.collector, **self._cache_kwargs()}

    def _cache_kwargs(self) -> dict:
        """What kvevict attention needs to attend over this cache (a per-head session's store)."""
        return {RAGGED_KWARG: self.cache} if self.per_head else {}

    def end_forward(self, count: int) -> None:
        """After the forward of `count` declared tokens: shape check, peaks, KV gauges."""
        if self.cache.tokens_seen == count:  # the first forward: shapes exist now
            self.cache.check_geometry(self.geometry.head_dim)
        for layer in range(self.cache.num_layers):
            self.stats.peak_lengths[layer] = max(self.stats.peak_lengths[layer], self.cache.length(layer))
        kv_bytes = self.cache.kv_bytes()
        self.stats.peak_kv_bytes = max(self.stats.peak_kv_bytes, kv_bytes)
        self._track_kv(kv_bytes)

    @torch.inference_mode()
    def _forward(self, token_ids: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """One forward of new tokens; logits (q or 1, vocab) of every or only the last position."""
        positions = self.begin_forward(token_ids.numel())
        self._fed_ids.extend(token_ids.flatten().tolist())
        # Absolute position ids: after eviction the cache length is not the position (RoPE).
        output = self.model(
            input_ids=token_ids.to(self.device)[None, :],
            position_ids=positions[None, :],
            past_key_values=self.cache.hf_cache,
            use_cache=True,
            logits_to_keep=0 if all_logits else 1,
            **self.forward_kwargs(),
        )
        self.end_forward(token_ids.numel())
        self._last_logits = output.logits[0, -1]
        return output.logits[0]

    def _track_kv(self, kv_bytes: int | None = None) -> None:
        """Moves the KV gauges by what this session's cache changed since the last call."""
        if self.metrics is None:
            return
        now = (self.cache.kv_bytes() if kv_bytes is None else kv_bytes, self.cache.full_cache_bytes())
        self.metrics.kv_cache_changed(now[0] - self._kv_tracked[0], now[1] - self._kv_tracked[1])
        self._kv_tracked = now

    # -- reports --------------------------------------------------------------------------
    @torch.inference_mode()
    def observe_queries_of(self, token_ids: torch.Tensor, first_position: int) -> None:
        """Makes the queries of `token_ids` (not in the cache: e.g. the question that will follow
        the prompt), at positions first_position..., every later report's observation window.

        They come from one forward of those tokens alone (their queries do not see the context):
        the window statistics then rank the cache by what the question will look for."""
        positions = torch.arange(first_position, first_position + token_ids.numel(), device=self.device)
        capture = QueryCapture(positions)
        self.model(input_ids=token_ids.to(self.device)[None, :], position_ids=positions[None, :], use_cache=False,
                   logits_to_keep=1, **{CAPTURE_KWARG: capture})
        self.collector.observers = ObserverQueries(capture)

    def observe_question_in_context(self, token_ids: torch.Tensor, first_position: int) -> None:
        """Before every later prefill decision, forward `token_ids` (the question still to come,
        at its true positions first_position...) on the cache as it is then, and observe with
        their queries; then discard them (Lookahead Q-Cache's mechanism with the question's own
        tokens: queries that have read the cache, unlike observe_queries_of's)."""
        self._question_in_context = (token_ids.flatten().tolist(), first_position)

    @torch.inference_mode()
    def _lookahead_queries(self, count: int, question: tuple[list[int], int] | None = None) -> ObserverQueries:
        """The queries of `question`'s tokens forwarded on the cache (at their positions), or of
        `count` pseudo tokens decoded greedily after what the cache holds; the cache is left as
        it was (its tensors are only ever replaced)."""
        cache = self.cache
        saved = cache.checkpoint()
        tokens, first = question if question is not None else ([int(torch.argmax(self._last_logits))],
                                                                self._next_position)
        steps = 1 if question is not None else count
        total = len(tokens) if question is not None else count
        capture = QueryCapture(torch.arange(first, first + total, device=self.device), accumulate=True)
        try:
            for step in range(steps):
                position = torch.arange(first + step, first + step + len(tokens), device=self.device)
                cache.append_positions(position)
                output = self.model(input_ids=torch.tensor([tokens], device=self.device), position_ids=position[None],
                                    past_key_values=cache.hf_cache, use_cache=True, logits_to_keep=1,
                                    **{CAPTURE_KWARG: capture}, **self._cache_kwargs())
                tokens = [int(torch.argmax(output.logits[0, -1]))]
        finally:
            cache.restore(saved)
        return ObserverQueries(capture)

    @torch.inference_mode()
    def _reconstruction_queries(self) -> ObserverQueries:
        """The queries of the context fed so far (its last `settings.reconstruct` tokens) repeated
        after KVzip's repeat prompt, forwarded on the cache at the positions after it; the cache is
        left as it was (its tensors are only ever replaced)."""
        context = self._fed_ids
        if len(context) != self._next_position:
            raise ValueError("context reconstruction repeats the tokens CacheSession forwarded itself; "
                             f"{self._next_position - len(context)} were fed around it (EvictingCache)")
        start = max(0, len(context) - self.settings.reconstruct)
        lead = self.settings.repeat_prompt.request(context, start)
        tokens = lead + context[start:]
        positions = torch.arange(self._next_position, self._next_position + len(tokens), device=self.device)
        capture = QueryCapture(positions[len(lead):], skip=len(lead))  # the prompt's own queries do not observe
        saved = self.cache.checkpoint()
        try:
            self.cache.append_positions(positions)
            self.model(input_ids=torch.tensor([tokens], device=self.device), position_ids=positions[None],
                       past_key_values=self.cache.hf_cache, use_cache=True, logits_to_keep=1,
                       **{CAPTURE_KWARG: capture}, **self._cache_kwargs())
            for layer, observed in capture.layers.items():
                # The speculative keys are no candidates, but their share of each query's attention
                # stays out of the cached tokens' (KVzip's score: no renormalization over the cache).
                spec_keys = self.cache.recent_keys(layer, len(tokens)).float()
                capture.layers[layer] = replace(observed, excluded=_causal_logsumexp(observed, spec_keys, len(lead)))
        finally:
            self.cache.restore(saved)
        return ObserverQueries(capture, every_query=True, pool=self.settings.reconstruct_pool)

    def stop_evicting(self) -> None:
        """No more reports: what is cached stays, what comes is appended (e.g. a question read
        after its context was evicted, as kvpress's protocol does). A pipelined decision still
        in flight applies first."""
        self.flush()
        self._evicting = False

    def flush(self) -> None:
        """Applies a pipelined decision still in flight (nothing to do otherwise)."""
        if self._in_flight is not None:
            future, unseen = self._in_flight
            self._in_flight = None
            self._apply(future.result(), unseen)

    def _end_period(self, phase: int) -> None:
        # Between reports the collector's per-token sums grow with the cache; only here may it shrink.
        self.flush()  # pipelined: the previous period's decision, one period late
        unseen = self.cache.unseen(self._next_position - 1)
        over_budget = any(self.cache.length(layer) - unseen[layer] > budget
                          for layer, budget in enumerate(self.layer_budgets))
        if self._evicting and (self.report_every_block or over_budget):
            standing = self.collector.observers  # observe_queries_of's, if any: they stay
            lookahead = phase == pb.PHASE_PREFILL and standing is None and (
                self.settings.lookahead or self._question_in_context is not None)
            reconstruct = phase == pb.PHASE_PREFILL and self.settings.reconstruct > 0
            if lookahead:
                self.collector.observers = self._lookahead_queries(self.settings.lookahead, self._question_in_context)
            if reconstruct:  # beside the question's or lookahead's queries, if any
                queries = self._reconstruction_queries()
                self.collector.observers = queries if self.collector.observers is None else queries.joined(
                    self.collector.observers)
            try:
                request = self._build_report(phase, unseen)
            finally:
                if lookahead or reconstruct:
                    self.collector.observers = standing
            self._pending_positions.clear()
            if self._decisions is None:
                self._apply(self._decide(request, self._cached_positions(request)), unseen)
            else:  # the positions as they are now, in case the manager is lost (fail-open adopts them)
                self._in_flight = (self._decisions.submit(self._decide, request, self._cached_positions(request)),
                                   unseen)
        elif any(unseen):  # what no query can see goes, evicting or not
            self.cache.drop_leading(unseen)
            self._track_kv()

    def _cached_positions(self, request: pb.ReportBlockRequest) -> list:
        """Every layer's cached positions before the report's new tokens (the cache only ever
        replaces its tensors, so these stay as they are; a per-head session's, copied: its store
        writes in place): per layer (Hkv, L), or a list of each head's (L_h,)."""
        pending = request.positions.shape[0]
        if self.per_head:
            return [[row[: row.numel() - pending].clone() for row in self.cache.head_positions(layer)]
                    for layer in range(self.cache.num_layers)]
        return [self.cache.positions(layer)[:, : self.cache.length(layer) - pending]
                for layer in range(self.cache.num_layers)]

    def _decide(self, request: pb.ReportBlockRequest, tracked: list[torch.Tensor]) -> pb.ReportBlockResponse:
        """One report's decision, from the manager or (fail-open) in-process; counted."""
        started = time.perf_counter()
        try:
            response = self._timed_report(self.manager, request)
        except ManagerError as error:
            reason = _fallback_reason(error)
            if not self.settings.fail_open or reason is None:
                self._unreachable = reason == "unreachable"
                raise
            response = self._report_in_process(request, error, reason, tracked)
        finally:
            self.stats.manager_seconds += time.perf_counter() - started
        self.stats.reports += 1
        self.stats.report_bytes += request.ByteSize()
        return response

    def _apply(self, response: pb.ReportBlockResponse, unseen: list[int]) -> None:
        """Drops the `unseen` leading tokens per layer (the manager drops the same), then applies
        the keep masks, which index what is left (pipelined: the tokens cached since the report,
        after the masks' length, all stay)."""
        self.cache.drop_leading(unseen)
        if self.per_head:
            evicted = self._apply_head_keeps(response)
        else:
            evicted = 0
            for keep in response.keeps:
                mask = wire.decode_bits(keep.keep, f"keeps[{keep.layer}].keep")
                before = self.cache.length(keep.layer)
                self.cache.apply_keep(keep.layer, torch.from_numpy(mask))
                evicted += before - self.cache.length(keep.layer)
        self.layer_budgets = list(response.layer_budgets)
        if self.metrics is not None:
            self.metrics.evicted(evicted)
            self._track_kv()

    def _apply_head_keeps(self, response: pb.ReportBlockResponse) -> int:
        """A per-head session's keep masks (LayerKeep.head_lengths, head_kept): each head keeps
        its own count. Returns what the evicted-tokens counter adds: per layer, the change of
        its evicted tokens per KV head rounded down, as the summary's evicted_per_layer rounds
        them, so the counter stays the sum of the summaries."""
        heads, layers = self.cache.num_kv_heads, range(self.cache.num_layers)
        before = [self.cache.evicted(layer) // heads for layer in layers]
        for keep in response.keeps:
            field = f"keeps[{keep.layer}]"
            if keep.layer >= self.cache.num_layers or len(keep.head_lengths) != self.cache.num_kv_heads \
                    or len(keep.head_kept) != self.cache.num_kv_heads:
                raise ValueError(f"{field}: a per-head keep needs a layer below {self.cache.num_layers} and "
                                 f"{self.cache.num_kv_heads} head_lengths and head_kept")
            bits = torch.from_numpy(wire.decode_bits(keep.keep, f"{field}.keep").reshape(-1))
            if bits.numel() != sum(keep.head_lengths):
                raise ValueError(f"{field}.keep covers {bits.numel()} entries, head_lengths sum to {sum(keep.head_lengths)}")
            masks = list(torch.split(bits, list(keep.head_lengths)))
            if [int(m.sum()) for m in masks] != list(keep.head_kept):
                raise ValueError(f"{field}.keep keeps {[int(m.sum()) for m in masks]} per head, head_kept says "
                                 f"{list(keep.head_kept)}")
            self.cache.apply_head_keeps(keep.layer, masks)
        return sum(self.cache.evicted(layer) // heads - was for layer, was in zip(layers, before))

    def _timed_report(self, manager: ManagerClient, request: pb.ReportBlockRequest) -> pb.ReportBlockResponse:
        """One ReportBlock call; its round trip (failed or not) goes to the metrics."""
        started = time.perf_counter()
        try:
            return manager.report_block(request)
        finally:
            if self.metrics is not None:
                self.metrics.reported(time.perf_counter() - started)

    @torch.inference_mode()
    def _build_report(self, phase: int, unseen: list[int]) -> pb.ReportBlockRequest:
        self._sequence += 1
        positions = torch.cat(self._pending_positions).cpu().numpy()
        layers = []
        for layer in range(self.cache.num_layers):
            if self.per_head:
                statistics = self.collector.head_statistics(layer)
                tensors = [to_wire(t, req.dtype) for t, req in zip(statistics, self.collector.requirements)]
                lengths = self.cache.head_lengths(layer)
                layers.append(pb.LayerStatistics(layer=layer, cache_length=sum(lengths), values=tensors,
                                                 head_lengths=lengths))
                continue
            keys, values = self.cache.keys_values(layer)
            # Over the tokens that stay: those that left the window are dropped after the report.
            statistics = self.collector.layer_statistics(layer, keys, values, unseen[layer])
            tensors = [to_wire(t, req.dtype) for t, req in zip(statistics, self.collector.requirements)]
            layers.append(pb.LayerStatistics(layer=layer, cache_length=self.cache.length(layer) - unseen[layer],
                                             values=tensors))
        return pb.ReportBlockRequest(session_id=self.session_id, sequence=self._sequence, phase=phase,
                                     positions=wire.encode(positions.astype(np.int64)), layers=layers)

    def _report_in_process(self, request: pb.ReportBlockRequest, error: Exception, reason: str,
                           tracked: list[torch.Tensor]) -> pb.ReportBlockResponse:
        """Fail-open: a local manager adopts the cache as it was before this report (`tracked`,
        each layer's positions then), then decides it."""
        self._note_fallback(error, reason)
        if reason in ("overloaded", "rejected_report"):  # reachable: give its session slot back now
            self._close_abandoned(self.manager, self.session_id)
        local = EmbeddedManagerClient()
        positions = ([[row.cpu().numpy() for row in heads] for heads in tracked] if self.per_head
                     else [p.cpu().numpy() for p in tracked])
        adopted = local.core.adopt_session(self._open_request, positions)
        self.manager, self.session_id, self._sequence = local, adopted.session_id, 1
        request.session_id, request.sequence = adopted.session_id, 1
        return self._timed_report(local, request)

    def _close_abandoned(self, manager: ManagerClient, session_id: str) -> None:
        """Best effort: the manager's copy of a session that goes on in-process (else it holds a
        slot of --max-sessions until its TTL)."""
        try:
            manager.close_session(pb.CloseSessionRequest(session_id=session_id))
        except ManagerError as error:
            log.warning("event=close_failed session_ref=%s error=%r", session_ref(session_id), str(error))

    def _note_fallback(self, error: Exception, reason: str) -> None:
        # Logged once per session: every later report of the session stays in-process.
        self.stats.manager_fallback = True
        if self.metrics is not None:
            self.metrics.fell_back()
        log.warning("event=manager_fallback session_ref=%s reason=%s error=%r",
                    session_ref(getattr(self, "session_id", "")), reason, str(error))

    def cache_counts(self) -> dict:
        """The summary's per-layer fields (EvictionSummary's evicted_per_layer, final_lengths,
        layer_budgets, final_head_lengths, kv_bytes, kept_kv_bytes, full_cache_bytes): per KV
        head, or for a per-head session averages per KV head (rounded down) and every head's count."""
        cache, layers = self.cache, range(self.cache.num_layers)
        counts = {"kv_bytes": cache.kv_bytes(), "full_cache_bytes": cache.full_cache_bytes()}
        if not self.per_head:
            # Its tensors hold exactly the kept entries: no slack.
            return {**counts, "evicted_per_layer": [cache.evicted(layer) for layer in layers],
                    "final_lengths": [cache.length(layer) for layer in layers],
                    "layer_budgets": list(self.layer_budgets), "final_head_lengths": [],
                    "kept_kv_bytes": counts["kv_bytes"]}
        heads = cache.num_kv_heads
        return {**counts, "evicted_per_layer": [cache.evicted(layer) // heads for layer in layers],
                "final_lengths": [cache.total_length(layer) // heads for layer in layers],
                "layer_budgets": [budget // heads for budget in self.layer_budgets],
                "final_head_lengths": [n for layer in layers for n in cache.head_lengths(layer)],
                "kept_kv_bytes": cache.kept_bytes()}

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> pb.CloseSessionResponse | None:
        if self._closed:
            return None
        self._closed = True
        if self._in_flight is not None:  # let the manager answer before its session closes
            future, self._in_flight = self._in_flight[0], None
            try:
                future.result()
            except Exception:  # the generation has ended (or failed) already: the decision is moot
                pass
        if self._own_decisions:
            self._decisions.shutdown(wait=True)
        attention.uninstall(self.model)
        if self.metrics is not None:  # the cache is no longer in flight
            self.metrics.kv_cache_changed(-self._kv_tracked[0], -self._kv_tracked[1])
            self._kv_tracked = (0, 0)
        if self._unreachable:  # a close would wait out another retry budget for nothing
            log.warning("event=close_skipped session_ref=%s reason=unreachable", session_ref(self.session_id))
            return None
        started = time.perf_counter()
        try:
            return self.manager.close_session(pb.CloseSessionRequest(session_id=self.session_id))
        except ManagerError as error:
            if _fallback_reason(error) is None:
                raise
            # The session expires with its TTL; the generation itself is complete.
            log.warning("event=close_failed session_ref=%s error=%r", session_ref(self.session_id), str(error))
            return None
        finally:
            self.stats.manager_seconds += time.perf_counter() - started
