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

import torch
from benchlib import Stopwatch, environment, ms, print_table, spread

import bcd
from bcd.lab.presets import tiny_llama


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
        per_round = {k: 0.0 for k in self.times}
        for ids in batches:
            watch = Stopwatch(self.args.device)
            loss = self.model(input_ids=ids, labels=ids).loss
            per_round["forward"] += watch.lap()
            loss.backward()
            per_round["backward"] += watch.lap()
            with self.quiet():
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            per_round["update"] += watch.lap()
            self.losses.append(loss.item())
        per_round["step"] = per_round["forward"] + per_round["backward"] + per_round["update"]
        if record:
            for key, total in per_round.items():
                self.times[key].append(total / len(batches))


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

    figures = {r.method: {k: spread(v) for k, v in r.times.items()} for r in runners}
    full = figures["adamw"]
    rows = []
    for method, figs in figures.items():
        row = [method, *(ms(figs[key]) for key in ("forward", "backward", "update", "step"))]
        row.append(f"{figs['backward']['median'] / full['backward']['median']:.2f}x")
        row.append(f"{figs['step']['median'] / full['step']['median']:.2f}x")
        row.append(f"{figs['step']['median'] / figures['badam']['step']['median']:.2f}x" if "badam" in figures else "-")
        rows.append(row)
    print_table(f"Mean per-step time over a block-epoch (D={args.layers}, K={args.k}, {args.device}, bf16, batch "
                f"{args.batch}x{args.seq}), median of {args.rounds} [min-max], ms",
                ("method", "forward", "backward", "update", "step", "backward / AdamW", "step / AdamW", "step / badam"),
                rows)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "environment": environment(["badam"]), "figures": figures}, handle, indent=2)


if __name__ == "__main__":
    main()
