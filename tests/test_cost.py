"""One cost model: the buffers bcd allocates are the figures the memory estimate reports."""

from __future__ import annotations

import functools

import pytest
import torch

import bcd
from bcd import cost
from bcd.blocks import entry_numel
from conftest import CASES


def test_the_layout_is_read_from_the_solver_itself():
    adamw = cost.solver_layout(torch.optim.AdamW, {"lr": 0.1})
    amsgrad = cost.solver_layout(torch.optim.AdamW, {"lr": 0.1}, {"amsgrad": True})
    sgd = cost.solver_layout(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9})
    assert (dict(adamw.per_element), set(adamw.whole), adamw.streamed) == (
        {"exp_avg": 4, "exp_avg_sq": 4}, {"step"}, "chunk")
    assert amsgrad.bytes_per_element == 12 and adamw.bytes_per_tensor == 4
    assert (dict(sgd.per_element), sgd.bytes_per_tensor, sgd.streamed) == ({"momentum_buffer": 4}, 0, "tensor")
    assert cost.layout_or_none(torch.optim.LBFGS, {"lr": 0.1}) is None  # its step needs a closure


@pytest.mark.parametrize("amsgrad", [False, True])
def test_buffers_are_planned_once_at_the_size_the_estimate_reports(amsgrad):
    case = CASES["llama"]
    model = case.model(dtype=torch.bfloat16)
    solver = functools.partial(torch.optim.AdamW, amsgrad=amsgrad)
    optimizer = bcd.BlockCoordinateOptimizer(model, lr=1e-3, switch_every=1, solver=solver)
    params = dict(model.named_parameters())
    sizes = [sum(entry_numel(e, params) for e in b.param_names) for b in optimizer.blocks]
    first = None
    for step in range(len(optimizer.blocks)):
        case.loss(model, step).backward()
        optimizer.step()
        optimizer.zero_grad()
        first = first or {key: flat.data_ptr() for key, flat in optimizer.buffers.flat.items()}
    held = {kind: flat.numel() for (kind, _), flat in optimizer.buffers.flat.items()}
    # AMSGrad's third moment is planned too: no buffer grew after its first allocation.
    assert first == {key: flat.data_ptr() for key, flat in optimizer.buffers.flat.items()}
    assert held["moments"] == (3 if amsgrad else 2) * max(sizes) and held["masters"] == max(sizes)
    report = bcd.memory.estimate(model, methods=["badam"], solver_options={"amsgrad": amsgrad}).method("badam")
    largest = optimizer.blocks[optimizer.blocks.index(report.largest_block)]
    assert report.breakdown.master_copies == 4 * held["masters"]
    assert report.breakdown.solver_state == 4 * held["moments"] + 4 * len(largest.param_names)


def test_a_solver_stepped_over_the_whole_block_casts_its_whole_gradient():
    case = CASES["llama"]
    model = case.model(dtype=torch.bfloat16)
    params = dict(model.named_parameters())
    layout = cost.SolverLayout(per_element={"m": 4}, whole={}, streamed="block")
    block = bcd.BAdam(model, lr=1e-3).blocks[1].param_names
    need = cost.block_bytes(block, params, layout)
    total = sum(entry_numel(e, params) for e in block)
    assert need == {("moments", torch.device("cpu")): 4 * total, ("masters", torch.device("cpu")): 4 * total,
                    ("gradient", torch.device("cpu")): 4 * total}
