"""The ``bcd`` command line."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence


NUMBER = {int: "an integer", float: "a finite number"}
#: The largest count any flag takes: past it a figure overflows or a run would never end.
LARGEST = 10**9


class _Parser(argparse.ArgumentParser):
    """An argument parser whose refusals are one line on stderr and exit status 2."""

    def error(self, message: str) -> None:
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def _at_least(kind: type, minimum: float, strict: bool = False, maximum: float = LARGEST):
    """An argparse type: ``kind`` parsed from text, refused below ``minimum`` (or at it, when ``strict``) or above ``maximum``."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if (value is None or not math.isfinite(value) or value < minimum or (strict and value == minimum)
                or value > maximum):
            raise argparse.ArgumentTypeError(
                f"{text!r}; accepted: {NUMBER[kind]} {'>' if strict else '>='} {minimum} and <= {maximum:g}")
        return value

    parse.__name__ = NUMBER[kind]
    return parse


def _output_file(text: str) -> str:
    """An argparse type: a file path whose folder exists and is writable (checked before any work)."""
    folder = os.path.dirname(os.path.abspath(text))
    if os.path.isdir(text) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text!r}: not a writable file path (its folder must exist and be writable)")
    return text


def _output_dir(text: str) -> str:
    """An argparse type: a folder that exists and is writable, or can be created."""
    path = os.path.abspath(text)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path) or not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text!r}: not a writable folder ({path!r} is not a writable folder)")
    return text


def _existing(text: str) -> str:
    """An argparse type: a path that exists."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text!r}: no such file or folder")
    return text


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    from bcd.lab.presets import DTYPES, PRESETS

    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=list(PRESETS), metavar="NAME", help=f"a named model shape: {', '.join(PRESETS)}")
    source.add_argument("--config", type=_existing, help="a config.json path or a local model directory")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES), help=f"training dtype of the model: {', '.join(DTYPES)} (default bf16)")
    parser.add_argument("--partition", default="layer", help="BAdam's partitioner (default layer)")
    parser.add_argument("--partition-option", action="append", metavar="KEY=VALUE",
                        help="an option for the partitioner, repeatable; JSON values. The layer partitioner's "
                             "defaults are bcd.BAdam's: every parameter (include_embedding=true include_head=true)")
    parser.add_argument("--max-block-params", type=_at_least(int, 1, maximum=2**50), metavar="N",
                        help="split blocks larger than N elements by rows, around any partitioner (default: the "
                             "partitioner's own limit; layer: no block larger than a layer)")


#: What the command line needs beyond the library: the ``lab`` extra.
LAB = ("rich", "transformers", "datasets", "accelerate", "matplotlib", "tensorboard", "tokenizers")


def build_parser() -> argparse.ArgumentParser:
    from bcd.lab import commands

    parser = _Parser(
        prog="bcd",
        description="bcd: block-coordinate optimization for PyTorch (BAdam and friends).",
    )
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subcommands.required = True
    listing = subcommands.add_parser(
        "plugins",
        help="list every registered partitioner, ordering and solver with the package it came from",
        description="List every registered plugin: its kind, the name to use it by, the package that "
        "registered it (distribution and version, or '(in-process)') and its factory.",
    )
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(run=commands.run_plugins)

    mem = subcommands.add_parser(
        "memory",
        help="estimate memory by category for Adam, BAdam, LoRA and LOMO, without weights",
        description="Estimate training memory by category (weights, gradients, solver state, master copies) for "
        "mixed-precision Adam, BAdam with the actual partition, LoRA and LOMO. The model is built from its config on "
        "the meta device: nothing is allocated or downloaded. GB are 10^9 bytes.",
    )
    _add_model_arguments(mem)
    mem.add_argument("--method", default="all", choices=["adam", "badam", "badam-lean", "badam-lean8", "lora", "lomo", "all"],
                     help="adam, badam, badam-lean (lean=True: no fp32 masters), badam-lean8 (lean='8bit': and 8-bit "
                          "moments), lora, lomo or all (default all)")
    mem.add_argument("--solver", default="adamw", help="inner solver of BAdam, and Adam's/LoRA's optimizer (default adamw)")
    mem.add_argument("--lora-rank", type=_at_least(int, 1), default=8, help="LoRA rank (default 8)")
    mem.add_argument("--lora-targets", help="LoRA target layers, comma-separated (default: the model's attention "
                     "query and value projections: q_proj,v_proj, c_attn, query,value or q,v)")
    mem.add_argument("--batch", type=_at_least(int, 1), help="batch size, for the activation estimate")
    mem.add_argument("--seq", type=_at_least(int, 1), help="sequence length, for the activation estimate")
    mem.add_argument("--checkpointing", action="store_true", help="estimate activations with gradient checkpointing")
    mem.add_argument("--budget", help="a memory budget with its unit, e.g. 24GiB or 80GB (a bare number is refused): prints which methods fit")
    mem.add_argument("--world-size", type=_at_least(int, 1), default=1,
                     help="ranks sharding the model with FSDP2: figures per rank (default 1)")
    mem.add_argument("--json", action="store_true", help="print JSON instead of a table")
    mem.set_defaults(run=commands.run_memory)

    prof = subcommands.add_parser(
        "profile",
        help="measure forward/backward time and FLOPs with each block active alone",
        description="Activate each block alone and measure forward and backward time (median of repeats, min, max) "
        "and FLOPs, beside full backward ('all blocks') and forward only ('no block'); then predict a block-epoch's "
        "backward cost: the paper's coarse (D+1)/(2D), the refined (D+2)/(4D) + head share, the FLOP-based figure "
        "and the measured time ratio. The model is built from its config with random weights.",
    )
    _add_model_arguments(prof)
    prof.add_argument("--batch", type=_at_least(int, 1), default=8, help="batch size (default 8)")
    prof.add_argument("--seq", type=_at_least(int, 1), default=512, help="sequence length (default 512)")
    prof.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    prof.add_argument("--repeats", type=_at_least(int, 1), default=5, help="timed runs per block (default 5)")
    prof.add_argument("--warmup", type=_at_least(int, 0), default=1, help="untimed runs per block first (default 1)")
    prof.add_argument("--checkpointing", action="store_true",
                      help="enable non-reentrant activation checkpointing (backward savings kept)")
    prof.add_argument("--json", metavar="FILE", type=_output_file, help="write the profile as JSON (schema: docs/profile.schema.json)")
    prof.add_argument("--csv", metavar="FILE", type=_output_file, help="write one row per block as CSV")
    prof.add_argument("--plot", metavar="FILE.png", type=_output_file, help="plot backward time and FLOPs by depth")
    prof.add_argument("--tensorboard", metavar="DIR", type=_output_dir, help="write the profile as TensorBoard scalars")
    prof.set_defaults(run=commands.run_profile)

    tune = subcommands.add_parser(
        "finetune",
        help="fine-tune a causal LM on instruction data with bcd.BAdam and the Trainer (defaults: a demo on CPU)",
        description="Supervised fine-tuning on Alpaca-format instructions (prompt template, prompt tokens masked out "
        "of the labels) with the transformers Trainer and bcd.BAdam. With no flags: a tiny Llama built from a config, "
        "a tokenizer trained on the bundled demo instructions, 30 s to 5 min on a 2-core CPU, no network. Prints a summary: "
        "eval loss before and after, block-epochs, memory by category against the AdamW estimate, where the "
        "TensorBoard logs are.",
    )
    tune.add_argument("--model", help="a local model directory or a hub name (default: a tiny Llama built from a config)")
    tune.add_argument("--dataset", help="a local .json/.jsonl file of Alpaca records or a hub name (default: bundled demo set)")
    tune.add_argument("--output-dir", default="runs/finetune", type=_output_dir, help="where the model, tokenizer and logs go (default runs/finetune)")
    tune.add_argument("--max-steps", type=_at_least(int, 1), default=600, help="optimizer steps (default 600)")
    tune.add_argument("--batch-size", type=_at_least(int, 1), default=8, help="batch size (default 8)")
    tune.add_argument("--max-length", type=_at_least(int, 8), default=128, help="tokens per example, prompt included (default 128)")
    tune.add_argument("--lr", type=_at_least(float, 0.0, strict=True), default=2e-3, help="peak learning rate, cosine schedule (default 2e-3)")
    tune.add_argument("--switch-every", type=_at_least(int, 1),
                      help="K, steps per block (default: from --max-steps, three block-epochs over the run)")
    tune.add_argument("--expansion", choices=["all", "after", "none"], default="all",
                      help="the landscape expansion's reach: all (default: every block but the active one takes a "
                           "sign step each step), after (the blocks after it) or none (backward stops at the active block)")
    tune.add_argument("--order", default="random",
                      help="block order: random, importance, ascending, descending, fixed (default random)")
    tune.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    tune.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                      help="the model's dtype while training: bf16 (default; fp32 masters for the active block only), "
                           "fp16 or fp32")
    tune.add_argument("--lean", default="off", choices=list(commands.LEAN_FLAGS),
                      help="the active block's precision on a bf16/fp16 model: off (default: fp32 master copies and "
                           "moments), on (no master copies, stochastically rounded steps) or 8bit (and 8-bit moments, "
                           "needs bitsandbytes: pip install 'bcd[lowbit]')")
    tune.add_argument("--gradient-checkpointing", action="store_true", help="non-reentrant activation checkpointing")
    tune.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard logs")
    tune.set_defaults(run=commands.run_finetune)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bcd`` console script.

    Returns:
        0, or 2 after one line on stderr for a refused flag, file or value (never a traceback for
        those; bugs still show theirs).
    """
    try:
        args = build_parser().parse_args(argv)
    except ModuleNotFoundError as error:
        if error.name not in LAB:
            raise
        sys.stderr.write(f"bcd: error: the command line needs the lab extra ({error.name} is not installed); "
                         "accepted: pip install 'bcd[lab]'\n")
        return 2
    except SystemExit as exit:  # --help (0) or a refused flag (2, its line already written)
        return exit.code if isinstance(exit.code, int) else 2
    try:
        return args.run(args)
    except BrokenPipeError:  # `bcd plugins --json | head`: the reader has what it wanted; end quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's final flush finds no closed pipe
        return 141  # 128 + SIGPIPE, as a program the pipe closed on
    except (ValueError, OSError) as error:
        message = " ".join(str(error).split())  # one line, whatever the message held
        sys.stderr.write(f"bcd {args.command}: error: {message}\n")
        return 2
    except (MemoryError, RuntimeError) as error:  # torch's allocators raise RuntimeError (OutOfMemoryError on CUDA)
        if not isinstance(error, MemoryError) and not any(t in str(error) for t in ("can't allocate memory", "out of memory")):
            raise
        sys.stderr.write(f"bcd {args.command}: error: out of memory ({' '.join(str(error).split())[:200]}); "
                         "accepted: sizes this machine can hold: a smaller --batch, --seq or model\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
