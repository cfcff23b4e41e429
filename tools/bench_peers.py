"""bcd.BAdam against its peers, each through its own published package, side by side in one run.

Methods: AdamW with mixed precision (fp32 weights, bf16 autocast), bcd.BAdam (layer partition,
and the attention/MLP split), the reference ``badam`` package, LoRA (peft), LOMO and AdaLomo
(lomo-optim), GaLore (galore-torch). A missing package is skipped with a note
(``pip install -e ".[bench]"`` installs them). Every method runs in its own process, on the same
Llama-shaped model, data and seed.

    python tools/bench_peers.py                          # step time, memory, loss: tiny and small models
    python tools/bench_peers.py --probe --cap 8GiB       # the largest model each method can train under a cap
    python tools/bench_peers.py --converge --steps 300   # loss against data seen and wall time

Writes ``results.json`` (with machine, versions and command), ``results.md`` and PNG plots to
``--out``. Every method runs ``--rounds`` times, round-robin; a figure is the median over the
rounds of each run's median step, with the min and max step seen; ratios are to AdamW and to the
reference, from the same run. Not a test: nothing here asserts on a timing.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlib import environment, markdown_table, merge_spreads, ms, peak_rss, spread

ROOT = Path(__file__).resolve().parents[1]
SHARED_C4 = ROOT.parent / "shared" / "data" / "c4_300.jsonl"
METHODS = ["adamw", "bcd", "bcd-attn-mlp", "badam", "lora", "lomo", "adalomo", "galore"]
PACKAGES = {"badam": "badam", "lora": "peft", "lomo": "lomo_optim", "adalomo": "lomo_optim", "galore": "galore_torch"}
# Llama shapes: hidden, layers, MLP width. Vocabulary 256 (bytes), so the layers dominate as at scale.
SIZES = {
    "tiny": (128, 8, 352), "small": (256, 8, 704), "base": (512, 12, 1408), "100m": (768, 16, 2048),
    "300m": (1024, 24, 2816), "700m": (1536, 24, 4096), "1.4b": (2048, 28, 5632), "2.4b": (2560, 30, 6912),
}


# ----------------------------------------------------------------------------- worker (one method, one process)


def corpus(kind: str) -> str:
    """``c4``: C4 web text from ../shared when present (else the demo set); ``instructions``: bcd's
    bundled demo instructions in the Alpaca prompt template."""
    if kind == "c4" and SHARED_C4.is_file():
        return " ".join(json.loads(line)["text"] for line in SHARED_C4.read_text().splitlines())
    from bcd.lab.finetune import format_prompt, load_instructions

    return "\n\n".join(format_prompt(e) + e["output"] for e in load_instructions())


def batches(steps: int, batch: int, seq: int, kind: str = "c4"):
    """Byte-level batches of real text, the same for every method."""
    import torch

    text = corpus(kind)
    stream = torch.tensor(list(text.encode()[: 4_000_000]), dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - seq, (batch,), generator=generator)
        yield torch.stack([stream[s : s + seq] for s in starts])


def build_model(size: str, dtype):
    import torch

    from bcd.lab.presets import tiny_llama

    hidden, layers, mlp = SIZES[size]
    heads = max(2, hidden // 128)
    torch.manual_seed(0)
    return tiny_llama(hidden=hidden, layers=layers, intermediate=mlp, heads=heads, kv_heads=heads,
                      max_positions=1024, dtype=dtype)


def worker(method: str, size: str, steps: int, warmup: int, batch: int, seq: int, result: str,
           data: str = "c4", init: str | None = None, save: str | None = None) -> None:
    import torch

    import bcd
    from bcd.lab.memory import measure

    amp = method == "adamw"
    model = build_model(size, torch.float32 if amp else torch.bfloat16)
    if init:  # start from a pretrained checkpoint, as fine-tuning does
        model.load_state_dict({k: v.to(next(model.parameters()).dtype) for k, v in torch.load(init).items()})
    quiet = contextlib.redirect_stdout(io.StringIO())  # the reference prints at every switch
    fused_backward = None
    if method == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    elif method == "bcd":
        optimizer = bcd.BAdam(model, lr=1e-3, switch_every=10, order="ascending")
    elif method == "bcd-attn-mlp":
        optimizer = bcd.BlockCoordinateOptimizer(
            model, lr=1e-3, switch_every=10, partitioner="per-module",
            partitioner_options={"modules": ["LlamaAttention", "LlamaMLP"], "rest": "freeze"},
            solver="adamw", solver_options={"weight_decay": 0.0})
    elif method == "badam":
        from badam import BlockOptimizer

        with quiet:
            optimizer = BlockOptimizer(base_optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0),
                                       named_parameters_list=list(model.named_parameters()), switch_block_every=10,
                                       switch_mode="ascending", verbose=0)
    elif method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    elif method in ("lomo", "adalomo"):
        from lomo_optim import AdaLomo, Lomo

        optimizer = (Lomo(model, lr=1e-3) if method == "lomo" else AdaLomo(model, lr=1e-3))
        fused_backward = optimizer.fused_backward
    elif method == "galore":
        from galore_torch import GaLoreAdamW

        matrices = [p for n, p in model.named_parameters() if p.ndim == 2 and "layers" in n]
        others = [p for n, p in model.named_parameters() if not (p.ndim == 2 and "layers" in n)]
        optimizer = GaLoreAdamW([{"params": others}, {"params": matrices, "rank": 16, "update_proj_gap": 50,
                                                      "scale": 0.25, "proj_type": "std"}], lr=1e-3)
    else:
        raise ValueError(f"Unknown method: {method!r}; accepted: {', '.join(METHODS)}.")

    times = {"forward": [], "backward": [], "update": [], "step": []}
    losses, clock, state_bytes = [], [], 0
    started = time.perf_counter()
    for index, ids in enumerate(batches(warmup + steps, batch, seq, data)):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = model(input_ids=ids, labels=ids).loss
        t1 = time.perf_counter()
        if fused_backward is not None:
            fused_backward(loss, 1e-3)  # LOMO: backward and update in one
            t2 = t3 = time.perf_counter()
        else:
            loss.backward()
            t2 = time.perf_counter()
            with quiet:
                optimizer.step()
            if index == warmup + steps - 1:  # solver state and master copies, mid-visit
                live = measure(model, optimizer)
                state_bytes = live.solver_state + live.master_copies
            optimizer.zero_grad(set_to_none=True)
            t3 = time.perf_counter()
        losses.append(loss.item())
        clock.append(time.perf_counter() - started)
        if index >= warmup:
            for key, value in (("forward", t1 - t0), ("backward", t2 - t1), ("update", t3 - t2), ("step", t3 - t0)):
                times[key].append(value)
    if save:
        torch.save(model.state_dict(), save)
    stats = {k: spread(v) for k, v in times.items()}
    Path(result).write_text(json.dumps({
        "method": method, "size": size, "params": sum(p.numel() for p in model.parameters()),
        "times": stats, "peak_rss": peak_rss(), "optimizer_state_bytes": state_bytes,
        "final_loss": statistics.mean(losses[-5:]), "losses": losses, "clock": clock,
    }))


# ----------------------------------------------------------------------------- parent


def available(method: str) -> bool:
    package = PACKAGES.get(method)
    if package is None:
        return True
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            __import__(package)
        return True
    except ImportError:
        return False


def run_child(method: str, size: str, args, result: Path, cap: int | None = None, extra: tuple = ()) -> dict | None:
    command = [sys.executable, __file__, "--worker", method, "--size", size, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--batch", str(args.batch), "--seq", str(args.seq), "--result", str(result),
               *extra]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while process.poll() is None:
        time.sleep(0.2)
        if cap is not None:
            try:
                rss = int(next(line for line in Path(f"/proc/{process.pid}/status").read_text().splitlines()
                               if line.startswith("VmRSS:")).split()[1]) * 1024
            except (OSError, StopIteration):
                continue
            if rss > cap:  # enforce the cap: past it the method does not fit
                process.kill()
                process.wait()
                return None
    if process.returncode != 0:
        print(f"  {method} on {size} failed: {process.stderr.read().strip().splitlines()[-1:]}")
        return None
    data = json.loads(result.read_text())
    return data if cap is None or data["peak_rss"] <= cap else None


def compare(args, methods: list[str], out: Path) -> dict:
    """Every method on every size, ``--rounds`` times round-robin so that machine noise hits all alike."""
    rows = []
    for size in args.sizes.split(","):
        runs: dict[str, list[dict]] = {m: [] for m in methods}
        for round_index in range(args.rounds):
            for method in methods:
                print(f"{method} on {size}, round {round_index + 1} of {args.rounds} ...", flush=True)
                data = run_child(method, size, args, out / f"{method}-{size}-{round_index}.json")
                if data:
                    runs[method].append(data)
        for method, done in runs.items():
            if not done:
                continue
            merged = dict(done[0])
            merged["times"] = {key: merge_spreads([d["times"][key] for d in done]) for key in done[0]["times"]}
            merged["peak_rss"] = max(d["peak_rss"] for d in done)
            merged["rounds"] = len(done)
            rows.append(merged)
    return {"runs": rows}


def converge(args, methods: list[str], out: Path) -> dict:
    """Pretrain once with AdamW on web text, then fine-tune each method from there on instructions."""
    size = args.sizes.split(",")[0]
    init = out / "pretrained.pt"
    print(f"pretraining {size} with AdamW for {args.pretrain_steps} steps ...", flush=True)
    pretrain = argparse.Namespace(**{**vars(args), "steps": args.pretrain_steps, "warmup": 0})
    if run_child("adamw", size, pretrain, out / "pretrain.json", extra=("--save", str(init))) is None:
        raise SystemExit("pretraining failed")
    rows = []
    for method in methods:
        print(f"fine-tuning {size} with {method} ...", flush=True)
        data = run_child(method, size, args, out / f"converge-{method}.json",
                         extra=("--data", "instructions", "--init", str(init)))
        if data:
            rows.append(data)
    return {"runs": rows}


def probe(args, methods: list[str], out: Path, cap: int) -> dict:
    largest = {}
    for method in methods:
        largest[method] = None
        for size in SIZES:
            print(f"probe {method} on {size} under {args.cap} ...", flush=True)
            data = run_child(method, size, argparse.Namespace(**{**vars(args), "steps": 1, "warmup": 1}),
                             out / f"probe-{method}-{size}.json", cap=cap)
            if data is None:
                break
            largest[method] = {"size": size, "params": data["params"], "peak_rss": data["peak_rss"]}
    return {"probe": {"cap": cap, "largest": largest}}


def markdown(report: dict) -> str:
    lines = [f"Machine: {report['environment']['machine']}, {report['environment']['processor']}, "
             f"{report['environment']['cpus']} CPUs; command: `{report['environment']['command']}`", ""]
    runs = report.get("runs", [])
    for size in dict.fromkeys(r["size"] for r in runs):
        group = [r for r in runs if r["size"] == size]
        base = next((r for r in group if r["method"] == "adamw"), None)
        ref = next((r for r in group if r["method"] == "badam"), None)
        rows = []
        for r in group:
            t = r["times"]
            step = t["step"]["median"]
            cells = [r["method"], ms(t["step"])]
            cells += [f"{1e3 * t[k]['median']:.1f}" for k in ("forward", "backward", "update")]
            cells += [f"{step / other['times']['step']['median']:.2f}x" if other else "-" for other in (base, ref)]
            cells += [f"{r['peak_rss'] / 2**30:.2f} GiB", f"{r['optimizer_state_bytes'] / 1e6:.1f} MB", f"{r['final_loss']:.3f}"]
            rows.append(cells)
        lines += [f"### {size} ({group[0]['params'] / 1e6:.1f}M parameters)", ""]
        lines += markdown_table(("method", "step ms (median [min-max])", "forward", "backward", "update", "step / AdamW",
                                 "step / badam", "peak RSS", "optimizer state", "loss after"), rows)
        lines.append("")
    if "probe" in report:
        cap = report["probe"]["cap"]
        rows = [[method, found["size"], f"{found['params'] / 1e6:.0f}M", f"{found['peak_rss'] / 2**30:.2f} GiB"]
                if found else [method, "none", "-", "-"] for method, found in report["probe"]["largest"].items()]
        lines += [f"### Largest model trained under a {cap / 2**30:.0f} GiB cap (peak RSS)", ""]
        lines += markdown_table(("method", "largest size", "parameters", "peak RSS"), rows)
        lines.append("")
    return "\n".join(lines)


def plots(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report.get("runs", [])
    if not runs:
        return
    if report.get("converge"):
        figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
        for r in runs:
            seen = [(i + 1) * report["batch"] * report["seq"] for i in range(len(r["losses"]))]
            left.plot(seen, r["losses"], label=r["method"])
            right.plot(r["clock"], r["losses"], label=r["method"])
        left.set_xlabel("tokens seen")
        right.set_xlabel("wall time, s")
        for axis in (left, right):
            axis.set_ylabel("training loss")
            axis.legend()
        figure.savefig(out / "convergence.png", dpi=110)
        plt.close(figure)
        return
    sizes = list(dict.fromkeys(r["size"] for r in runs))
    methods = list(dict.fromkeys(r["method"] for r in runs))
    width = 0.8 / len(sizes)
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained")
    for size_index, size in enumerate(sizes):
        by_method = {r["method"]: r for r in runs if r["size"] == size}
        # Bars of one method sit side by side, centred on that method's tick.
        x = [i + (size_index - (len(sizes) - 1) / 2) * width for i, m in enumerate(methods) if m in by_method]
        done = [by_method[m] for m in methods if m in by_method]
        axes[0].bar(x, [1e3 * r["times"]["step"]["median"] for r in done], width=width, label=size)
        axes[1].bar(x, [r["peak_rss"] / 2**30 for r in done], width=width, label=size)
    for axis in axes:
        axis.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
    axes[0].set_ylabel("step time, ms (median)")
    axes[1].set_ylabel("peak RSS, GiB")
    # One legend above both panels, where it covers no bar.
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, title="model", loc="outside upper center", ncols=len(sizes))
    figure.savefig(out / "results.png", dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--sizes", default="tiny,small", help=f"comma-separated model sizes, of {', '.join(SIZES)}")
    parser.add_argument("--steps", type=int, default=30, help="measured steps per method (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps first (default 3)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="runs of every method, round-robin; figures: median of the runs' medians, min, max (default 3)")
    parser.add_argument("--batch", type=int, default=4, help="batch size (default 4)")
    parser.add_argument("--seq", type=int, default=128, help="sequence length (default 128)")
    parser.add_argument("--probe", action="store_true", help="find the largest size each method trains under --cap")
    parser.add_argument("--cap", default="8GiB", help="memory cap for --probe (default 8GiB)")
    parser.add_argument("--converge", action="store_true",
                        help="pretrain with AdamW on web text, then fine-tune with bcd, adamw and lora on instructions: "
                             "loss against tokens and wall time (use --steps 300)")
    parser.add_argument("--pretrain-steps", type=int, default=300, help="AdamW steps before --converge (default 300)")
    parser.add_argument("--out", default="runs/bench", help="output directory (default runs/bench)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--data", default="c4", help=argparse.SUPPRESS)
    parser.add_argument("--init", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.size, args.steps, args.warmup, args.batch, args.seq, args.result,
               args.data, args.init, args.save)
        return

    from bcd.lab.memory import parse_size

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = ["bcd", "adamw", "lora"] if args.converge else args.methods.split(",")
    unknown = [m for m in wanted if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; accepted: {', '.join(METHODS)}")
    import torch

    methods = []
    for method in wanted:
        if method == "adalomo" and not torch.cuda.is_available():
            print("note: adalomo skipped: lomo-optim's AdaLomo asserts CUDA")
        elif available(method):
            methods.append(method)
        else:
            print(f"note: {method} skipped: package '{PACKAGES[method]}' is not installed (pip install -e '.[bench]')")
    report = {"environment": environment(["badam", "peft", "lomo-optim", "galore-torch"]), "batch": args.batch, "seq": args.seq, "converge": args.converge}
    if args.probe:
        report.update(probe(args, methods, out, parse_size(args.cap)))
    elif args.converge:
        report.update(converge(args, methods, out))
    else:
        report.update(compare(args, methods, out))
    (out / "results.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (out / "results.md").write_text(table + "\n")
    plots(report, out)
    print(table)
    print(f"written: {out / 'results.json'}, {out / 'results.md'}, plots in {out}")


if __name__ == "__main__":
    main()
