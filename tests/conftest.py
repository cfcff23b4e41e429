"""Tiny models built from configs, shared by the tests. Nothing is downloaded."""

from __future__ import annotations

import os
from collections.abc import Callable

# Only bcd's own plugins load in the tests: an installed third-party plugin (examples/bcd-halves,
# say) must not change what the suite sees. Set before bcd builds its registry.
os.environ["BCD_LOAD_PLUGINS"] = ""

import attrs
import pytest
import torch
from torch import nn

from bcd.lab import presets

VOCAB = 64


class MLP(nn.Module):
    """A plain MLP whose layers sit in a nn.ModuleList, with an input and an output projection."""

    def __init__(self, width: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(4, width)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.out = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.inp(x))
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.out(x)


def tiny_llama(layers: int = 2, hidden: int = 16) -> nn.Module:
    return presets.tiny_llama(vocab_size=VOCAB, hidden=hidden, layers=layers, heads=2, kv_heads=1,
                              intermediate=2 * hidden, max_positions=64)


def tiny_gpt2(layers: int = 2) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=layers, n_head=2, n_positions=64,
                        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def tiny_bert(layers: int = 2) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, num_labels=2)
    return BertForSequenceClassification(config)


@attrs.frozen
class Case:
    """A tiny model, how to compute a loss on it, and per-model plugin options."""

    name: str
    build: Callable[[], nn.Module]
    per_module: tuple[str, ...]

    def model(self, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
        torch.manual_seed(seed)
        return self.build().to(dtype)

    def loss(self, model: nn.Module, step: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(1000 + step)
        if self.name == "mlp":
            x = torch.randn(8, 4, generator=generator).to(next(model.parameters()).dtype)
            y = torch.randint(0, 2, (8,), generator=generator)
            return nn.functional.cross_entropy(model(x).float(), y)
        ids = torch.randint(0, VOCAB, (2, 12), generator=generator)
        if self.name == "bert":
            return model(input_ids=ids, labels=torch.tensor([0, 1])).loss
        return model(input_ids=ids, labels=ids).loss


CASES = {
    "mlp": Case("mlp", MLP, ("Linear",)),
    "llama": Case("llama", tiny_llama, ("LlamaAttention", "LlamaMLP")),
    "gpt2": Case("gpt2", tiny_gpt2, ("GPT2Attention", "GPT2MLP")),
    "bert": Case("bert", tiny_bert, ("BertAttention", "BertIntermediate", "BertOutput")),
}


@pytest.fixture(params=list(CASES), ids=list(CASES))
def case(request) -> Case:
    return CASES[request.param]


def train(model: nn.Module, optimizer: torch.optim.Optimizer, case: Case, steps: int, start: int = 0) -> list[float]:
    """Run ``steps`` optimizer steps on deterministic batches; returns the losses."""
    losses = []
    for step in range(start, start + steps):
        loss = case.loss(model, step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}
