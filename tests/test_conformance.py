"""The invariants of docs/design.md, run over every registered partitioner x ordering x solver.

One table of cases (tiny MLP, Llama, GPT-2, BERT) through the checks of :mod:`bcd.testing`, the
same functions a plugin author runs on their own plugin.
"""

from __future__ import annotations

import pytest
import torch

import bcd
from bcd.blocks import parse_entry
from bcd.observe import observes
from bcd import plugins, testing

from conftest import CASES, Case, snapshot

K = 2

SOLVERS = {"adam": {}, "adamw": {"weight_decay": 0.1}, "sgd": {"momentum": 0.9}}
ORDERINGS = {"ascending": {}, "descending": {}, "random": {"seed": 3}, "fixed": {"start_block": 1},
             "importance": {"seed": 3}}


# Options for the registered plugins that need some; the rest are built with none. Driven by the
# registry (third-party plugins are kept out by BCD_LOAD_PLUGINS in conftest.py).
PARTITIONER_OPTIONS = {
    "random-subset": lambda case, names: {"num_blocks": 3, "seed": 5, "redraw": True},
    "per-module": lambda case, names: {"modules": case.per_module},
    "explicit": lambda case, names: {"blocks": {"first": names[: len(names) // 2], "second": names[len(names) // 2:]}},
}
PARTITIONERS = sorted(plugins.registry()["partitioner"])
ORDERING_NAMES = sorted(plugins.registry()["ordering"])
SOLVER_NAMES = sorted(plugins.registry()["solver"])


def partitioner_options(name: str, case: Case, model: torch.nn.Module) -> dict:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return PARTITIONER_OPTIONS[name](case, names) if name in PARTITIONER_OPTIONS else {}


def test_the_matrix_is_every_registered_plugin():
    assert set(ORDERINGS) == set(ORDERING_NAMES) and set(SOLVERS) == set(SOLVER_NAMES)
    assert {"layer", "random-subset", "per-module", "explicit"} <= set(PARTITIONERS)


def build(case: Case, partitioner: str, ordering: str, solver: str, dtype=torch.float32):
    model = case.model(dtype=dtype)
    optimizer = bcd.BlockCoordinateOptimizer(
        model,
        lr=1e-2,
        switch_every=K,
        partitioner=partitioner,
        partitioner_options=partitioner_options(partitioner, case, model),
        order=ordering,
        order_options=ORDERINGS.get(ordering, {}),
        solver=solver,
        solver_options=SOLVERS.get(solver, {}),
    )
    return model, optimizer


@pytest.mark.parametrize("partitioner", PARTITIONERS)
@pytest.mark.parametrize("case_name", list(CASES))
def test_every_partitioner_honours_its_contract(case_name: str, partitioner: str):
    model = CASES[case_name].model()
    partitions = testing.check_partitioner(
        plugins.create("partitioner", partitioner, partitioner_options(partitioner, CASES[case_name], model)), model)
    # These partitioners leave nothing out: every trainable parameter is in exactly one block.
    assert sorted(partitions[0].tensor_names) == sorted(n for n, _ in model.named_parameters())


@pytest.mark.parametrize("ordering", ORDERING_NAMES)
def test_every_ordering_honours_its_contract(ordering: str):
    created = plugins.create("ordering", ordering, ORDERINGS.get(ordering, {}))
    orders = testing.check_ordering(created, num_blocks=5)
    if observes(created):  # D draws a block-epoch; the first visits every block, to observe it
        assert sorted(orders[0]) == list(range(5)) and all(len(o) == 5 for o in orders)
    elif ordering != "fixed":
        assert all(sorted(o) == list(range(5)) for o in orders)  # a block-epoch visits every block once


@pytest.mark.parametrize("solver", SOLVER_NAMES)
@pytest.mark.parametrize("ordering", ORDERING_NAMES)
@pytest.mark.parametrize("partitioner", PARTITIONERS)
@pytest.mark.parametrize("case_name", list(CASES))
def test_invariants(case_name: str, partitioner: str, ordering: str, solver: str):
    case = CASES[case_name]
    if observes(plugins.create("ordering", ordering, ORDERINGS[ordering])) and plugins.create(
            "partitioner", partitioner, partitioner_options(partitioner, case, case.model())).dynamic:
        with pytest.raises(ValueError, match="observing ordering with a static partitioner"):
            build(case, partitioner, ordering, solver)
        return
    model, optimizer = build(case, partitioner, ordering, solver)
    steps = 3 * K * len(optimizer.blocks) if ordering != "fixed" else 3 * K
    testing.check_invariants(model, optimizer, case.loss, steps)
    assert optimizer.global_step == steps


@pytest.mark.parametrize("ordering", list(ORDERINGS))
def test_bf16_only_active_block_changes_and_has_masters(ordering: str):
    case = CASES["llama"]
    model, optimizer = build(case, "layer", ordering, "adamw", dtype=torch.bfloat16)
    for step in range(3 * K):
        entries = set(optimizer.active_block.param_names)
        active = set(optimizer.active_block.tensor_names)
        before = snapshot(model)
        case.loss(model, step).backward()
        optimizer.step()
        optimizer.zero_grad()
        masters = optimizer.master_copies.state_dict() if optimizer.solver is not None else None
        if masters is not None:  # None right after a switch
            assert set(masters) == entries and all(m.dtype == torch.float32 for m in masters.values())
            params = dict(model.named_parameters())
            for entry, master in masters.items():
                name, rows = parse_entry(entry)
                rounded = params[name] if rows is None else params[name][rows[0]:rows[1]]
                assert torch.equal(rounded, master.to(torch.bfloat16))
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed and changed <= active


@pytest.mark.parametrize("fused", [None, False], ids=["default-fused", "user-single-tensor"])
def test_one_block_fp32_adamw_matches_torch_adamw(case, fused):
    """4. With D = 1 and fp32, the trajectory is torch.optim.AdamW's, bit for bit (K smaller than the run).

    bcd runs torch's fused AdamW by default (``fused=None`` here); a user's ``fused=False`` wins.
    """
    hyper = {"lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-7, "weight_decay": 0.05}
    ours_model, ref_model = case.model(), case.model()
    ours = bcd.BlockCoordinateOptimizer(
        ours_model, switch_every=3, partitioner="explicit", partitioner_options={"blocks": {"all": ["*"]}},
        solver="adamw", solver_options={**hyper, **({} if fused is None else {"fused": fused})},
    )
    ref = torch.optim.AdamW(ref_model.parameters(), **hyper, fused=fused is None)
    for step in range(20):
        for model, optimizer in ((ours_model, ours), (ref_model, ref)):
            case.loss(model, step).backward()
            optimizer.step()
            optimizer.zero_grad()
    assert ours.solver.defaults["fused"] is (fused is None)
    for (name, a), (_, b) in zip(ours_model.named_parameters(), ref_model.named_parameters()):
        assert torch.equal(a, b), name
