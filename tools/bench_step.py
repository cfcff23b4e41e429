"""Step-time benchmark: bcd.BAdam against full-parameter AdamW and the reference ``badam`` package.

All methods run in one process, on the same bf16 tiny Llama built from a config, the same
batches, over whole block-epochs (D blocks x K steps), interleaved round by round so that machine
noise hits them alike. Figures are medians over rounds (min and max beside them); ratios are taken
between figures of the same run. Not a test: nothing here asserts on a timing.

    python tools/bench_step.py                    # D = 8 layers, K = 4, CPU
    python tools/bench_step.py --device cuda --hidden 1024
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table

import bcd
from bcd.presets import tiny_llama


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    heads = max(1, args.hidden // 64)
    return tiny_llama(vocab_size=args.vocab, hidden=args.hidden, layers=args.layers, heads=heads, kv_heads=heads,
                      max_positions=args.seq).to(device=args.device, dtype=torch.bfloat16)


def make_optimizer(method: str, model: torch.nn.Module, args: argparse.Namespace):
    if method == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    if method == "bcd":
        return bcd.BAdam(model, lr=1e-5, switch_every=args.k, order="ascending")
    if method == "badam":
        from badam import BlockOptimizer

        base = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
        return BlockOptimizer(
            base_optimizer=base, named_parameters_list=list(model.named_parameters()),
            switch_block_every=args.k, switch_mode="ascending", verbose=0,
        )
    raise ValueError(method)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Runner:
    """One method's model, optimizer and timings."""

    def __init__(self, method: str, args: argparse.Namespace) -> None:
        self.method, self.args = method, args
        self.model = build_model(args)
        with self.quiet():
            self.optimizer = make_optimizer(method, self.model, args)
        self.times: dict[str, list[float]] = {"forward": [], "backward": [], "update": [], "step": []}
        self.losses: list[float] = []

    def quiet(self):
        # The reference prints a line at every switch; keep the table readable.
        return contextlib.redirect_stdout(io.StringIO()) if self.method == "badam" else contextlib.nullcontext()

    def steps(self, batches: list[torch.Tensor], record: bool) -> None:
        clock: Callable[[], float] = time.perf_counter
        device = self.args.device
        per_round = {k: 0.0 for k in self.times}
        for ids in batches:
            sync(device)
            t0 = clock()
            loss = self.model(input_ids=ids, labels=ids).loss
            sync(device)
            t1 = clock()
            loss.backward()
            sync(device)
            t2 = clock()
            with self.quiet():
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            sync(device)
            t3 = clock()
            per_round["forward"] += t1 - t0
            per_round["backward"] += t2 - t1
            per_round["update"] += t3 - t2
            per_round["step"] += t3 - t0
            self.losses.append(loss.item())
        if record:
            for key, total in per_round.items():
                self.times[key].append(total / len(batches))


def stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8, help="transformer layers = D (default 8)")
    parser.add_argument("--k", type=int, default=4, help="K, steps per block (default 4)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size (default 256)")
    parser.add_argument("--vocab", type=int, default=2048, help="vocabulary size (default 2048)")
    parser.add_argument("--batch", type=int, default=4, help="batch size (default 4)")
    parser.add_argument("--seq", type=int, default=128, help="sequence length (default 128)")
    parser.add_argument("--rounds", type=int, default=3, help="measured block-epochs per method (default 3)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()

    methods = ["adamw", "bcd"]
    try:
        import badam  # noqa: F401

        methods.append("badam")
    except ImportError:
        print("note: the reference package 'badam' is not installed (pip install badam); it is skipped")
    runners = [Runner(m, args) for m in methods]
    steps_per_epoch = args.layers * args.k
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator).to(args.device)
               for _ in range(steps_per_epoch)]
    for runner in runners:  # warm-up block-epoch, not recorded
        runner.steps(batches, record=False)
    for _ in range(args.rounds):  # interleaved: each round is one block-epoch of every method
        for runner in runners:
            runner.steps(batches, record=True)

    figures = {r.method: {k: stats(v) for k, v in r.times.items()} for r in runners}
    full = figures["adamw"]
    table = Table(title=f"Mean per-step time over a block-epoch (D={args.layers}, K={args.k}, {args.device}, "
                        f"bf16, batch {args.batch}x{args.seq}), median of {args.rounds} [min-max], ms")
    for column in ("method", "forward", "backward", "update", "step", "backward / AdamW", "step / AdamW", "step / badam"):
        table.add_column(column, justify="right")
    for method, figs in figures.items():
        row = [method]
        for key in ("forward", "backward", "update", "step"):
            s = figs[key]
            row.append(f"{1e3 * s['median']:.1f} [{1e3 * s['min']:.1f}-{1e3 * s['max']:.1f}]")
        row.append(f"{figs['backward']['median'] / full['backward']['median']:.2f}x")
        row.append(f"{figs['step']['median'] / full['step']['median']:.2f}x")
        row.append(f"{figs['step']['median'] / figures['badam']['step']['median']:.2f}x" if "badam" in figures else "-")
        table.add_row(*row)
    Console(width=160).print(table)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "machine": platform.platform(), "torch": torch.__version__,
                       "figures": figures}, handle, indent=2)


if __name__ == "__main__":
    main()
