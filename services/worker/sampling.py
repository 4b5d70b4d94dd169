"""Choosing the next token from logits: greedy, or temperature + nucleus (top-p) sampling."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy; top_p in (0, 1]; seed makes sampling reproducible."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


class Sampler:
    """Stateful (seeded) next-token choice for one generation."""

    def __init__(self, config: SamplingConfig) -> None:
        self.config = config
        self._generator = torch.Generator().manual_seed(config.seed)

    def __call__(self, logits: torch.Tensor) -> int:
        """logits: (vocab,) of the next position."""
        if self.config.temperature == 0.0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float().cpu() / self.config.temperature, dim=-1)
        if self.config.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the top token always survives).
            outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= self.config.top_p
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self._generator))
