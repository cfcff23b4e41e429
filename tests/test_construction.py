"""Bad constructor and plugin options: each a ValueError naming the value received; the model untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bcd
from bcd.blocks import entry_numel

from conftest import CASES, MLP, train


class SparseModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4, sparse=True)
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))


BAD = [
    # (constructor keyword arguments, text the message must contain)
    ({"switch_every": 0}, "switch_every: 0"),
    ({"switch_every": 2.5}, "switch_every: 2.5"),
    ({"switch_every": "3"}, "switch_every: '3'"),
    ({"switch_every": True}, "switch_every: True"),
    ({"lr": -0.1}, "lr: -0.1"),
    ({"lr": "fast"}, "lr: 'fast'"),
    ({"lr": True}, "lr: True"),
    ({"lr": 0.1, "solver_options": {"lr": 0.2}}, "lr=0.1 and solver_options['lr']=0.2"),
    ({"no_decay": "yes"}, "no_decay: 'yes'"),
    ({"data_parallel": 1}, "data_parallel: 1"),
    ({"data_parallel": True}, "data_parallel=True"),
    ({"partitioner": "nope"}, "'nope'"),
    ({"partitioner": 5}, "5 (int) has no partition, dynamic"),
    ({"partitioner_options": 5}, "partitioner_options: 5"),
    ({"partitioner_options": {"depth": 1}}, "['depth']"),
    ({"partitioner_options": {"include_embedding": "yes"}}, "include_embedding: 'yes'"),
    ({"partitioner": "random-subset"}, "Missing option(s) ['num_blocks'] for partitioner 'random-subset'"),
    ({"partitioner": "random-subset", "partitioner_options": {"num_blocks": 0}}, "num_blocks: 0"),
    ({"partitioner": "random-subset", "partitioner_options": {"num_blocks": "3"}}, "num_blocks: '3'"),
    ({"partitioner": "random-subset", "partitioner_options": {"num_blocks": 2, "seed": "x"}}, "seed: 'x'"),
    ({"partitioner": "random-subset", "partitioner_options": {"num_blocks": 2, "redraw": "yes"}}, "redraw: 'yes'"),
    ({"partitioner": "per-module"}, "Missing option(s) ['modules']"),
    ({"partitioner": "per-module", "partitioner_options": {"modules": 5}}, "{'modules': 5}"),
    ({"partitioner": "per-module", "partitioner_options": {"modules": ["Linear"], "rest": "drop"}}, "rest: 'drop'"),
    ({"partitioner": "explicit"}, "Missing option(s) ['blocks']"),
    ({"partitioner": "explicit", "partitioner_options": {"blocks": 5}}, "blocks: 5"),
    ({"partitioner": "explicit", "partitioner_options": {"blocks": {"a": [3]}}}, "blocks: {'a': [3]}"),
    ({"order": "sideways"}, "'sideways'"),
    ({"order": object()}, "has no order"),
    ({"order_options": 5}, "order_options: 5"),
    ({"order": "random", "order_options": {"seed": "x"}}, "seed: 'x'"),
    ({"order_options": {"start_block": 99}}, "start_block: 99"),
    ({"order_options": {"start_block": 1.5}}, "start_block: 1.5"),
    ({"order_options": {"start_block": "layers.9"}}, "'layers.9'"),
    ({"solver": "lion"}, "'lion'"),
    ({"solver": 3}, "solver: 3"),
    ({"solver_options": 5}, "solver_options: 5"),
    ({"solver_options": {"betaz": 1}}, "['betaz']"),
    ({"solver_options": {"betas": (0.9,)}}, "(0.9,)"),
    ({"solver_options": {"betas": (2.0, 0.9)}}, "2.0"),
    ({"solver_options": {"weight_decay": -0.1}}, "-0.1"),
    ({"solver_options": {"foreach": True, "fused": True}}, "'foreach': True, 'fused': True"),
    ({"solver": "sgd", "solver_options": {"momentum": -1}}, "-1"),
    ({"groups": "abc"}, "groups: 'abc'"),
    ({"groups": [{"lr": 1.0}]}, "{'lr': 1.0} has no 'params'"),
    ({"groups": [{"params": ["nope.weight"]}]}, "'nope.weight'"),
    ({"groups": [{"params": ["out.weight"], "lr": -1}]}, "lr=-1"),
    ({"groups": [{"params": ["out.weight"], "lr": "fast"}]}, "lr='fast'"),
    ({"groups": [{"params": ["out.weight"], "Lr": 1}]}, "'Lr'=1"),
    ({"groups": [{"params": ["out.weight"]}, {"params": ["out.weight"]}]}, "'out.weight' is in two groups"),
]


def test_the_table_is_large_enough():
    assert len(BAD) >= 30


@pytest.mark.parametrize("kwargs,text", BAD, ids=[str(i) for i in range(len(BAD))])
def test_a_bad_option_is_a_value_error_naming_the_value(kwargs, text):
    torch.manual_seed(0)
    model = MLP()
    with pytest.raises(ValueError) as error:
        bcd.BlockCoordinateOptimizer(model, **kwargs)
    assert text in str(error.value), str(error.value)
    assert all(p.requires_grad for p in model.parameters())  # nothing was frozen
    assert all(not m._forward_pre_hooks for m in model.modules())  # nothing was installed


def test_a_sparse_embedding_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"embed \(Embedding\) has sparse=True"):
        bcd.BlockCoordinateOptimizer(SparseModel())
    model = SparseModel()
    model.embed.requires_grad_(False)
    bcd.BlockCoordinateOptimizer(model, lr=0.1)  # frozen, it is no candidate: accepted


def test_fused_kernels_by_default_and_the_users_choice_wins():
    model = MLP()
    assert bcd.BAdam(model).composition.solver_options["fused"] is True
    assert "fused" not in bcd.BAdam(MLP(), foreach=True).composition.solver_options
    assert bcd.BAdam(MLP(), fused=False).composition.solver_options["fused"] is False
    assert "fused" not in bcd.BlockCoordinateOptimizer(MLP(), solver="sgd").composition.solver_options


class _TwoHalves:
    """A third party's partitioner that knows nothing of row blocks or limits."""

    dynamic = False

    def partition(self, model, params, epoch):
        names = list(params)
        return bcd.Partition.from_groups({"lower": names[: len(names) // 2], "upper": names[len(names) // 2:]})


def test_any_partitioner_gets_row_blocks_through_the_composition():
    model = MLP(width=32)
    params = dict(model.named_parameters())
    optimizer = bcd.BlockCoordinateOptimizer(model, lr=0.1, partitioner=_TwoHalves(), max_block_params=600, switch_every=1)
    sizes = [sum(entry_numel(e, params) for e in block.param_names) for block in optimizer.blocks]
    assert max(sizes) <= 600 < sum(sizes) and any("[" in e for e in optimizer.blocks.param_names)  # a tensor split by rows
    assert optimizer.blocks[0].name == "lower/0"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, optimizer, CASES["mlp"], len(optimizer.blocks))
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match=r"Invalid max_block_params: 0; accepted: an integer >= 1"):
        bcd.BlockCoordinateOptimizer(MLP(), lr=0.1, partitioner=_TwoHalves(), max_block_params=0)


class _Limited(_TwoHalves):
    """A partitioner that names its own default limit, as the layer partitioner does."""

    def __init__(self, limit):
        self.limit = limit

    def block_limit(self, partition, params):
        return self.limit


def test_a_partitioners_block_limit_is_the_default_the_users_limit_wins():
    params = dict(MLP(width=32).named_parameters())
    largest = lambda optimizer: max(sum(entry_numel(e, params) for e in b.param_names) for b in optimizer.blocks)  # noqa: E731
    assert largest(bcd.BlockCoordinateOptimizer(MLP(width=32), partitioner=_Limited(600))) <= 600
    assert largest(bcd.BlockCoordinateOptimizer(MLP(width=32), partitioner=_Limited(600), max_block_params=10**9)) > 600
    with pytest.raises(ValueError, match=r"Invalid block_limit from partitioner .*: 0; accepted: an integer >= 1"):
        bcd.BlockCoordinateOptimizer(MLP(width=32), partitioner=_Limited(0))


def test_max_block_params_as_a_partitioner_option_says_where_it_went():
    model = MLP()
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['max_block_params'\] for partitioner 'layer'.*"
                                         r"the optimizer's keyword now.*bcd.BAdam\(..., max_block_params=N\)"):
        bcd.BlockCoordinateOptimizer(model, partitioner_options={"max_block_params": 10})
    assert all(p.requires_grad for p in model.parameters())  # refused before anything changed
