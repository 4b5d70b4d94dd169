"""Sliding-window layers: which cached tokens no future query can see.

A query at position p of a layer with window w sees the keys at positions > p - w (transformers'
sliding-window mask). Once position P has been fed, the next query is at P + 1, so a token at a
position <= P + 1 - w is never seen again. A KV head's positions increase along its row, so those
tokens lead the row; every head holds as many tokens, so the columns that can go are the leading
ones of the head holding the fewest such tokens. The worker (on its cache) and the manager (on
its tracked state) apply this same rule to the same positions, which keeps them aligned column
for column without positions being sent back. Works on numpy arrays and torch tensors alike.
"""

from __future__ import annotations

from typing import Any


def last_hidden_position(last_position: int, window: int) -> int:
    """The highest position that no query after `last_position` can see (window > 0)."""
    return last_position + 1 - window


def droppable(positions: Any, last_position: int, window: int) -> int:
    """Leading columns of `positions` (kv_heads, L) that no query after `last_position` can see in
    any head of a layer with sliding window `window` (0: full attention, nothing to drop)."""
    if window <= 0 or positions.shape[-1] == 0:
        return 0
    return int((positions <= last_hidden_position(last_position, window)).sum(-1).min())


def hidden(positions: Any, last_position: int, window: int) -> Any:
    """Boolean like `positions`: the tokens no query after `last_position` can see (window > 0)."""
    return positions <= last_hidden_position(last_position, window)
