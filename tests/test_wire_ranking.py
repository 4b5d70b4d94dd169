"""The default statistics encoding keeps CAOTE's ranking on a real model's concentrated heads.

models/retrieval's heads put nearly all the mass on a few tokens; float16 flushes every
probability below ~6e-8 to 0, so more than `budget` tokens tie at 0 and the recency tie-break,
not the score, decides. The default wire (bfloat16 for probabilities and norms) must keep the
same tokens as float64 scores computed from the captured q/k/v, beyond ties (scores within a few
bfloat16 roundings of the threshold); float16 must not (the test can fail).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kvevict.cache_manager import InMemoryStateStore, ManagerCore
from kvevict.cache_manager.selection import select_keep
from kvevict.cache_manager.wrappers import caote_scores
from kvevict.evaluation.retrieval_task import RetrievalTask
from kvevict.v1 import tensor_pb2
from kvevict.worker.model_loader import geometry_of, load_model
from tests.caote_oracle import excluded_deviation_exact, group_last_query_probs, record_block
from tests.test_manager_support import open_request

CKPT = Path(__file__).resolve().parent.parent / "models" / "retrieval"
CONTEXT = 512
BUDGET = CONTEXT // 5
# Two bfloat16 roundings (attention and deviation, 2^-8 each) and float32 arithmetic.
TIE = 2.0**-6


@pytest.fixture(scope="module")
def model_and_prompt():
    model, _ = load_model(str(CKPT))
    task = RetrievalTask.load(CKPT)
    example = task.example(np.random.default_rng(3), CONTEXT, 4)
    return model, torch.from_numpy(example.token_ids[: example.context_tokens])


def negotiated(model, dtype: int):
    """What the manager asks a caote+tova session for under `dtype`."""
    geometry = geometry_of(model)
    request = open_request("tova", "caote", budget=BUDGET, dtype=dtype, num_layers=geometry.num_layers,
                           num_kv_heads=geometry.num_kv_heads, num_query_heads=geometry.num_query_heads,
                           head_dim=geometry.head_dim)
    return list(ManagerCore(InMemoryStateStore()).open_session(request).statistics)


def ranking_violations(model, ids, dtype: int) -> tuple[int, float, int]:
    """(kept/evicted tokens on the wrong side of the float64 threshold beyond ties, worst evicted
    score over the threshold, heads) for caote+tova at BUDGET under the `dtype` wire."""
    recorder, captured = record_block(model, ids, negotiated(model, dtype))
    violations, worst, heads = 0, 0.0, 0
    for layer, att in enumerate(captured):
        for head in range(att.key.shape[0]):
            probs = group_last_query_probs(att, head)
            exact = np.asarray(probs, np.float64) * excluded_deviation_exact(probs, att.value[head])
            assert np.isfinite(exact).all()
            got = caote_scores(recorder.statistic(layer, 0)[head], recorder.statistic(layer, 1)[head])
            keep = select_keep(got[None], BUDGET, 0, 0)[0]
            threshold = np.sort(exact)[::-1][BUDGET - 1]
            wrongly_evicted = ~keep & (exact > threshold * (1 + TIE))
            wrongly_kept = keep & (exact < threshold / (1 + TIE))
            violations += int(wrongly_evicted.sum() + wrongly_kept.sum())
            if wrongly_evicted.any():
                worst = max(worst, float(exact[wrongly_evicted].max() / threshold))
            heads += 1
    return violations, worst, heads


def test_default_wire_keeps_the_float64_kept_set_beyond_ties(model_and_prompt) -> None:
    model, ids = model_and_prompt
    violations, _, heads = ranking_violations(model, ids, tensor_pb2.DTYPE_UNSPECIFIED)
    print(f"default wire: {violations} tokens on the wrong side of the float64 threshold in {heads} heads")
    assert violations == 0


def test_float16_wire_breaks_the_ranking_on_the_same_heads(model_and_prompt) -> None:
    model, ids = model_and_prompt
    violations, worst, heads = ranking_violations(model, ids, tensor_pb2.DTYPE_FLOAT16)
    print(f"float16 wire: {violations} tokens on the wrong side in {heads} heads; "
          f"an evicted token scored {worst:.0f}x the keep threshold")
    assert violations > 0 and worst > 10
