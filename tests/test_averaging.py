"""bcd.averaging on 2 gloo ranks: bucketed means equal one call per tensor, and the launches are fewer."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.checkpoint import checkpoint

from bcd import averaging
from bcd.testing import free_port


class Mixed(nn.Module):
    """bf16 and fp32 tensors (buckets hold one dtype), one of them unused by the forward; the second
    layer under a reentrant checkpoint, whose backward is a backward of its own inside the outer one."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(6, 6).to(torch.bfloat16)
        self.second = nn.Linear(6, 6).to(torch.bfloat16)
        self.scale = nn.Parameter(torch.ones(6))
        self.unused = nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = checkpoint(self.second, self.first(x.bfloat16()), use_reentrant=True)
        return (hidden.float() * self.scale).square().mean()


def run(rank: int, bucket_bytes: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """Two micro-batches on this rank; the averaged gradients, this rank's own, and the all-reduce launches."""
    torch.manual_seed(0)
    model = Mixed()
    averaging.BUCKET_BYTES = bucket_bytes
    launches = [0]
    original = dist.all_reduce

    def counting(*args, **kwargs):
        launches[0] += 1
        return original(*args, **kwargs)

    dist.all_reduce = counting
    try:
        handles = averaging.average_gradients(model.parameters())
        generator = torch.Generator().manual_seed(1 + rank)  # each rank its own data
        # A .grad() call reaches the hooks but accumulates nothing: the next backward must not stop early.
        torch.autograd.grad(model(torch.randn(4, 6, generator=torch.Generator().manual_seed(9))), [model.scale])
        for _ in range(2):  # accumulation: each backward averages what .grad holds
            model(torch.randn(4, 6, generator=generator)).backward()
        for handle in handles:
            handle.remove()
    finally:
        dist.all_reduce = original
    averaged = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    generator = torch.Generator().manual_seed(1 + rank)
    for _ in range(2):  # the same without averaging: this rank's own sum
        model(torch.randn(4, 6, generator=generator)).backward()
    own = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return averaged, own, launches[0]


def worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {cap: run(rank, cap) for cap in (0, 100, averaging.BUCKET_BYTES)}
        own = results[0][1]
        gathered = [None] * world
        dist.all_gather_object(gathered, own)
        if rank == 0:
            torch.save({"results": results, "owns": gathered}, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as tests/test_distributed.py: skip C++ static destructors that rarely abort


def test_buckets_average_like_one_call_per_tensor_with_fewer_launches(tmp_path):
    out = str(tmp_path / "averaging.pt")
    mp.spawn(worker, args=(2, free_port(), out), nprocs=2, join=True)
    saved = torch.load(out, weights_only=False)
    results, owns = saved["results"], saved["owns"]
    per_tensor, small, default = results[0], results[100], results[averaging.BUCKET_BYTES]
    assert set(per_tensor[0]) == {"first.weight", "first.bias", "second.weight", "second.bias", "scale"}
    for name, grad in per_tensor[0].items():
        # The ranks' own sums are summed once per micro-batch either way: the same additions, bit for bit.
        assert torch.equal(small[0][name], grad), name
        assert torch.equal(default[0][name], grad), name
        # And they are the mean of the ranks' own sums, up to the few bf16 roundings (relative
        # spacing 2^-7) each path takes on the way, where a sum near zero may cancel: hence the
        # tolerance relative to the largest entry.
        mean = (owns[0][name].float() + owns[1][name].float()) / 2
        torch.testing.assert_close(grad.float(), mean, rtol=2**-6, atol=2**-6 * mean.abs().max().item())
    assert not torch.equal(owns[0]["scale"], owns[1]["scale"])  # the ranks did hold different gradients
    # 5 tensors with a gradient, 2 backward passes: 10 calls one by one. Buckets, laid in reverse:
    # 100 bytes give [unused, scale] (fp32), [second.bias, second.weight, first.bias] (96 bytes of
    # bf16), [first.weight]: 3 per backward; the default cap, one per dtype: 2 per backward.
    assert (per_tensor[2], small[2], default[2]) == (10, 6, 4)
