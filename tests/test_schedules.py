"""switch_warmup: the rate climbs over the first steps of every visit, and resume stays exact."""

from __future__ import annotations

import math

import pytest
import torch

import bcd

from conftest import CASES, MLP


def rates(model, optimizer, scheduler, steps: int) -> list[float]:
    """The rate at each of ``steps`` training steps, the scheduler stepped after each."""
    seen = []
    for step in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        CASES["mlp"].loss(model, step).backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return seen


def test_rate_climbs_over_each_visit_and_follows_a_base_schedule():
    model = MLP()
    optimizer = bcd.BlockCoordinateOptimizer(model, lr=1.0, switch_every=4, solver="sgd")
    scheduler = bcd.switch_warmup(optimizer, steps=2, base=lambda step: 0.5 ** step)
    seen = rates(model, optimizer, scheduler, 8)
    expected = [0.5 ** n * min(1.0, (n % 4 + 1) / 2) for n in range(8)]
    assert all(math.isclose(a, b) for a, b in zip(seen, expected)), seen


@pytest.mark.parametrize("order, switch_every", [("fixed", 2), ("ascending", 3)])
def test_a_continued_visit_warms_up_once(order, switch_every):
    """The fixed order (or D = 1) continues one visit across block-epochs with Adam's state: no second warm-up."""
    model = MLP()
    blocks = {} if order == "fixed" else {"partitioner": "explicit",
                                          "partitioner_options": {"blocks": [[n for n, _ in model.named_parameters()]]}}
    optimizer = bcd.BlockCoordinateOptimizer(model, lr=1.0, switch_every=switch_every, order=order, solver="sgd", **blocks)
    scheduler = bcd.switch_warmup(optimizer, steps=4)
    seen = rates(model, optimizer, scheduler, 8)
    assert seen == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0]


def test_resume_with_the_warmup_is_exact():
    def make():
        torch.manual_seed(0)
        model = MLP()
        optimizer = bcd.BlockCoordinateOptimizer(model, lr=0.05, switch_every=3, order="random")
        return model, optimizer, bcd.switch_warmup(optimizer, steps=3)

    def train(model, optimizer, scheduler, steps, start):
        for step in range(start, start + steps):
            CASES["mlp"].loss(model, step).backward()
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()

    model, optimizer, scheduler = make()
    train(model, optimizer, scheduler, 10, 0)
    reference = [p.detach().clone() for p in model.parameters()]
    model, optimizer, scheduler = make()
    train(model, optimizer, scheduler, 4, 0)  # mid-visit
    saved = (model.state_dict(), optimizer.state_dict(), scheduler.state_dict())
    model, optimizer, scheduler = make()
    model.load_state_dict(saved[0])
    optimizer.load_state_dict(saved[1])
    scheduler.load_state_dict(saved[2])
    train(model, optimizer, scheduler, 6, 4)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match=r"Invalid optimizer: SGD"):
        bcd.switch_warmup(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), steps=2)
    with pytest.raises(ValueError, match=r"Invalid steps: 0"):
        bcd.switch_warmup(bcd.BlockCoordinateOptimizer(MLP(), lr=0.1), steps=0)
