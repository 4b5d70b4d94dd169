"""A GGUF file turned into a plain Hugging Face checkpoint directory (config, safetensors,
tokenizer files), so that it loads with `from_pretrained(directory)` and no GGUF code."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

# How the GGUF was loaded and its display name: nothing a plain checkpoint should carry.
_DROPPED_CONFIG_KEYS = ("quantization_config", "_model_name_or_path")


def convert_gguf(gguf_file: Path, out_dir: Path, dtype: torch.dtype = torch.bfloat16) -> None:
    """Dequantizes `gguf_file` and saves model, generation config and tokenizer into `out_dir`.

    >>> convert_gguf(Path("SmolLM2-135M-Instruct.Q4_1.gguf"), Path("smollm2"))  # doctest: +SKIP
    >>> AutoModelForCausalLM.from_pretrained("smollm2")                          # doctest: +SKIP
    """
    gguf_file = Path(gguf_file).resolve()
    # dequantize=True: plain dense weights (the packed GGUF layers cannot be saved).
    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, dtype=dtype,
        quantization_config=GgufConfig(dequantize=True))
    state = loaded.state_dict()
    config = copy.deepcopy(loaded.config)
    for key in _DROPPED_CONFIG_KEYS:
        if hasattr(config, key):
            delattr(config, key)
    generation_config = loaded.generation_config
    del loaded
    # A fresh model of the same config holds no trace of the GGUF loader; built on the meta device
    # and handed the loaded tensors, it costs no second copy of the weights.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.generation_config = generation_config
    model.save_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    tokenizer.save_pretrained(out_dir)
