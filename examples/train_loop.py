"""Fine-tune a tiny Llama with bcd.BAdam in a plain PyTorch loop, on CPU, in about a minute.

The model is built from a config (no download) and kept in bf16; the data are arithmetic
sentences generated here ("17 plus 25 is 42."), read as bytes, so no tokenizer is needed.

    python examples/train_loop.py            # defaults: 4 layers, K = 10, 200 steps
    python examples/train_loop.py --help
"""

from __future__ import annotations

import argparse
import random

import torch
from rich.console import Console
from rich.progress import Progress

import bcd
from bcd.lab.presets import tiny_llama


def sentences(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        out.append(f"{a} plus {b} is {a + b}." if rng.random() < 0.5 else f"{a} times {b} is {a * b}.")
    return out


def batches(texts: list[str], batch: int, seq: int, seed: int):
    """Endless batches of byte ids from the texts, packed into rows of ``seq`` bytes."""
    stream = torch.tensor(list(" ".join(texts).encode()), dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(stream) - seq, (batch,), generator=generator)
        yield torch.stack([stream[s : s + seq] for s in starts])


def main() -> None:
    parser = argparse.ArgumentParser(description="Fine-tune a tiny Llama with bcd.BAdam in a plain loop.")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    parser.add_argument("--layers", type=int, default=4, help="transformer layers, D (default 4)")
    parser.add_argument("--switch-every", type=int, default=10, help="K, steps per block (default 10)")
    parser.add_argument("--lr", type=float, default=3e-3, help="learning rate (default 3e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model = tiny_llama(layers=args.layers, max_positions=128, dtype=torch.bfloat16)
    optimizer = bcd.BAdam(model, lr=args.lr, switch_every=args.switch_every, seed=args.seed)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    data = batches(sentences(2000, args.seed), batch=8, seq=64, seed=args.seed)

    console = Console()
    console.print(f"blocks (D = {len(optimizer.blocks)}): {', '.join(b.name for b in optimizer.blocks)}")
    losses = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("training", total=args.steps)
        for _ in range(args.steps):
            ids = next(data)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            progress.update(task, advance=1, description=f"loss {loss.item():.3f} block {optimizer.active_block.name}")
    head, tail = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    console.print(f"loss: first 10 steps {head:.3f} -> last 10 steps {tail:.3f}; "
                  f"block-epochs completed: {optimizer.block_epoch}")


if __name__ == "__main__":
    main()
