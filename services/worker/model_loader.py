"""Loading a Hugging Face causal LM with kvevict attention, and the cache geometry it implies."""

from __future__ import annotations

import copy
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import get_layer_types_and_kwargs

from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.worker.attention import UnsupportedModel, use_kvevict_attention

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_threads() -> int:
    """Intra-op threads for CPU inference: on 2-core machines 2 threads ran slower than 1."""
    cores = os.cpu_count() or 1
    return 1 if cores <= 2 else max(1, cores // 2)


def resolve_device(device: str) -> torch.device:
    """Any torch device string (`cpu`, `cuda`, `cuda:1`, `mps`, `xpu:0`, ...) that exists here;
    ValueError names --device and says what this machine has."""
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"--device: {device!r} is not a torch device ({error}); e.g. cpu, cuda, cuda:1, mps") from None
    if resolved.type == "cpu":
        return resolved
    # torch.cuda, torch.mps, torch.xpu: the accelerator's module says whether it is usable here.
    backends = {kind: getattr(torch, kind) for kind in ("cuda", "mps", "xpu") if hasattr(torch, kind)}
    usable = ["cpu"] + [f"{kind}:{i}" for kind, backend in backends.items() if backend.is_available()
                        for i in range(backend.device_count())]
    backend = backends.get(resolved.type)
    if backend is None or not backend.is_available():
        raise ValueError(f"--device {device}: torch sees no {resolved.type} device on this machine "
                         f"(usable here: {', '.join(usable)})")
    count = backend.device_count()
    if resolved.index is not None and resolved.index >= count:
        raise ValueError(f"--device {device}: this machine has {count} {resolved.type} device"
                         f"{'' if count == 1 else 's'} (usable here: {', '.join(usable)})")
    return resolved


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_model(
    name_or_path: str, device: str = "cpu", dtype: str = "float32", trust_remote_code: bool = False
) -> tuple[PreTrainedModel, "AutoTokenizer"]:
    """Loads a causal LM and its tokenizer from a local path, a hub id (hub ids need network), a
    known model name (fetched once, see model_fetch) or a .gguf file.

    UnsupportedModel (a ValueError) for an architecture kvevict cannot run (see geometry_of).
    """
    from kvevict.worker.model_fetch import resolve_model  # a known name or a .gguf file: its cached checkpoint
    name_or_path = resolve_model(name_or_path)
    # Loaded with its default attention, then switched: an architecture that cannot take
    # kvevict's gets a clear refusal instead of transformers' KeyError at construction.
    model = prepare(AutoModelForCausalLM.from_pretrained(name_or_path, dtype=resolve_dtype(dtype),
                                                         trust_remote_code=trust_remote_code), device)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    return model, tokenizer


def model_from_config(config: PretrainedConfig, seed: int = 0, dtype: str = "float32") -> PreTrainedModel:
    """A randomly initialised model of `config` (tests and benchmarks; no weights needed)."""
    torch.manual_seed(seed)
    # from_config writes the attention choice into the config: keep the caller's config intact.
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=resolve_dtype(dtype))
    return prepare(model, "cpu")


def prepare(model: PreTrainedModel, device: str) -> PreTrainedModel:
    """Checks that kvevict can run the model (UnsupportedModel if not), switches it to kvevict
    attention for good, moves it to `device` and sets eval mode."""
    geometry_of(model)
    use_kvevict_attention(model)
    model = model.to(resolve_device(device))
    model.eval()
    return model


def geometry_of(model_or_config: PreTrainedModel | PretrainedConfig) -> pb.ModelGeometry:
    """The cache geometry the manager needs: layers, KV heads, query heads, head dimension and
    each layer's sliding window, read from the config as transformers reads it.

    UnsupportedModel for layers other than full or sliding-window attention (chunked, linear...).
    """
    config = getattr(model_or_config, "config", model_or_config)
    text = config.get_text_config(decoder=True)
    query_heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or query_heads
    if getattr(text, "multi_query", False) and not getattr(text, "new_decoder_architecture", False):
        kv_heads = 1  # GPT-BigCode (and Falcon) flag multi-query attention instead of counting heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // query_heads
    return pb.ModelGeometry(num_layers=text.num_hidden_layers, num_kv_heads=kv_heads, num_query_heads=query_heads,
                            head_dim=head_dim, sliding_windows=sliding_windows(text))


def sliding_windows(config: PretrainedConfig) -> list[int]:
    """Per layer: the sliding window in tokens, 0 for full attention; [] when no layer slides.

    The layer types DynamicCache(config=...) builds its layers from (explicit `layer_types`, or
    one per layer from `sliding_window`), so windows and the full cache's size agree with it.
    """
    layer_types, layer_kwargs = get_layer_types_and_kwargs(config)
    windows = []
    for layer, (kind, kwargs) in enumerate(zip(layer_types, layer_kwargs)):
        if kind == "full_attention":
            windows.append(0)
        elif kind == "sliding_attention":
            windows.append(int(kwargs["sliding_window"]))
        else:
            raise UnsupportedModel(f"layer {layer} is a {kind!r} layer; kvevict runs full and sliding-window "
                                   "attention layers only")
    return windows if any(windows) else []
