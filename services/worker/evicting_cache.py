"""`EvictingCache`: a transformers `Cache` that evicts, for `model.generate` and plain forwards.

    cache = kvevict.EvictingCache(model, policy="caote+snapkv", budget=256)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)

It is a `DynamicCache` whose layers hold only the kept tokens, driven by a `CacheSession` (the
worker's own code: statistics inside attention, ReportBlock to an embedded or remote manager,
keep masks applied). Forward hooks on the model do per forward what `EvictingGenerator` does
per call, so `generate` with this cache equals `EvictingGenerator` token for token:

* a forward of more than one token (or the first) is prefill, split here into `block_size`
  blocks, each its own report period (generate's `prefill_chunk_size` is not needed); a forward
  of one token is a decode step, and every `block_size` steps end a period;
* every forward gets the absolute positions of its tokens (after eviction the cache is shorter
  than the sequence: RoPE needs the true position), and `get_seq_length()` is the logical
  length, tokens fed so far, as transformers' sliding-window layers report theirs; so
  `generate` continues a conversation from this cache (pass the whole history again: only the
  tokens past the cache are fed);
* the model attends with kvevict attention while the cache is open: close it (or use `with`).

One sequence only: a batch above one (several prompts, `num_beams > 1`, `num_return_sequences >
1`) and padding are refused with an error that says so; so are the cache edits of beam search and
assisted decoding (reorder, crop).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from transformers import DynamicCache

from kvevict.cache_manager.errors import InvalidArgument
from kvevict.cache_manager.settings import settings_from_request
from kvevict.cli_options import STATISTICS_DTYPES
from kvevict.eviction_policy import Policy, option_name, policy
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.worker import attention
from kvevict.worker.cache_session import CacheSession, EvictionSettings
from kvevict.worker.manager_client import EmbeddedManagerClient, ManagerClient
from kvevict.worker.model_loader import geometry_of
from kvevict.worker.summary import EvictionSummary

_ONE_SEQUENCE = ("EvictingCache holds one sequence: this forward has a batch of {batch} (several prompts, "
                 "num_beams > 1 or num_return_sequences > 1); give one sequence per cache")


class EvictingCache(DynamicCache):
    """A KV cache kept within `budget` tokens per KV head per layer (on average over layers)."""

    def __init__(self, model: torch.nn.Module, policy: str | Policy | pb.PolicySpec = "tova", budget: int = 512, *,
                 allocator: str = "uniform", block_size: int = 128,
                 manager: None | str | ManagerClient = None, statistics_dtype: str = "auto",
                 fail_open: bool = True) -> None:
        """`policy`: a name (`caote+snapkv`) or `kvevict.policy(...)`; `manager`: None for an
        embedded manager, `host:port` of a manager service, or a ManagerClient. ValueError names
        the argument (or the policy option) that is wrong."""
        super().__init__()
        settings = _settings(model, policy, budget, allocator, block_size, statistics_dtype, fail_open)
        self._session = CacheSession(model, _manager(manager), settings, hf_cache=self)
        self.block_size = block_size
        self.policy = Policy.from_spec(settings.policy)
        self._in_flight: tuple[int, bool] | None = None  # (tokens, prefill) of the forward under way
        self._failed: str | None = None
        self._inner_prefill = False  # forwarding the leading blocks of a longer prefill
        self._early_logits: list[torch.Tensor] = []
        self._counts = {"prefilled": 0, "decoded": 0}
        # Weak: a cache nobody holds any more is collected, and its hooks go with it.
        ref = weakref.ref(self)
        handles = [model.register_forward_pre_hook(lambda m, a, k: _call(ref, "_before_forward", m, a, k),
                                                   with_kwargs=True),
                   model.register_forward_hook(lambda m, a, k, o: _call(ref, "_after_forward", m, a, k, o),
                                               with_kwargs=True)]
        self._attention_held = [True]  # until the session closes; shared with the finalizer
        self._release = weakref.finalize(self, _release, handles, model, self._attention_held)

    # -- what transformers asks of a cache ---------------------------------------------------
    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        """Tokens fed before the forward under way (not the tokens held: see layer_lengths)."""
        return self._session.tokens_fed - (self._in_flight[0] if self._in_flight else 0)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise ValueError("EvictingCache does not support beam search (num_beams > 1): it holds one sequence")

    def crop(self, max_length: int) -> None:
        raise ValueError("EvictingCache cannot be cropped (assisted or prompt-lookup decoding): evicted tokens "
                         "cannot be restored")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise ValueError(_ONE_SEQUENCE.format(batch=repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise ValueError("EvictingCache holds one sequence: it cannot select batch rows")

    # -- what it holds ---------------------------------------------------------------------
    @property
    def layer_lengths(self) -> list[int]:
        """Tokens held per KV head, per layer (per-head allocators: the average over the layer's
        heads, rounded down; `summary().final_head_lengths` has each head's)."""
        return self._session.cache_counts()["final_lengths"]

    @property
    def layer_budgets(self) -> list[int]:
        return list(self._session.layer_budgets)

    def kv_bytes(self) -> int:
        """Bytes of keys and values held now."""
        return self._session.cache.kv_bytes()

    def full_cache_bytes(self) -> int:
        """Bytes transformers' DynamicCache would hold for the same tokens."""
        return self._session.cache.full_cache_bytes()

    def summary(self) -> EvictionSummary:
        """What eviction did so far (prompt tokens: those prefilled; generated: decode steps)."""
        session = self._session
        return EvictionSummary(
            prompt_tokens=self._counts["prefilled"], generated_tokens=self._counts["decoded"],
            peak_lengths=list(session.stats.peak_lengths), **session.cache_counts(),
            peak_kv_bytes=session.stats.peak_kv_bytes, reports=session.stats.reports,
            report_bytes=session.stats.report_bytes, manager_seconds=session.stats.manager_seconds,
            prefill_seconds=0.0, decode_seconds=0.0, manager_fallback=session.stats.manager_fallback)

    def close(self) -> None:
        """Closes the manager session and gives the model its own attention back."""
        self._session.close()
        self._attention_held[0] = False
        self._release()

    def __enter__(self) -> EvictingCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the forward hooks -----------------------------------------------------------------
    def _before_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if args:  # model(input_ids, past_key_values=cache): the tokens by position
            if kwargs.get("past_key_values") is not self or len(args) > 1:
                return None
            kwargs, args = {"input_ids": args[0], **kwargs}, ()
        if kwargs.get("past_key_values") is not self:
            return None
        if self._failed:
            raise RuntimeError(f"this EvictingCache is unusable after a failed forward ({self._failed}); "
                               "start a new one")
        if self._session.closed:
            raise ValueError("this EvictingCache is closed")
        key = "input_ids" if kwargs.get("input_ids") is not None else "inputs_embeds"
        tokens = kwargs[key]
        _check_forward(kwargs, tokens, self._session.tokens_fed)
        count = tokens.shape[1]
        prefill = self._inner_prefill or count > 1 or self._session.tokens_fed == 0
        if prefill and count > self.block_size:
            tokens = self._prefill_leading_blocks(module, kwargs, key, tokens)
            kwargs = {**kwargs, key: tokens}
            count = tokens.shape[1]
        if prefill:
            self._session.begin_prefill_block(count)
        else:
            self._session.begin_decode_step()
        positions = self._session.begin_forward(count)
        self._in_flight, self._failed = (count, prefill), "the forward did not finish"
        kwargs.update(position_ids=positions[None, :], attention_mask=None, **self._session.forward_kwargs())
        return args, kwargs

    def _prefill_leading_blocks(self, module: torch.nn.Module, kwargs: dict, key: str,
                                tokens: torch.Tensor) -> torch.Tensor:
        """Forwards every block but the last (each through these hooks); returns the last."""
        blocks = list(torch.split(tokens, self.block_size, dim=1))
        keep = kwargs.get("logits_to_keep", 0)
        want_all = isinstance(keep, int) and keep == 0  # a plain forward: every position's logits
        inner = {name: value for name, value in kwargs.items()
                 if name not in ("input_ids", "inputs_embeds", "attention_mask", "position_ids", "logits_to_keep")}
        self._inner_prefill = True
        try:
            for block in blocks[:-1]:
                output = module(**{key: block}, **inner, logits_to_keep=0 if want_all else 1)
                if want_all:
                    self._early_logits.append(output.logits)
        finally:
            self._inner_prefill = False
        return blocks[-1]

    def _after_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if kwargs.get("past_key_values") is not self or self._in_flight is None:
            return None
        count, prefill = self._in_flight
        self._session.end_forward(count)
        self._in_flight = None
        if prefill:
            self._session.end_prefill_block(count)
            self._counts["prefilled"] += count
        else:
            self._session.end_decode_step()
            self._counts["decoded"] += count
        self._failed = None
        if self._early_logits and not self._inner_prefill:
            output.logits = torch.cat([*self._early_logits, output.logits], dim=1)
            self._early_logits = []
        return output


def _check_forward(kwargs: dict, tokens: torch.Tensor, fed: int) -> None:
    """Refuses what a one-sequence evicting cache cannot serve, naming the argument."""
    if tokens.shape[0] != 1:
        raise ValueError(_ONE_SEQUENCE.format(batch=tokens.shape[0]))
    if kwargs.get("use_cache") is False:
        raise ValueError("use_cache=False with an EvictingCache: the cache would not be filled")
    if kwargs.get("output_attentions"):
        raise ValueError("output_attentions is not available with an EvictingCache (kvevict attention returns none)")
    mask = kwargs.get("attention_mask")
    if mask is not None and not bool(mask.bool().all()):
        raise ValueError("attention_mask: padding is not supported with an EvictingCache (one sequence, no pads)")
    given = kwargs.get("position_ids")
    if given is not None:
        expected = torch.arange(fed, fed + tokens.shape[1], device=given.device)
        if given.shape[-1] != tokens.shape[1] or not bool((given.reshape(-1, tokens.shape[1]) == expected).all()):
            raise ValueError(f"position_ids: an EvictingCache feeds the sequence in order, so the positions must be "
                             f"{fed}..{fed + tokens.shape[1] - 1}")


def _settings(model: torch.nn.Module, chosen: str | Policy | pb.PolicySpec, budget: int, allocator: str,
              block_size: int, statistics_dtype: str, fail_open: bool) -> EvictionSettings:
    for name, value in (("budget", budget), ("block_size", block_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}: must be an integer > 0, got {value!r}")
    if statistics_dtype not in STATISTICS_DTYPES:
        raise ValueError(f"statistics_dtype: one of {', '.join(STATISTICS_DTYPES)}, got {statistics_dtype!r}")
    settings = EvictionSettings(policy=policy(chosen).spec(), budget=pb.BudgetSpec(tokens=budget, allocator=allocator),
                                block_size=block_size, statistics_dtype=STATISTICS_DTYPES[statistics_dtype],
                                fail_open=fail_open)
    try:  # the manager's validation, against this model's geometry, before any session opens
        settings_from_request(pb.OpenSessionRequest(geometry=geometry_of(model), policy=settings.policy,
                                                    budget=settings.budget, block_size=block_size,
                                                    statistics_dtype=settings.statistics_dtype))
    except InvalidArgument as error:
        raise ValueError(f"{option_name(error.field)}: {error.message}") from None
    return settings


def _manager(manager: None | str | ManagerClient) -> ManagerClient:
    if manager is None:
        return EmbeddedManagerClient()
    if isinstance(manager, str):
        from kvevict.worker.remote_manager import RemoteManagerClient

        return RemoteManagerClient(manager)
    return manager


def _call(ref: weakref.ref, method: str, *args: Any) -> Any:
    cache = ref()
    return None if cache is None else getattr(cache, method)(*args)


def _release(handles: list, model: torch.nn.Module, attention_held: list[bool]) -> None:
    """Removes the hooks; gives back the attention of a cache collected without close()."""
    for handle in handles:
        handle.remove()
    if attention_held[0]:
        attention_held[0] = False
        attention.uninstall(model)
