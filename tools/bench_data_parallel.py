"""Data parallelism for bcd.BAdam: DDP(find_unused_parameters=True) against bcd's block-only all-reduce.

Two ranks (gloo on CPU, nccl on GPUs) spawned here, one bf16 Llama, the same batches; per method
the median step time over whole block-epochs (min and max beside it) and the bytes each rank
sends into all-reduce per step, counted by wrapping ``torch.distributed.all_reduce`` for bcd and
from DDP's buckets (every parameter that required grad when DDP was built). Not a test.

    python tools/bench_data_parallel.py [--hidden 512 --layers 8]
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
from bcd.testing import free_port
from benchlib import ms, spread
from bcd.lab.presets import tiny_llama


def run(rank: int, world: int, port: int, args: argparse.Namespace, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)  # two ranks share this machine's cores
    for mode in ("ddp", "bcd"):
        torch.manual_seed(0)
        model = tiny_llama(hidden=args.hidden, layers=args.layers, kv_heads=4).to(torch.bfloat16)
        total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        if mode == "ddp":
            forward = trained = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        else:
            forward = trained = model
        optimizer = bcd.BAdam(trained, lr=1e-4, switch_every=args.k, order="ascending", data_parallel=mode == "bcd")
        sent = [0]
        original = dist.all_reduce

        def counting(tensor, *a, **kw):
            sent[0] += tensor.numel() * tensor.element_size()
            return original(tensor, *a, **kw)

        dist.all_reduce = counting
        generator = torch.Generator().manual_seed(1)
        steps = args.layers * args.k
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
                sent[0] = 0
        dist.all_reduce = original
        per_step = sent[0] / steps if mode == "bcd" else total_bytes  # DDP reduces whole buckets
        if rank == 0:
            results[mode] = {**spread(times), "per_step": per_step, "total_bytes": total_bytes}
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512, help="hidden size (default 512)")
    parser.add_argument("--layers", type=int, default=8, help="layers = D (default 8)")
    parser.add_argument("--k", type=int, default=3, help="K (default 3)")
    parser.add_argument("--seq", type=int, default=128, help="sequence length (default 128)")
    args = parser.parse_args()
    port = free_port()
    results = mp.Manager().dict()
    mp.spawn(run, args=(2, port, args, results), nprocs=2, join=True)
    ddp, native = results["ddp"], results["bcd"]
    print(f"2 ranks, bf16 Llama hidden {args.hidden} x {args.layers} layers ({ddp['total_bytes'] / 1e6:.1f} MB of weights), K = {args.k}")
    for name, r in (("DDP(find_unused_parameters=True)", ddp), ("bcd data_parallel=True", native)):
        print(f"  {name:34s} step {ms(r)} ms   all-reduce per step per rank {r['per_step'] / 1e6:7.2f} MB")
    print(f"  ratios bcd / DDP: step time {native['median'] / ddp['median']:.2f}x, bytes all-reduced {native['per_step'] / ddp['per_step']:.3f}x")


if __name__ == "__main__":
    main()
