"""bcd-halves' own tests: bcd's conformance checks (bcd.testing) run on the ``halves`` partitioner."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bcd
from bcd import testing
from bcd_halves import Halves


def stack(depth: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(4, 4) for _ in range(depth)])


def loss(model: nn.Module, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(step)
    return model(torch.randn(8, 4, generator=generator)).square().mean()


def test_halves_honours_the_partitioner_contract():
    partitions = testing.check_partitioner(Halves(), stack())
    assert [b.name for b in partitions[0]] == ["lower", "upper"]


def test_an_optimizer_over_halves_keeps_bcds_invariants():
    model = stack()
    optimizer = bcd.BlockCoordinateOptimizer(model, partitioner=Halves(), lr=0.1, switch_every=2)
    testing.check_invariants(model, optimizer, loss)


def test_halves_by_its_registered_name_is_the_same_composition():
    by_name = bcd.BlockCoordinateOptimizer(stack(), partitioner="halves", lr=0.1)
    by_object = bcd.BlockCoordinateOptimizer(stack(), partitioner=Halves(), lr=0.1)
    assert by_name.blocks == by_object.blocks
    saved = bcd.layout.header(by_name.state_dict()), bcd.layout.header(by_object.state_dict())
    assert saved[0]["partitioner"] == saved[1]["partitioner"] == "halves"


def test_one_layer_is_refused():
    with pytest.raises(ValueError, match=r"[01] layer\(s\) found; accepted: 2 or more"):
        bcd.BlockCoordinateOptimizer(nn.Sequential(nn.Linear(4, 4)), partitioner=Halves())
