"""The ``bcd`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import attrs
from rich.console import Console
from rich.table import Table

from bcd import plugins
from bcd.checks import positive_int


def _options(pairs: Sequence[str] | None, flag: str) -> dict:
    """``KEY=VALUE`` pairs as a dict; values are read as JSON when they parse, else as strings."""
    options = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"Invalid {flag}: {pair!r}; accepted: KEY=VALUE, e.g. num_blocks=4.")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    from bcd.presets import DTYPES, PRESETS

    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help=f"a named model shape: {', '.join(PRESETS)}")
    source.add_argument("--config", help="a config.json path or a local model directory")
    parser.add_argument("--dtype", default="bf16", help=f"training dtype of the model: {', '.join(DTYPES)} (default bf16)")
    parser.add_argument("--partition", default="layer", help="BAdam's partitioner (default layer)")
    parser.add_argument("--partition-option", action="append", metavar="KEY=VALUE",
                        help="an option for the partitioner, repeatable; JSON values. Defaults for layer: "
                             "'memory' follows bcd.BAdam (include_embedding=false include_head=false), "
                             "'profile' profiles every block (both true)")


def _memory(args: argparse.Namespace) -> int:
    from bcd import memory
    from bcd.presets import build_model, load_config, parse_dtype

    methods = list(memory.METHODS) if args.method == "all" else [args.method]
    if args.method != "all" and args.method not in memory.METHODS:
        raise ValueError(f"Unknown method: {args.method!r}; accepted: {', '.join(memory.METHODS)}, all.")
    budget = memory.parse_size(args.budget) if args.budget is not None else None
    config = load_config(args.preset, args.config)
    activations = None
    if args.batch is not None or args.seq is not None:
        activations = memory.estimate_activations(config, batch=args.batch or 1, seq=args.seq or 512,
                                                  checkpointing=args.checkpointing)
    model = build_model(config, dtype=parse_dtype(args.dtype))
    options = _options(args.partition_option, "--partition-option") if args.partition_option else None
    report = memory.estimate(
        model, methods=methods, partitioner=args.partition, partitioner_options=options, solver=args.solver,
        lora_rank=args.lora_rank, lora_targets=args.lora_targets.split(","), activations=activations,
        name=args.preset or args.config, world_size=args.world_size,
    )
    extra = activations.bytes if activations else 0
    verdict = None
    if budget is not None:
        fits = [m.method for m in report.methods if m.breakdown.total + extra <= budget]
        misses = [m.method for m in report.methods if m.breakdown.total + extra > budget]
        verdict = (f"budget {args.budget}: fits: {', '.join(fits) or 'none'}; "
                   f"does not fit: {', '.join(misses) or 'none'}"
                   + (" (activations included)" if activations else " (activations not included: give --batch/--seq)"))
    if args.json:
        print(json.dumps({**attrs.asdict(report), "budget": budget, "verdict": verdict}, indent=2))
        return 0
    size = memory.format_size
    per_rank = f", per rank of {args.world_size} (FSDP2)" if args.world_size > 1 else ""
    table = Table(title=f"Memory of {report.model} ({report.params / 1e9:.2f}B parameters, {report.dtype}){per_rank}, "
                        "GB = 10^9 bytes")
    for column in ("method", "weights", "gradients", "solver state", "master copies", "total"):
        table.add_column(column, justify="left" if column == "method" else "right")
    if activations:
        table.add_column("+ activations (estimate)", justify="right")
    table.add_column("how")
    for m in report.methods:
        b = m.breakdown
        row = [m.method, size(b.weights), size(b.gradients), size(b.solver_state), size(b.master_copies), size(b.total)]
        if activations:
            row.append(size(b.total + extra))
        table.add_row(*row, m.note)
    console = Console(width=max(Console().width, 140))
    console.print(table)
    for m in report.methods:
        if m.method == "badam":
            largest = next(f for f in m.blocks if f.name == m.largest_block)
            console.print(
                f"BAdam: D = {len(m.blocks)} blocks; the largest, [bold]{largest.name}[/] ({largest.params / 1e6:.1f}M "
                f"parameters, {size(largest.bytes.total)} to train), sets the peak. Paper's 2M + 16M/D: "
                f"{size(m.paper_formula)}.", highlight=False)
    if activations:
        console.print(f"Activations (estimate, batch {activations.batch} x seq {activations.seq}, checkpointing "
                      f"{'on' if activations.checkpointing else 'off'}): {size(activations.bytes)}", highlight=False)
    if verdict:
        console.print(verdict, highlight=False)
    return 0


def _plugins(args: argparse.Namespace) -> int:
    rows = plugins.list_plugins()
    if args.json:
        print(json.dumps([{"kind": r.kind, "name": r.name, "source": r.source} for r in rows], indent=2))
        return 0
    table = Table(title="bcd plugins")
    for column in ("kind", "name", "source", "factory"):
        table.add_column(column)
    for r in rows:
        factory = f"{getattr(r.factory, '__module__', '?')}.{getattr(r.factory, '__qualname__', r.factory)}"
        table.add_row(r.kind, r.name, r.source, factory)
    Console().print(table)
    return 0


def _profile(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from bcd import profiler
    from bcd.presets import build_model, load_config, parse_dtype

    device = profiler.check_device(args.device)
    for label in ("batch", "seq", "repeats"):
        positive_int(f"--{label}", getattr(args, label))
    config = load_config(args.preset, args.config)
    model = build_model(config, dtype=parse_dtype(args.dtype), device=device)
    options = {"include_embedding": True, "include_head": True} if args.partition == "layer" else {}
    options.update(_options(args.partition_option, "--partition-option"))
    console = Console(width=max(Console().width, 170))
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("profiling", total=None)
        result = profiler.profile(
            model, batch=args.batch, seq=args.seq, partitioner=args.partition, partitioner_options=options,
            repeats=args.repeats, warmup=args.warmup, use_checkpointing=args.checkpointing,
            progress=lambda label: bar.update(task, description=f"profiling {label}"),
            name=args.preset or args.config,
        )
    from bcd import profile_report

    console.print(profile_report.table(result))
    console.print(profile_report.summary(result), highlight=False)
    if args.json:
        profile_report.write_json(result, args.json)
    if args.csv:
        profile_report.write_csv(result, args.csv)
    if args.plot:
        profile_report.plot(result, args.plot)
    if args.tensorboard:
        profile_report.write_tensorboard(result, args.tensorboard)
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from bcd.finetune import finetune, perplexity
    from bcd.memory import format_size

    console = Console(width=max(Console().width, 120))
    console.print(f"bcd finetune: {args.model or 'tiny Llama built from a config'} on "
                  f"{args.dataset or 'the bundled demo instructions'}, {args.max_steps} steps, bcd.BAdam "
                  f"(K = {args.switch_every}, {args.order} order)", highlight=False)
    summary = finetune(
        model_name=args.model, dataset=args.dataset, output_dir=args.output_dir, max_steps=args.max_steps,
        batch_size=args.batch_size, max_length=args.max_length, learning_rate=args.lr,
        switch_every=args.switch_every, order=args.order, seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing, tensorboard=not args.no_tensorboard,
    )
    table = Table(title="bcd finetune: summary")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("model", summary.model)
    table.add_row("data", f"{summary.dataset}, {summary.examples} examples")
    table.add_row("eval loss before -> after", f"{summary.loss_before:.3f} -> {summary.loss_after:.3f}")
    table.add_row("eval perplexity before -> after",
                  f"{perplexity(summary.loss_before):.1f} -> {perplexity(summary.loss_after):.1f}")
    table.add_row("optimizer steps", str(summary.steps))
    table.add_row("block-epochs completed", f"{summary.block_epochs} (D = {summary.blocks} blocks)")
    for key in ("weights", "gradients", "solver_state", "master_copies"):
        table.add_row(f"memory: {key.replace('_', ' ')} (bcd peak | AdamW estimate)",
                      f"{format_size(summary.memory.get(key, 0))} | {format_size(summary.adamw_estimate[key])}")
    bcd_total, adamw_total = sum(summary.memory.values()), sum(summary.adamw_estimate.values())
    table.add_row("memory: total (bcd, sum of peaks | AdamW)", f"{format_size(bcd_total)} | {format_size(adamw_total)} "
                  f"({bcd_total / adamw_total:.2f}x)")
    table.add_row("model and tokenizer saved in", summary.output_dir)
    table.add_row("TensorBoard logs", f"tensorboard --logdir {summary.tensorboard_dir}" if summary.tensorboard_dir else "off")
    table.add_row("wall time", f"{summary.seconds:.0f} s")
    console.print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bcd",
        description="bcd: block-coordinate optimization for PyTorch (BAdam and friends).",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    listing = commands.add_parser(
        "plugins",
        help="list every registered partitioner, ordering and solver with the package it came from",
        description="List every registered plugin: its kind, the name to use it by, the package that "
        "registered it (distribution and version, or '(in-process)') and its factory.",
    )
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(run=_plugins)

    mem = commands.add_parser(
        "memory",
        help="estimate memory by category for Adam, BAdam, LoRA and LOMO, without weights",
        description="Estimate training memory by category (weights, gradients, solver state, master copies) for "
        "mixed-precision Adam, BAdam with the actual partition, LoRA and LOMO. The model is built from its config on "
        "the meta device: nothing is allocated or downloaded. GB are 10^9 bytes.",
    )
    _add_model_arguments(mem)
    mem.add_argument("--method", default="all", help="adam, badam, lora, lomo or all (default all)")
    mem.add_argument("--solver", default="adamw", help="inner solver of BAdam, and Adam's/LoRA's optimizer (default adamw)")
    mem.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (default 8)")
    mem.add_argument("--lora-targets", default="q_proj,v_proj", help="LoRA target layers, comma-separated (default q_proj,v_proj)")
    mem.add_argument("--batch", type=int, help="batch size, for the activation estimate")
    mem.add_argument("--seq", type=int, help="sequence length, for the activation estimate")
    mem.add_argument("--checkpointing", action="store_true", help="estimate activations with gradient checkpointing")
    mem.add_argument("--budget", help="a memory budget, e.g. 24GiB or 80GB: prints which methods fit")
    mem.add_argument("--world-size", type=int, default=1,
                     help="ranks sharding the model with FSDP2: figures per rank (default 1)")
    mem.add_argument("--json", action="store_true", help="print JSON instead of a table")
    mem.set_defaults(run=_memory)

    prof = commands.add_parser(
        "profile",
        help="measure forward/backward time and FLOPs with each block active alone",
        description="Activate each block alone and measure forward and backward time (median of repeats, min, max) "
        "and FLOPs, beside full backward ('all blocks') and forward only ('no block'); then predict a block-epoch's "
        "backward cost: the paper's coarse (D+1)/(2D), the refined (D+2)/(4D) + head share, the FLOP-based figure "
        "and the measured time ratio. The model is built from its config with random weights.",
    )
    _add_model_arguments(prof)
    prof.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    prof.add_argument("--seq", type=int, default=512, help="sequence length (default 512)")
    prof.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    prof.add_argument("--repeats", type=int, default=5, help="timed runs per block (default 5)")
    prof.add_argument("--warmup", type=int, default=1, help="untimed runs per block first (default 1)")
    prof.add_argument("--checkpointing", action="store_true",
                      help="enable non-reentrant activation checkpointing (backward savings kept)")
    prof.add_argument("--json", metavar="FILE", help="write the profile as JSON (schema: docs/profile.schema.json)")
    prof.add_argument("--csv", metavar="FILE", help="write one row per block as CSV")
    prof.add_argument("--plot", metavar="FILE.png", help="plot backward time and FLOPs by depth")
    prof.add_argument("--tensorboard", metavar="DIR", help="write the profile as TensorBoard scalars")
    prof.set_defaults(run=_profile)

    tune = commands.add_parser(
        "finetune",
        help="fine-tune a causal LM on instruction data with bcd.BAdam and the Trainer (defaults: a demo on CPU)",
        description="Supervised fine-tuning on Alpaca-format instructions (prompt template, prompt tokens masked out "
        "of the labels) with the transformers Trainer and bcd.BAdam. With no flags: a tiny Llama built from a config, "
        "a tokenizer trained on the bundled demo instructions, a few minutes on CPU, no network. Prints a summary: "
        "eval loss before and after, block-epochs, memory by category against the AdamW estimate, where the "
        "TensorBoard logs are.",
    )
    tune.add_argument("--model", help="a local model directory or a hub name (default: a tiny Llama built from a config)")
    tune.add_argument("--dataset", help="a local .json/.jsonl file of Alpaca records or a hub name (default: bundled demo set)")
    tune.add_argument("--output-dir", default="runs/finetune", help="where the model, tokenizer and logs go (default runs/finetune)")
    tune.add_argument("--max-steps", type=int, default=600, help="optimizer steps (default 600)")
    tune.add_argument("--batch-size", type=int, default=8, help="batch size (default 8)")
    tune.add_argument("--max-length", type=int, default=128, help="tokens per example, prompt included (default 128)")
    tune.add_argument("--lr", type=float, default=2e-3, help="peak learning rate, cosine schedule (default 2e-3)")
    tune.add_argument("--switch-every", type=int, default=20, help="K, steps per block (default 20)")
    tune.add_argument("--order", default="random", help="block order: random, ascending, descending, fixed (default random)")
    tune.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    tune.add_argument("--gradient-checkpointing", action="store_true", help="non-reentrant activation checkpointing")
    tune.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard logs")
    tune.set_defaults(run=_finetune)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bcd`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as error:
        Console(stderr=True).print(f"[bold red]error:[/] {error}", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
