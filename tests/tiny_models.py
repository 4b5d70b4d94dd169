"""Tiny random models of real architectures (configs only: no weights are downloaded)."""

from __future__ import annotations

from transformers import LlamaConfig, MistralConfig, Qwen2Config, PretrainedConfig

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_config(arch: str, **overrides) -> PretrainedConfig:
    """GQA (4 query heads over 2 KV heads) unless overridden."""
    settings = {**COMMON, **overrides}
    if arch == "llama":
        return LlamaConfig(**settings)
    if arch == "qwen2":
        return Qwen2Config(**settings)  # q/k/v biases, as in real Qwen2
    if arch == "mistral":
        return MistralConfig(sliding_window=None, **settings)
    raise ValueError(arch)


ARCHITECTURES = ("llama", "qwen2", "mistral")
