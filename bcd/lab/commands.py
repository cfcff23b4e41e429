"""What each ``bcd`` command does, once :mod:`bcd.lab.cli` has parsed and checked its flags."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import attrs
from rich.console import Console
from rich.table import Table

from bcd import plugins

#: ``bcd finetune --lean``'s values, as ``bcd.BAdam``'s ``lean``.
LEAN_FLAGS = {"off": False, "on": True, "8bit": "8bit"}


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


def run_memory(args: argparse.Namespace) -> int:
    from bcd.lab import memory
    from bcd.lab.presets import build_model, load_config, parse_dtype

    methods = list(memory.METHODS) if args.method == "all" else [args.method]
    budget = memory.parse_size(args.budget) if args.budget is not None else None
    config = load_config(args.preset, args.config)
    activations = None
    if args.batch is not None or args.seq is not None:
        activations = memory.estimate_activations(config, batch=args.batch or 1, seq=args.seq or 512,
                                                  checkpointing=args.checkpointing)
    model = build_model(config, dtype=parse_dtype(args.dtype))
    options = _options(args.partition_option, "--partition-option") if args.partition_option else None
    report = memory.estimate(
        model, methods=methods, partitioner=args.partition, partitioner_options=options,
        max_block_params=args.max_block_params, solver=args.solver,
        lora_rank=args.lora_rank, lora_targets=args.lora_targets.split(",") if args.lora_targets else None,
        activations=activations,
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
    table = Table(title=f"Memory of {report.model} ({count(report.params)} parameters, {report.dtype}){per_rank}, "
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
            # The paper's formula counts Adam's two moments: shown only when the solver is Adam's.
            paper = (f" Paper's 2M + 16M/D: {size(m.paper_formula)}." if args.solver in ("adam", "adamw")
                     else f" (The paper's 2M + 16M/D assumes Adam; not comparable with --solver {args.solver}.)")
            console.print(
                f"BAdam: D = {len(m.blocks)} blocks; the largest, [bold]{largest.name}[/] ({count(largest.params)} "
                f"parameters, {size(largest.bytes.total)} to train), sets the peak.{paper}", highlight=False)
    if activations:
        console.print(f"Activations (estimate, batch {activations.batch} x seq {activations.seq}, checkpointing "
                      f"{'on' if activations.checkpointing else 'off'}): {size(activations.bytes)}", highlight=False)
    if verdict:
        console.print(verdict, highlight=False)
    return 0


def count(n: int) -> str:
    """A parameter count in the unit that keeps it readable: 7.0B, 218.1M, 45.1K, 96."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def run_plugins(args: argparse.Namespace) -> int:
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


def run_profile(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from bcd.lab import profiler
    from bcd.lab.presets import build_model, load_config, parse_dtype

    device = profiler.check_device(args.device)
    config = load_config(args.preset, args.config)
    model = build_model(config, dtype=parse_dtype(args.dtype), device=device)
    options = _options(args.partition_option, "--partition-option")
    console = Console(width=max(Console().width, 170))
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("profiling", total=None)

        def progress(label: str) -> None:
            bar.update(task, description=f"profiling {label}")
            if not console.is_terminal:  # a bar shows nothing in a log or a pipe: a line per block instead,
                print(f"profiling {label}", flush=True)  # on stdout: stderr holds only a refusal's one line

        result = profiler.profile(
            model, batch=args.batch, seq=args.seq, partitioner=args.partition, partitioner_options=options,
            max_block_params=args.max_block_params,
            repeats=args.repeats, warmup=args.warmup, use_checkpointing=args.checkpointing,
            progress=progress, name=args.preset or args.config,
        )
    from bcd.lab import profile_report

    console.print(profile_report.table(result))
    console.print(profile_report.summary(result), highlight=False)
    warning = profile_report.spread_warning(result)
    if warning:
        console.print(warning, style="yellow", highlight=False)
    if args.json:
        profile_report.write_json(result, args.json)
    if args.csv:
        profile_report.write_csv(result, args.csv)
    if args.plot:
        profile_report.plot(result, args.plot)
    if args.tensorboard:
        profile_report.write_tensorboard(result, args.tensorboard)
    return 0


def run_finetune(args: argparse.Namespace) -> int:
    from bcd.lab.finetune import finetune, perplexity
    from bcd.lab.memory import format_size
    from bcd.lab.presets import parse_dtype

    plugins.lookup("ordering", args.order)  # an unknown name is refused before any data is read
    console = Console(width=max(Console().width, 120))
    console.print(f"bcd finetune: {args.model or 'tiny Llama built from a config'} on "
                  f"{args.dataset or 'the bundled demo instructions'}, {args.max_steps} steps, bcd.BAdam "
                  f"({f'K = {args.switch_every}' if args.switch_every else 'K from the run length'}, {args.order} order, "
                  f"expansion {args.expansion}, lean {args.lean})",
                  highlight=False)
    summary = finetune(
        model_name=args.model, dataset=args.dataset, output_dir=args.output_dir, max_steps=args.max_steps,
        batch_size=args.batch_size, max_length=args.max_length, learning_rate=args.lr,
        switch_every=args.switch_every, order=args.order, seed=args.seed,
        expansion=None if args.expansion == "none" else args.expansion,
        gradient_checkpointing=args.gradient_checkpointing, tensorboard=not args.no_tensorboard,
        dtype=parse_dtype(args.dtype), lean=LEAN_FLAGS[args.lean],
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
    table.add_row("wall time", f"{summary.seconds:.0f} s")
    console.print(table)
    # On a line of its own, unwrapped, to copy whole: the folder holds the training curves and the evaluations.
    console.print(f"TensorBoard logs: tensorboard --logdir {summary.tensorboard_dir}" if summary.tensorboard_dir
                  else "TensorBoard logs: off (--no-tensorboard)", soft_wrap=True, highlight=False)
    return 0
