"""bcd.BAdam on several processes: FSDP2, DDP or bcd's own data parallelism, in a plain loop.

    torchrun --nproc-per-node 2 examples/distributed_loop.py --mode fsdp2      # CPU: gloo, GPU: nccl
    torchrun --nproc-per-node 2 examples/distributed_loop.py --mode ddp
    torchrun --nproc-per-node 2 examples/distributed_loop.py --mode bcd
    torchrun --nproc-per-node 2 examples/distributed_loop.py --mode accelerate   # accelerate's DDP
    accelerate launch --config_file examples/accelerate-fsdp2.yaml examples/distributed_loop.py --mode accelerate

With ``--mode accelerate`` the optimizer is built first and ``accelerator.prepare`` wraps the
model afterwards (DDP, or FSDP2 with the config file, which accelerate applies on GPUs only);
bcd takes over the wrapped parameters at the first forward.

Each rank trains on its share of every batch; the optimizer state is saved gathered (one block's
worth) so that it resumes on any number of ranks.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import bcd
from bcd.lab.presets import tiny_llama
from bcd import distributed


def main() -> None:
    parser = argparse.ArgumentParser(description="bcd.BAdam with FSDP2, DDP or bcd data parallelism.")
    parser.add_argument("--mode", choices=["fsdp2", "ddp", "bcd", "accelerate"], default="fsdp2",
                        help="parallelism (default fsdp2)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps (default 40)")
    parser.add_argument("--save", default="runs/distributed-optimizer.pt", help="where rank 0 saves the optimizer state")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    accelerator = None
    if args.mode == "accelerate":
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        # DDP must report the frozen blocks as unused; accelerate's default would wait for them.
        accelerator = Accelerator(cpu=not cuda,
                                  kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
        device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
        if world == 1 and os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true":
            # `accelerate launch --cpu --num_processes N` starts one process whatever N is.
            print("note: accelerate started 1 process: with --cpu it ignores --num_processes; for N CPU processes "
                  "use `accelerate launch --multi_gpu --num_processes N` (docs/distributed.md)", file=sys.stderr)
    else:
        dist.init_process_group("nccl" if cuda else "gloo")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)  # the same initial weights on every rank
    model = tiny_llama(hidden=128, layers=4, max_positions=256).to(device=device, dtype=torch.bfloat16)

    # Wrap first, then build the optimizer over what was wrapped (accelerate: the other way round).
    if args.mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        forward = trained = model
    elif args.mode == "ddp":
        forward = trained = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    else:
        forward = trained = model
    optimizer = bcd.BAdam(trained, lr=1e-3, switch_every=5,
                          data_parallel=args.mode == "bcd")
    if accelerator is not None:
        forward, optimizer = accelerator.prepare(model, optimizer)
        trained = forward

    bcd_optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    generator = torch.Generator().manual_seed(1)  # the same batches on every rank; each takes its share
    for step in range(args.steps):
        ids = torch.randint(0, 256, (8, 64), generator=generator)[rank::world].to(device)
        loss = forward(input_ids=ids, labels=ids).loss
        accelerator.backward(loss) if accelerator is not None else loss.backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0 and step % 10 == 0:
            print(f"step {step} loss {loss.item():.3f} block {bcd_optimizer.active_block.name}")

    state = distributed.full_state_dict(bcd_optimizer)  # a collective: every rank calls it
    if rank == 0:
        os.makedirs(os.path.dirname(args.save) or ".", exist_ok=True)
        torch.save(state, args.save)
        print(f"optimizer state saved to {args.save} (loads on any number of ranks)")
    if accelerator is not None:
        accelerator.end_training()
    # accelerate leaves its gloo group to a destructor at exit, which hung 5 runs in 7: end it here.
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
