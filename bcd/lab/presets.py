"""Model shapes without weights: named presets, config files and local model directories.

A model is built from its transformers config on the ``meta`` device, so nothing is allocated
and nothing is downloaded: the shapes are all that memory estimates and FLOP counts need.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bcd.checks import is_int

# Shapes of common models, from their published config.json files.
PRESETS: dict[str, dict[str, Any]] = {
    "llama-2-7b": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
        "max_position_embeddings": 4096, "tie_word_embeddings": False,
    },
    "llama-3-8b": {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 8192, "tie_word_embeddings": False,
    },
    "mistral-7b": {
        "model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 32768, "tie_word_embeddings": False,
    },
    "qwen2.5-7b": {
        "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "max_position_embeddings": 32768, "tie_word_embeddings": False,
    },
    "gpt2": {
        "model_type": "gpt2", "vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024,
    },
    "roberta-large": {
        "model_type": "roberta", "architectures": ["RobertaForSequenceClassification"], "vocab_size": 50265, "hidden_size": 1024, "num_hidden_layers": 24,
        "num_attention_heads": 16, "intermediate_size": 4096, "max_position_embeddings": 514,
        "type_vocab_size": 1, "pad_token_id": 1,
    },
}


def tiny_llama_config(*, vocab_size: int = 256, hidden: int = 64, layers: int = 8, heads: int = 4, kv_heads: int = 2,
                      intermediate: int | None = None, max_positions: int = 512) -> dict[str, Any]:
    """A small Llama's config values: the ``llama-tiny`` preset, and every tiny model in tests, tools and examples.

    ``intermediate`` defaults to ``2.75 * hidden``, Llama-2's ratio (11008 / 4096 is about 2.69).
    """
    return {
        "model_type": "llama", "vocab_size": vocab_size, "hidden_size": hidden,
        "intermediate_size": intermediate if intermediate is not None else int(2.75 * hidden),
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "max_position_embeddings": max_positions, "tie_word_embeddings": False,
    }


PRESETS["llama-tiny"] = tiny_llama_config()


def tiny_llama(*, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", **config: Any) -> nn.Module:
    """A small ``LlamaForCausalLM`` with random weights, built in ``dtype`` on ``device``; nothing downloaded.

    Args:
        dtype: built directly in it (building in fp32 and converting would double the peak).
        device: where to build it.
        **config: :func:`tiny_llama_config` options (``vocab_size``, ``hidden``, ``layers``, ...).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    values = tiny_llama_config(**config)
    values.pop("model_type")
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LlamaForCausalLM(LlamaConfig(**values))
    finally:
        torch.set_default_dtype(default)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_dtype(name: str) -> torch.dtype:
    """``"bf16"``, ``"fp16"`` or ``"fp32"`` as a torch dtype."""
    if name not in DTYPES:
        raise ValueError(f"Unknown dtype: {name!r}; accepted: {', '.join(DTYPES)}.")
    return DTYPES[name]


def load_config(preset: str | None = None, config: str | Path | None = None):
    """A transformers config from a preset name, a config.json path or a local model directory.

    Raises:
        ValueError: neither or both given, an unknown preset, or an unreadable config.
    """
    from transformers import AutoConfig

    if (preset is None) == (config is None):
        raise ValueError("Give exactly one of a preset or a config (config.json path or model directory).")
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"Unknown preset: {preset!r}; accepted: {', '.join(PRESETS)}.")
        values = dict(PRESETS[preset])
        return AutoConfig.for_model(values.pop("model_type"), **values)
    path = Path(config)
    try:
        if path.is_dir():
            loaded = AutoConfig.from_pretrained(path, local_files_only=True)
        else:
            values = json.loads(path.read_text())
            if not isinstance(values, dict) or not isinstance(values.get("model_type"), str):
                raise ValueError(f"it holds {type(values).__name__} {str(values)[:40]!r}, not an object with a 'model_type'")
            loaded = AutoConfig.for_model(values.pop("model_type"), **values)
    except Exception as error:  # OSError, JSON, and transformers' strict field validation (its own types)
        raise ValueError(
            f"Unreadable config: {str(path)!r} ({type(error).__name__}: {error}); accepted: a config.json with a "
            "'model_type', or a local model directory holding one."
        ) from error
    check_shape(loaded, str(path))
    return loaded


#: The largest size a shape field may take (16.7M): a product of two stays far from int64's bytes.
LARGEST_SIZE = 2**24
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "n_embd", "n_layer", "n_head", "d_model", "num_layers", "num_heads")


def check_shape(config: Any, source: str) -> None:
    """Refuse a config whose sizes are not positive integers, or whose heads do not divide the width.

    Raises:
        ValueError: naming the field, the value and what is accepted.
    """
    for name in SHAPE_FIELDS:
        value = getattr(config, name, None) if name in config.to_dict() else None
        if value is not None and not is_int(value, 1, LARGEST_SIZE):
            raise ValueError(f"Invalid config {source!r}: {name}={value!r:.40}; accepted: an integer from 1 to 2**24.")
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None)
    if isinstance(hidden, int) and isinstance(heads, int) and hidden % heads:
        raise ValueError(f"Invalid config {source!r}: hidden_size={hidden} is not a multiple of num_attention_heads={heads}.")
    if isinstance(heads, int) and isinstance(kv, int) and heads % kv:
        raise ValueError(f"Invalid config {source!r}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}.")


def build_model(config, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "meta") -> nn.Module:
    """The model for ``config``, built from scratch on ``device`` (``meta``: shapes only).

    The class is the config's first architecture when transformers has it, else a causal LM,
    else the bare model.
    """
    import transformers

    architectures = getattr(config, "architectures", None) or []
    candidates = [getattr(transformers, name) for name in architectures if hasattr(transformers, name)]
    with torch.device(device):
        if candidates:
            return candidates[0](config).to(dtype)
        for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
            try:
                return auto.from_config(config, dtype=dtype)
            except ValueError:
                continue
    raise ValueError(f"No transformers model class for config of type {config.model_type!r}.")
