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
    "llama-tiny": {
        "model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 176,
        "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 512, "tie_word_embeddings": False,
    },
}

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
            return AutoConfig.from_pretrained(path, local_files_only=True)
        values = json.loads(path.read_text())
        return AutoConfig.for_model(values.pop("model_type"), **values)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"Unreadable config: {str(path)!r} ({type(error).__name__}: {error}); accepted: a config.json with a "
            "'model_type', or a local model directory holding one."
        ) from error


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
