"""Sequence classification, bcd.BAdam against full AdamW side by side (the paper's SuperGLUE-style setup).

A tiny BERT built from a config learns a synthetic task (is the majority of tokens from the lower
half of the vocabulary?) with each optimizer, from the same initial weights and batches. Prints
accuracy, wall time and the optimizer memory measured by bcd.memory.measure.

    python examples/classify.py
"""

from __future__ import annotations

import time

import torch
from rich.console import Console
from rich.table import Table
from transformers import BertConfig, BertForSequenceClassification

import bcd
from bcd.lab.memory import format_size, measure

VOCAB, LENGTH = 64, 16


def batch(generator: torch.Generator, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (size, LENGTH), generator=generator)
    labels = ((ids < VOCAB // 2).sum(dim=1) > LENGTH // 2).long()
    return ids, labels


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=LENGTH, num_labels=2)
    return BertForSequenceClassification(config)


def run(name: str, steps: int = 300) -> dict[str, object]:
    model = build()
    if name == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    else:
        optimizer = bcd.BAdam(model, lr=1e-3, weight_decay=0.01, switch_every=25, no_decay=True)
    generator = torch.Generator().manual_seed(1)
    peak = 0
    start = time.perf_counter()
    for _ in range(steps):
        ids, labels = batch(generator)
        model(input_ids=ids, labels=labels).loss.backward()
        live = measure(model, optimizer)
        peak = max(peak, live.gradients + live.solver_state + live.master_copies)
        optimizer.step()
        optimizer.zero_grad()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        ids, labels = batch(torch.Generator().manual_seed(99), size=1000)
        accuracy = (model(input_ids=ids).logits.argmax(-1) == labels).float().mean().item()
    return {"method": name, "accuracy": accuracy, "seconds": seconds, "optimizer memory": peak}


def main() -> None:
    results = [run("adamw"), run("badam")]
    table = Table(title="Tiny BERT, synthetic classification, 300 steps of batch 32 (fp32, CPU)")
    for column in ("method", "held-out accuracy", "wall time", "gradients + solver state + masters (peak)"):
        table.add_column(column)
    for r in results:
        table.add_row(r["method"], f"{r['accuracy']:.3f}", f"{r['seconds']:.1f} s", format_size(r["optimizer memory"]))
    Console().print(table)


if __name__ == "__main__":
    main()
