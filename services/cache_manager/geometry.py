"""Shape of the managed model."""

from __future__ import annotations

from dataclasses import dataclass

from kvevict.cache_manager.errors import InvalidArgument
from kvevict.v1 import cache_manager_pb2 as pb

# Far above any model, low enough that a bogus OpenSession cannot allocate a huge session state.
LIMITS = {"num_layers": 1024, "num_kv_heads": 1024, "num_query_heads": 16384, "head_dim": 65536}


@dataclass(frozen=True)
class Geometry:
    """Shape of the managed model (ModelGeometry)."""

    num_layers: int
    num_kv_heads: int
    num_query_heads: int
    head_dim: int

    @classmethod
    def from_proto(cls, message: pb.ModelGeometry) -> Geometry:
        """Validates every field; InvalidArgument names `geometry.<field>`."""
        for name in ("num_layers", "num_kv_heads", "num_query_heads", "head_dim"):
            if getattr(message, name) <= 0:
                raise InvalidArgument(f"geometry.{name}", f"must be > 0, got {getattr(message, name)}")
            if getattr(message, name) > LIMITS[name]:
                raise InvalidArgument(f"geometry.{name}", f"must be <= {LIMITS[name]}, got {getattr(message, name)}")
        if message.num_query_heads % message.num_kv_heads:
            raise InvalidArgument(
                "geometry.num_query_heads",
                f"{message.num_query_heads} is not a multiple of num_kv_heads {message.num_kv_heads}",
            )
        return cls(message.num_layers, message.num_kv_heads, message.num_query_heads, message.head_dim)
