"""Tiny random models of real architectures (configs only: no weights are downloaded)."""

from __future__ import annotations

from transformers import (
    Gemma2Config, Gemma3TextConfig, GPT2Config, GPTBigCodeConfig, GPTNeoXConfig, LlamaConfig, MistralConfig,
    OPTConfig, Phi3Config, PretrainedConfig, Qwen2Config, Qwen3Config,
)

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
# Windows of the windowed configs: shorter than the tests' prompts, so they really cut.
WINDOW = 12
TOKENS = dict(vocab_size=97, bos_token_id=1, eos_token_id=2)


def tiny_config(arch: str, **overrides) -> PretrainedConfig:
    """GQA (4 query heads over 2 KV heads) where the architecture has it, unless overridden.

    Gemma 2 and 3 come with their sliding windows (WINDOW, sliding and full layers mixed) and
    Gemma 2 with its soft-capped attention; Mistral, Qwen2 and Phi-3 have no window unless given
    one (`sliding_window=...`; Qwen2 also needs `use_sliding_window=True`).
    """
    settings = {**COMMON, **overrides}
    if arch == "llama":
        return LlamaConfig(**settings)
    if arch == "qwen2":
        return Qwen2Config(**settings)  # q/k/v biases, as in real Qwen2
    if arch == "qwen3":
        return Qwen3Config(**{"head_dim": 16, **settings})  # q/k norms
    if arch == "mistral":
        return MistralConfig(**{"sliding_window": None, **settings})
    if arch == "phi3":
        return Phi3Config(**{"sliding_window": None, **settings})  # fused qkv projection
    if arch == "gemma2":  # layers alternate sliding and full attention
        return Gemma2Config(**{"head_dim": 16, "sliding_window": WINDOW, **settings})
    if arch == "gemma3":
        layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
        return Gemma3TextConfig(**{"head_dim": 16, "sliding_window": WINDOW, "layer_types": layer_types, **settings})
    if arch == "gpt2":  # learned absolute positions, fused qkv, MHA
        return GPT2Config(**{**TOKENS, "n_embd": 64, "n_layer": 3, "n_head": 4, "n_positions": 1024, **overrides})
    if arch == "opt":  # learned positions with an offset, MHA
        return OPTConfig(**{**TOKENS, "pad_token_id": 0, "hidden_size": 64, "ffn_dim": 96, "num_hidden_layers": 3,
                            "num_attention_heads": 4, "max_position_embeddings": 1024, "word_embed_proj_dim": 64,
                            **overrides})
    if arch == "gpt_neox":  # partial rotary, parallel residual, MHA
        return GPTNeoXConfig(**{**TOKENS, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
                                "num_attention_heads": 4, "max_position_embeddings": 1024, **overrides})
    if arch == "gpt_bigcode":  # multi-query attention: one KV head, flagged rather than counted
        return GPTBigCodeConfig(**{**TOKENS, "n_embd": 64, "n_layer": 3, "n_head": 4, "n_positions": 1024,
                                   "multi_query": True, **overrides})
    raise ValueError(arch)


ARCHITECTURES = ("llama", "qwen2", "mistral")

# Every supported architecture as the architecture test runs it: name -> (arch, overrides).
SUPPORTED = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),
    "qwen2-window": ("qwen2", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "qwen3": ("qwen3", {}),
    "mistral-window": ("mistral", dict(sliding_window=WINDOW)),
    "phi3": ("phi3", {}),
    "phi3-window": ("phi3", dict(sliding_window=WINDOW)),
    "gemma2": ("gemma2", {}),
    "gemma3": ("gemma3", {}),
    "gpt2": ("gpt2", {}),
    "opt": ("opt", {}),
    "gpt_neox": ("gpt_neox", {}),
    "gpt_bigcode": ("gpt_bigcode", {}),
}
