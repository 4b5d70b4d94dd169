"""Shape of the managed model."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvevict.cache_manager.errors import InvalidArgument
from kvevict.v1 import cache_manager_pb2 as pb

# Far above any model, low enough that a bogus OpenSession cannot allocate a huge session state.
LIMITS = {"num_layers": 1024, "num_kv_heads": 1024, "num_query_heads": 16384, "head_dim": 65536}
# Positions are tracked as int32: a wider window than that is no window.
MAX_SLIDING_WINDOW = 2**31 - 1


@dataclass(frozen=True)
class Geometry:
    """Shape of the managed model (ModelGeometry)."""

    num_layers: int
    num_kv_heads: int
    num_query_heads: int
    head_dim: int
    # Per layer: sliding attention window in tokens, 0 = full attention (empty: all full).
    sliding_windows: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        # One entry per layer, whatever was given (stored states list them, older ones lack them).
        windows = tuple(int(w) for w in self.sliding_windows) or (0,) * self.num_layers
        object.__setattr__(self, "sliding_windows", windows)

    def to_proto(self) -> pb.ModelGeometry:
        return pb.ModelGeometry(num_layers=self.num_layers, num_kv_heads=self.num_kv_heads,
                                num_query_heads=self.num_query_heads, head_dim=self.head_dim,
                                sliding_windows=self.sliding_windows if any(self.sliding_windows) else [])

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
        windows = tuple(message.sliding_windows)
        if windows and len(windows) != message.num_layers:
            raise InvalidArgument("geometry.sliding_windows",
                                  f"needs one entry per layer ({message.num_layers}) or none, got {len(windows)}")
        for layer, window in enumerate(windows):
            if window > MAX_SLIDING_WINDOW:
                raise InvalidArgument(f"geometry.sliding_windows[{layer}]",
                                      f"must be <= {MAX_SLIDING_WINDOW} (0 = full attention), got {window}")
        return cls(message.num_layers, message.num_kv_heads, message.num_query_heads, message.head_dim, windows)
