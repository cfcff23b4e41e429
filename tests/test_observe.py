"""What the optimizer observes at the visits, for an observing ordering (bcd.observe)."""

from __future__ import annotations

import math

import pytest
import torch

import bcd
from bcd.observe import Observations, gradient_norm

from conftest import CASES

K = 3


def test_gradient_norm_is_the_norm_of_all_gradients_together():
    a, b, c = torch.zeros(3, requires_grad=True), torch.zeros(2, 2, requires_grad=True), torch.zeros(4, requires_grad=True)
    a.grad, b.grad = torch.tensor([3.0, 0.0, 0.0]), torch.full((2, 2), 2.0, dtype=torch.float32)
    assert gradient_norm([a, b, c]) == pytest.approx(5.0)  # sqrt(9 + 4 * 4); c has no gradient
    assert gradient_norm([c]) is None


def test_a_visit_records_its_mean_and_a_new_visit_replaces_it():
    observed = Observations.empty(3).add(1.0).add(2.0).add(6.0).close(1)
    assert observed.grad_norm == (None, 3.0, None) and observed.visits == (0, 1, 0) and observed.running_steps == 0
    observed = observed.add(4.0).close(1)
    assert observed.grad_norm == (None, 4.0, None) and observed.visits == (0, 2, 0)
    assert Observations.empty(3).close(2) == Observations.empty(3)  # nothing measured, nothing recorded


def run(order: str, steps: int):
    case = CASES["llama"]
    model = case.model()
    optimizer = bcd.BlockCoordinateOptimizer(model, lr=1e-2, switch_every=K, order=order, order_options={"seed": 1})
    norms = []  # (block, the active block's gradient norm) at every step, computed here independently
    for step in range(steps):
        case.loss(model, step).backward()
        grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
        norms.append((optimizer.active_block_index, torch.cat(grads).norm().item()))
        optimizer.step()
        optimizer.zero_grad()
    return optimizer, norms


def test_an_observing_ordering_gets_each_blocks_mean_gradient_norm_of_its_latest_visit():
    optimizer, norms = run("importance", 4 * K + 1)  # block-epoch 0 (D = 4) and one step more
    observed = optimizer.schedule.observed
    assert observed.visits == (1, 1, 1, 1) and observed.running_steps == 1
    for visit in range(4):
        block = norms[visit * K][0]
        mean = sum(n for _, n in norms[visit * K:(visit + 1) * K]) / K
        assert math.isclose(observed.grad_norm[block], mean, rel_tol=1e-5), (block, observed.grad_norm[block], mean)
    assert math.isclose(observed.running, norms[-1][1], rel_tol=1e-5)


def test_a_non_observing_ordering_measures_nothing():
    optimizer, _ = run("random", 4 * K + 1)
    assert optimizer.schedule.observed == Observations.empty(4)
    assert bcd.layout.unpack(optimizer.state_dict(), optimizer)["schedule"]["observed"]["grad_norm"] == [None] * 4


def test_an_observing_ordering_refuses_a_partitioner_that_regroups():
    with pytest.raises(ValueError, match=r"ordering 'importance' observes .* partitioner 'random-subset' regroups"):
        bcd.BlockCoordinateOptimizer(CASES["llama"].model(), lr=1e-2, order="importance",
                                     partitioner="random-subset", partitioner_options={"num_blocks": 2, "redraw": True})
