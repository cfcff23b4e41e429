"""The invariants of DESIGN.md, run over every registered partitioner x ordering x solver.

One table of cases (tiny MLP, Llama, GPT-2, BERT) through shared checks, peft-style.
"""

from __future__ import annotations

import pytest
import torch

import bcd
from bcd import plugins

from conftest import CASES, Case, snapshot

K = 2

SOLVERS = {"adam": {}, "adamw": {"weight_decay": 0.1}, "sgd": {"momentum": 0.9}}
ORDERINGS = {"ascending": {}, "descending": {}, "random": {"seed": 3}, "fixed": {"start_block": 1}}


def partitioner_options(name: str, case: Case, model: torch.nn.Module) -> dict:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return {
        "layer": {},
        "random-subset": {"num_blocks": 3, "seed": 5, "redraw": True},
        "per-module": {"modules": case.per_module},
        "explicit": {"blocks": {"first": names[: len(names) // 2], "second": names[len(names) // 2 :]}},
    }[name]


def test_every_builtin_is_in_the_matrix():
    registered = {(r.kind, r.name) for r in plugins.list_plugins() if r.source.startswith("bcd ")}
    covered = {("partitioner", n) for n in ("layer", "random-subset", "per-module", "explicit")}
    covered |= {("ordering", n) for n in ORDERINGS} | {("solver", n) for n in SOLVERS}
    assert registered == covered


def build(case: Case, partitioner: str, ordering: str, solver: str, dtype=torch.float32):
    model = case.model(dtype=dtype)
    optimizer = bcd.BlockCoordinateOptimizer(
        model,
        lr=1e-2,
        switch_every=K,
        partitioner=partitioner,
        partitioner_options=partitioner_options(partitioner, case, model),
        order=ordering,
        order_options=ORDERINGS[ordering],
        solver=solver,
        solver_options=SOLVERS[solver],
    )
    return model, optimizer


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("ordering", list(ORDERINGS))
@pytest.mark.parametrize("partitioner", ["layer", "random-subset", "per-module", "explicit"])
@pytest.mark.parametrize("case_name", list(CASES))
def test_invariants(case_name: str, partitioner: str, ordering: str, solver: str):
    case = CASES[case_name]
    model, optimizer = build(case, partitioner, ordering, solver)
    params = dict(model.named_parameters())

    # 1. Every trainable parameter is in exactly one block (these partitioners leave none out),
    #    and the partition is deterministic.
    names = optimizer.blocks.param_names
    assert sorted(names) == sorted(params) and len(set(names)) == len(names)
    _, again = build(case, partitioner, ordering, solver)
    assert again.blocks.fingerprint() == optimizer.blocks.fingerprint()

    previous_block, previous_solver = None, None
    for step in range(3 * K * len(optimizer.blocks) if ordering != "fixed" else 3 * K):
        active = set(optimizer.active_block.param_names)
        # Frozen means requires_grad=False and no gradient.
        for name, param in params.items():
            assert param.requires_grad == (name in active), name
        # 3. Solver state exists only for the active block, and none right after a switch (the
        #    solver is built at the visit's first step; D = 1 and "fixed" keep theirs).
        if optimizer.active_block != previous_block:
            assert optimizer.solver is None and optimizer.master_copies is None
        if optimizer.solver is not None:
            assert optimizer.solver is previous_solver
            solver_params = {id(t) for t in optimizer.master_copies.solver_params}
            assert all(id(t) in solver_params for t in optimizer.solver.state)
            assert {id(p) for p in optimizer.master_copies.params} == {id(params[n]) for n in active}
        previous_block = optimizer.active_block

        before = snapshot(model)
        case.loss(model, step).backward()
        for name, param in params.items():
            assert (param.grad is not None) <= (name in active), name
        optimizer.step()
        optimizer.zero_grad()
        previous_solver = optimizer.solver

        # 2. Only the active block changed; inactive parameters are bit-identical.
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed <= active
        assert changed, "the active block did not move"
    assert optimizer.global_step == step + 1


@pytest.mark.parametrize("ordering", list(ORDERINGS))
def test_bf16_only_active_block_changes_and_has_masters(ordering: str):
    case = CASES["llama"]
    model, optimizer = build(case, "layer", ordering, "adamw", dtype=torch.bfloat16)
    for step in range(3 * K):
        active = set(optimizer.active_block.param_names)
        before = snapshot(model)
        case.loss(model, step).backward()
        optimizer.step()
        optimizer.zero_grad()
        masters = optimizer.master_copies.state_dict() if optimizer.solver is not None else None
        if masters is not None:  # None right after a switch
            assert set(masters) == active and all(m.dtype == torch.float32 for m in masters.values())
            params = dict(model.named_parameters())
            assert all(torch.equal(params[n], m.to(torch.bfloat16)) for n, m in masters.items())
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed and changed <= active


def test_one_block_fp32_adamw_matches_torch_adamw(case):
    """4. With D = 1 and fp32, the trajectory is torch.optim.AdamW's (K smaller than the run)."""
    hyper = {"lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-7, "weight_decay": 0.05}
    ours_model, ref_model = case.model(), case.model()
    ours = bcd.BlockCoordinateOptimizer(
        ours_model, switch_every=3, partitioner="explicit", partitioner_options={"blocks": {"all": ["*"]}},
        solver="adamw", solver_options=hyper,
    )
    ref = torch.optim.AdamW(ref_model.parameters(), **hyper)
    for step in range(20):
        for model, optimizer in ((ours_model, ours), (ref_model, ref)):
            case.loss(model, step).backward()
            optimizer.step()
            optimizer.zero_grad()
    for (name, a), (_, b) in zip(ours_model.named_parameters(), ref_model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
