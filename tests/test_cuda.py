"""CUDA paths: fused kernels on the device, buffers and masters there, live CUDA memory. Skipped without CUDA.

``python tools/gpu_check.py`` runs these and the 8B memory benchmark on a GPU; CI has none.
"""

from __future__ import annotations

import pytest
import torch

import bcd
from bcd.lab import memory

from conftest import tiny_llama

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: python tools/gpu_check.py on a GPU")]


def batches(steps: int, device: str = "cuda"):
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, 64, (2, 12), generator=generator).to(device) for _ in range(steps)]


def test_a_bf16_model_trains_with_fused_kernels_and_keeps_its_fp32_state_on_the_device():
    torch.manual_seed(0)
    model = tiny_llama(layers=2).to("cuda", torch.bfloat16)
    optimizer = bcd.BAdam(model, lr=1e-2, switch_every=2)
    assert optimizer.composition.solver_options.get("fused") is True
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for ids in batches(2 * len(optimizer.blocks)):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        assert all(m.device.type == "cuda" and m.dtype == torch.float32 for m in optimizer.master_copies.state_dict().values())
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert {device.type for _, device in optimizer.buffers.flat} == {"cuda"}


def test_one_block_in_fp32_is_torchs_fused_adamw_on_cuda():
    torch.manual_seed(0)
    model = tiny_llama(layers=2).cuda()
    torch.manual_seed(0)
    reference = tiny_llama(layers=2).cuda()
    names = [n for n, _ in model.named_parameters()]
    optimizer = bcd.BlockCoordinateOptimizer(model, lr=1e-2, partitioner="explicit", partitioner_options={"blocks": [names]})
    adamw = torch.optim.AdamW(reference.parameters(), lr=1e-2, fused=True)
    for ids in batches(3):
        for m, o in ((model, optimizer), (reference, adamw)):
            m(input_ids=ids, labels=ids).loss.backward()
            o.step()
            o.zero_grad()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))


def test_live_cuda_memory_is_measured_and_a_cuda_state_dict_resumes_on_the_cpu():
    torch.manual_seed(0)
    model = tiny_llama(layers=2).to("cuda", torch.bfloat16)
    optimizer = bcd.BAdam(model, lr=1e-2, switch_every=3)
    torch.cuda.reset_peak_memory_stats()
    for ids in batches(4):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    live = memory.measure(model, optimizer)
    assert live.cuda_peak is not None and live.cuda_peak >= live.master_copies + live.solver_state > 0
    saved, weights = optimizer.state_dict(), {k: v.cpu() for k, v in model.state_dict().items()}
    cpu_model = tiny_llama(layers=2).to(torch.bfloat16)
    cpu_model.load_state_dict(weights)
    cpu_optimizer = bcd.BAdam(cpu_model, lr=1e-2, switch_every=3)
    cpu_optimizer.load_state_dict(saved)  # tensors moved to the parameters' device by the load
    ids = batches(1, "cpu")[0]
    cpu_model(input_ids=ids, labels=ids).loss.backward()
    cpu_optimizer.step()
