"""kvevict: KV-cache token eviction for LLM serving.

The Python API (docs/API.md): `kvevict.policy(...)` builds a policy, `kvevict.EvictingCache`
is a transformers cache that evicts, for `model.generate`; `kvevict.load_model` loads a local
checkpoint, a hub id, a known name (`smollm2-135m-instruct`) or a .gguf file. Imported on first use: the manager's
image imports this package without torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["EvictingCache", "Policy", "load_model", "policy"]

_LAZY = {"EvictingCache": "kvevict.worker.evicting_cache", "Policy": "kvevict.eviction_policy",
         "policy": "kvevict.eviction_policy", "load_model": "kvevict.worker.model_loader"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kvevict' has no attribute {name!r}")
