"""Memory and update time at 7B/8B scale: bcd.BAdam against the reference ``badam``, one process each.

Each method runs in a process of its own (peak RSS is per process), one after the other, on a
Llama-shaped bf16 model built on the meta device and materialised on the CPU (or CUDA with
``--device cuda``) with random weights. K = 1 by default: every step is a switch, so the update
time includes it; ``--switch-every 2`` also shows a visit's later steps, which hold what a visit
allocates at its first step (the 8-bit moments of ``lean8``) through backward. Reported per
method: peak RSS, RSS of the bare model, forward, backward and update (``optimizer.step()``)
time per step, the block whose step set the peak, and beside them what ``bcd memory`` predicts.

    python tools/bench_scale.py --shape small                   # a quick run, seconds
    python tools/bench_scale.py --shape llama-2-7b --steps 12   # ~15 minutes on a 2-core CPU
    python tools/bench_scale.py --shape llama-3-8b --methods bcd --steps 0   # every block once
    python tools/bench_scale.py --shape llama-3-8b --methods recipe,bcd,lora --steps 4   # the recipe's cost
    python tools/bench_scale.py --shape llama-3-8b --methods bcd,lean,lean8 --steps 0   # the lean precisions' saving

Big shapes need most of a 23 GiB machine: run them alone. The reference trains the same
blocks (``include_embedding``/``include_lm_head``) where they fit; at ``llama-3-8b`` its head
block alone (525M parameters, 8.4 GB of fp32 state) does not, so ``--reference-blocks layers``
is the default there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import Stopwatch, current_rss, environment, markdown_table, peak_rss, print_table  # noqa: E402

GIB = 2**30
SHAPES = {"small": None, "llama-2-7b": "llama-2-7b", "llama-3-8b": "llama-3-8b"}


def load_shape(shape: str):
    from bcd.lab.presets import load_config, tiny_llama_config
    from transformers import LlamaConfig

    if shape == "small":
        return LlamaConfig(**tiny_llama_config(vocab_size=32000, hidden=512, layers=8, heads=8, kv_heads=8))
    return load_config(SHAPES[shape])


def materialise(shape: str, device: str) -> torch.nn.Module:
    """The model on ``device`` in bf16 with random weights, never holding an fp32 copy."""
    from bcd.lab.presets import build_model

    config = load_shape(shape)
    model = build_model(config, dtype=torch.bfloat16, device="meta").to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    # Buffers (rotary frequencies) were left uninitialised by to_empty: rebuild them.
    rotary = model.model.rotary_emb
    with torch.device(device):
        model.model.rotary_emb = type(rotary)(config=model.config)
    return model


#: The methods that are bcd, and the lean setting of each.
LEAN = {"bcd": False, "recipe": False, "lean": True, "lean8": "8bit"}


def make_optimizer(method: str, model: torch.nn.Module, reference_blocks: str, switch_every: int = 1):
    """The optimizer of ``method`` (and for LoRA the adapted model), K = ``switch_every`` for the block methods."""
    if method in LEAN:
        import bcd

        # recipe: what docs/user-guide.md says to write for a bf16 LLM on one GPU, the expansion over every other block;
        # lean: no fp32 master copies (lean=True); lean8: and 8-bit moments (lean="8bit").
        return model, bcd.BAdam(model, lr=1e-5, switch_every=switch_every, order="descending",
                                expansion="all" if method == "recipe" else None, lean=LEAN[method])
    if method == "lora":  # peft's LoRA, r = 8 on the attention's q and v projections, fp32 adapters
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0)
    from badam import BlockOptimizer

    everything = reference_blocks == "all"
    return model, BlockOptimizer(base_optimizer=torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0),
                          named_parameters_list=list(model.named_parameters()), switch_block_every=switch_every,
                          switch_mode="descending", include_embedding=everything, include_lm_head=everything,
                          verbose=0)


def worker(args: argparse.Namespace) -> dict:
    """One method's run, in this process."""
    model = materialise(args.shape, args.device)
    bare = current_rss()
    model, optimizer = make_optimizer(args.worker, model, args.reference_blocks, args.switch_every)
    blocks = (len(optimizer.blocks) if args.worker in LEAN
              else len(optimizer.block_prefix_list) if args.worker == "badam" else 1)
    steps = args.steps or blocks * args.switch_every
    generator = torch.Generator().manual_seed(1)
    forward, backward, update = [], [], []
    peaks = []  # (the block trained, the peak RSS so far) after each step: where the peak was set
    clock = Stopwatch(args.device)
    for step in range(steps):
        block = optimizer.active_block.name if args.worker in LEAN else f"step {step}"
        ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=generator).to(args.device)
        clock.lap()
        loss = model(input_ids=ids, labels=ids).loss
        forward.append(clock.lap())
        loss.backward()
        backward.append(clock.lap())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update.append(clock.lap())
        del loss
        peaks.append((block, peak_rss()))
    result = {"method": args.worker, "blocks": blocks, "steps": steps, "peak_rss": peak_rss(), "bare_rss": bare,
              "peak_block": next(name for name, peak in peaks if peak == peaks[-1][1]),
              "forward": statistics.mean(forward), "backward": statistics.mean(backward),
              "update": statistics.mean(update), "update_max": max(update), "update_min": min(update)}
    if args.device == "cuda":
        result.update(cuda_max_allocated=torch.cuda.max_memory_allocated(), cuda_max_reserved=torch.cuda.max_memory_reserved())
    return result


def predicted(shape: str, method: str = "badam") -> dict:
    from bcd.lab import memory
    from bcd.lab.presets import build_model

    estimate = memory.estimate(build_model(load_shape(shape)), methods=[method]).method(method)
    return {"total": estimate.breakdown.total, "weights": estimate.breakdown.weights,
            "blocks": len(estimate.blocks), "largest": estimate.largest_block, "paper": estimate.paper_formula}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="small")
    parser.add_argument("--methods", default="bcd,badam",
                        help="comma-separated: bcd, badam, recipe (bcd with expansion='all'), lean (bcd with lean=True), "
                             "lean8 (bcd with lean='8bit'), "
                             "lora (peft, r = 8 on q/v); "
                             "default bcd,badam")
    parser.add_argument("--steps", type=int, default=0, help="steps per method; 0: one visit per block (default)")
    parser.add_argument("--switch-every", type=int, default=1, help="K, steps per visit (default 1: every step a switch)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reference-blocks", choices=["all", "layers"], default=None,
                        help="what the reference trains: all (embedding and head too) or layers; default all, "
                             "layers at llama-3-8b")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference_blocks is None:
        args.reference_blocks = "layers" if args.shape == "llama-3-8b" else "all"
    if args.worker:
        print(json.dumps(worker(args)))
        return
    results = []
    for method in args.methods.split(","):
        command = [sys.executable, __file__, "--worker", method, *sys.argv[1:]]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{method} failed (exit {done.returncode}):\n{done.stderr[-3000:]}", file=sys.stderr)
            continue
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    estimate = predicted(args.shape)
    header = ["method", "D", "steps", "peak RSS GiB", "bare model GiB", "above model GiB", "forward s", "backward s",
              "update s (mean)", "update s [min-max]", "step s"]
    rows = [[r["method"], str(r["blocks"]), str(r["steps"]), f"{r['peak_rss'] / GIB:.2f}", f"{r['bare_rss'] / GIB:.2f}",
             f"{(r['peak_rss'] - r['bare_rss']) / GIB:.2f}", f"{r['forward']:.2f}", f"{r['backward']:.2f}",
             f"{r['update']:.3f}", f"{r['update_min']:.3f}-{r['update_max']:.3f}",
             f"{r['forward'] + r['backward'] + r['update']:.2f}"] for r in results]
    print_table(f"{args.shape}, bf16, batch {args.batch} x {args.seq}, K = {args.switch_every}, {args.device}", header, rows)
    print(f"bcd memory predicts {estimate['total'] / GIB:.2f} GiB without activations (D = {estimate['blocks']}, "
          f"largest block {estimate['largest']}; the paper's 2M + 16M/D: {estimate['paper'] / GIB:.2f} GiB)")
    for r in results:
        if "cuda_max_allocated" in r:  # the device's own figures beside the estimate
            print(f"{r['method']} on CUDA: max allocated {r['cuda_max_allocated'] / GIB:.2f} GiB, max reserved "
                  f"{r['cuda_max_reserved'] / GIB:.2f} GiB; estimate / allocated "
                  f"{estimate['total'] / r['cuda_max_allocated']:.3f}")
    print("peak set at: " + ", ".join(f"{r['method']} {r['peak_block']}" for r in results))
    by = {r["method"]: r for r in results}
    for method, preset, label in (("lean", "badam-lean", "lean=True"), ("lean8", "badam-lean8", "lean='8bit'")):
        if method in by:
            lean = predicted(args.shape, preset)
            print(f"bcd memory predicts {lean['total'] / GIB:.2f} GiB for {label} without activations; measured "
                  f"{(by[method]['peak_rss']) / GIB:.2f} GiB peak RSS"
                  + (f" ({method} - bcd: {(by[method]['peak_rss'] - by['bcd']['peak_rss']) / GIB:+.2f} GiB)"
                     if "bcd" in by else ""))
    if {"recipe", "lora"} <= set(by):
        step = {m: by[m]["forward"] + by[m]["backward"] + by[m]["update"] for m in ("recipe", "lora")}
        print(f"recipe / LoRA: peak RSS {by['recipe']['peak_rss'] / by['lora']['peak_rss']:.3f}, "
              f"step time {step['recipe'] / step['lora']:.3f}x")
    if {"bcd", "badam"} <= set(by):
        print(f"bcd / reference: peak RSS {by['bcd']['peak_rss'] / by['badam']['peak_rss']:.3f} "
              f"({(by['badam']['peak_rss'] - by['bcd']['peak_rss']) / GIB:+.2f} GiB saved), "
              f"update time {by['bcd']['update'] / by['badam']['update']:.3f}x")
    print("\n".join(markdown_table(header, rows)))
    if args.json:
        args.json.write_text(json.dumps({"environment": environment(["badam"]), "shape": args.shape,
                                         "results": results, "estimate": estimate}, indent=2))


if __name__ == "__main__":
    main()
