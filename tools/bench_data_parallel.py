"""Data parallelism for bcd.BAdam: DDP(find_unused_parameters=True) against bcd's block-only all-reduce.

Two ranks (gloo on CPU, nccl on GPUs) spawned here, one bf16 Llama, the same batches; per method
the median step time over whole block-epochs (min and max beside it), the bytes each rank sends
into all-reduce per step and the all-reduce calls per step, counted by wrapping
``torch.distributed.all_reduce`` for bcd and from DDP's buckets (every parameter that required
grad when DDP was built). bcd runs twice: with its buckets (:mod:`bcd.averaging`, the default)
and with one blocking call per tensor (``BUCKET_BYTES = 0``, what it did before). ``--expansion
all`` measures the recipe (``expansion="all"``), whose expanded gradients are averaged too. Not a test.

    python tools/bench_data_parallel.py [--hidden 512 --layers 8] [--expansion all]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import bcd
from bcd import averaging
from bcd.testing import free_port
from benchlib import ms, spread
from bcd.lab.presets import tiny_llama


MODES = ("ddp", "bcd-per-tensor", "bcd")
NAMES = {"ddp": "DDP(find_unused_parameters=True)", "bcd-per-tensor": "bcd data_parallel, one call per tensor",
         "bcd": "bcd data_parallel=True (buckets)"}


def run(rank: int, world: int, port: int, args: argparse.Namespace, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)  # two ranks share this machine's cores
    buckets = averaging.BUCKET_BYTES
    for mode in MODES:
        averaging.BUCKET_BYTES = 0 if mode == "bcd-per-tensor" else buckets
        torch.manual_seed(0)
        model = tiny_llama(hidden=args.hidden, layers=args.layers, kv_heads=4).to(torch.bfloat16)
        total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        if mode == "ddp":
            forward = trained = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        else:
            forward = trained = model
        optimizer = bcd.BAdam(trained, lr=1e-4, switch_every=args.k, order="ascending",
                              data_parallel=mode != "ddp", expansion=args.expansion)
        sent, calls = [0], [0]
        original = dist.all_reduce

        def counting(tensor, *a, **kw):
            sent[0] += tensor.numel() * tensor.element_size()
            calls[0] += 1
            return original(tensor, *a, **kw)

        dist.all_reduce = counting
        generator = torch.Generator().manual_seed(1)
        steps = len(optimizer.blocks) * args.k
        times = []
        for step in range(2 * steps):  # one block-epoch warm-up, one measured
            ids = torch.randint(0, 256, (4, args.seq), generator=generator)[rank::world]
            dist.barrier()
            start = time.perf_counter()
            forward(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step >= steps:
                times.append(time.perf_counter() - start)
            if step == steps - 1:
                sent[0] = calls[0] = 0
        dist.all_reduce = original
        per_step = sent[0] / steps if mode != "ddp" else total_bytes  # DDP reduces whole buckets
        if rank == 0:
            results[mode] = {**spread(times), "per_step": per_step, "calls": calls[0] / steps if mode != "ddp" else None,
                             "total_bytes": total_bytes, "blocks": len(optimizer.blocks)}
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512, help="hidden size (default 512)")
    parser.add_argument("--layers", type=int, default=8, help="layers = D (default 8)")
    parser.add_argument("--k", type=int, default=3, help="K (default 3)")
    parser.add_argument("--seq", type=int, default=128, help="sequence length (default 128)")
    parser.add_argument("--expansion", choices=("all", "after"), default=None,
                        help="BAdam's expansion for every method (default: none, backward stops at the active block)")
    args = parser.parse_args()
    port = free_port()
    results = mp.Manager().dict()
    mp.spawn(run, args=(2, port, args, results), nprocs=2, join=True)
    ddp = results["ddp"]
    print(f"2 ranks, bf16 Llama hidden {args.hidden} x {args.layers} layers ({ddp['total_bytes'] / 1e6:.1f} MB of weights), "
          f"D = {ddp['blocks']}, K = {args.k}, expansion {args.expansion}")
    for mode in MODES:
        r = results[mode]
        calls = "DDP's buckets" if r["calls"] is None else f"{r['calls']:.1f} calls"
        print(f"  {NAMES[mode]:40s} step {ms(r)} ms   all-reduce per step per rank {r['per_step'] / 1e6:7.2f} MB ({calls})")
    for mode in MODES[1:]:
        r = results[mode]
        print(f"  ratios {mode} / DDP: step time {r['median'] / ddp['median']:.2f}x, bytes all-reduced {r['per_step'] / ddp['per_step']:.3f}x")
    print(f"  buckets / per tensor: step time {results['bcd']['median'] / results['bcd-per-tensor']['median']:.2f}x")


if __name__ == "__main__":
    main()
