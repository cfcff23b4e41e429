"""An optimizer's life on a model: composition by objects, hooks it installs and removes, takeover, copies."""

from __future__ import annotations

import copy
import functools
import gc
import pickle

import pytest
import torch
from torch import nn

import bcd
from bcd_plugins.orderings import Random
from bcd_plugins.partitioners import LayerPartitioner

from conftest import CASES, MLP, train


def model_hooks(model: torch.nn.Module) -> int:
    """Forward (pre-)hooks on every module, global forward pre-hooks, and gradient hooks on parameters."""
    modules = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    grads = sum(len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in model.parameters())
    return modules + grads + len(torch.nn.modules.module._global_forward_pre_hooks)


class _TwoArguments:
    """An observing ordering whose order() forgot the observations."""

    observes = True

    def order(self, num_blocks, epoch):
        return list(range(num_blocks))


class _NoEpoch:
    dynamic = False

    def partition(self, model, params):
        return bcd.Partition.from_groups([list(params)])


class _Returns:
    """An ordering returning ``value`` whatever it is asked: once int() turned "10" into [1, 0]."""

    def __init__(self, value):
        self.value = value

    def order(self, num_blocks, epoch):
        return self.value


def test_objects_only_trains_identically_to_names():
    case = CASES["llama"]
    by_names_model, by_objects_model = case.model(dtype=torch.bfloat16), case.model(dtype=torch.bfloat16)
    by_names = bcd.BlockCoordinateOptimizer(
        by_names_model, switch_every=2, partitioner="layer", partitioner_options={"include_head": False},
        order="random", order_options={"seed": 5}, solver="adamw",
        solver_options={"lr": 1e-3, "betas": (0.8, 0.9), "weight_decay": 0.1},
    )
    by_objects = bcd.BlockCoordinateOptimizer(
        by_objects_model, switch_every=2, partitioner=LayerPartitioner(include_head=False), order=Random(seed=5),
        solver=functools.partial(torch.optim.AdamW, lr=1e-3, betas=(0.8, 0.9), weight_decay=0.1),
    )
    assert by_names.blocks == by_objects.blocks and by_names.block_order == by_objects.block_order
    assert train(by_names_model, by_names, case, 9) == train(by_objects_model, by_objects, case, 9)
    for (name, a), (_, b) in zip(by_names_model.named_parameters(), by_objects_model.named_parameters()):
        assert torch.equal(a, b), name
    saved_names, saved_objects = by_names.state_dict(), by_objects.state_dict()
    records = bcd.layout.unpack(saved_names, by_names), bcd.layout.unpack(saved_objects, by_objects)
    for key in ("partitioner", "partitioner_options", "ordering", "solver", "schedule"):
        assert records[0][key] == records[1][key], key
    by_objects.load_state_dict(saved_names)  # the two spellings' state dicts are interchangeable


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"partitioner": object()}, r"Invalid partitioner: <object object at .*> \(object\) has no partition, dynamic"),
        ({"order": object()}, r"Invalid ordering: <object object at .*> \(object\) has no order"),
        ({"solver": 3}, r"Invalid solver: 3; accepted: a registered solver name or a callable"),
        ({"partitioner": LayerPartitioner(), "partitioner_options": {"include_head": False}},
         r"Invalid partitioner options \{'include_head': False\} with a partitioner object"),
        ({"solver": lambda params, **kw: "not an optimizer"}, r"its factory returned str"),
        ({"order": _TwoArguments()}, r"_TwoArguments.order\(num_blocks, epoch\) cannot be called as "
                                     r"order\(num_blocks, epoch, observed\) \(observes = True\)"),
        ({"partitioner": _NoEpoch()}, r"_NoEpoch.partition\(model, params\) cannot be called as partition\(model, params, epoch\)"),
    ] + [({"order": _Returns(value)}, r"Invalid order from ordering _Returns: .*accepted: a list of block indices")
         for value in ("10", [1.0, 0.0], [True, False], {0: "a", 1: "b"}, torch.tensor([0.0, 1.0]))],
)
def test_objects_that_break_the_protocols_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bcd.BlockCoordinateOptimizer(MLP(), **kwargs)


def test_dropping_optimizers_leaves_no_hooks_on_the_model():
    model = MLP()
    base = model_hooks(model)
    for _ in range(5):
        optimizer = bcd.BlockCoordinateOptimizer(model, lr=0.1, data_parallel=False)
        train(model, optimizer, CASES["mlp"], 1)
        # The live one's: the checkpointing guard, and on the CPU one gradient hook per tensor of its
        # active block (bcd.heap's release at the block's first gradient).
        assert model_hooks(model) == base + 1 + len(optimizer.active_block.tensor_names)
    del optimizer
    gc.collect()
    assert model_hooks(model) == base


def test_close_removes_the_hooks_and_makes_the_candidates_trainable_again():
    model = MLP()
    model.inp.requires_grad_(False)
    base = model_hooks(model)
    with bcd.BlockCoordinateOptimizer(model, lr=0.1) as optimizer:
        train(model, optimizer, CASES["mlp"], 2)
        assert model_hooks(model) > base
    assert model_hooks(model) == base
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n, _ in model.named_parameters()} - {
        "inp.weight", "inp.bias"}
    optimizer.close()  # idempotent
    with pytest.raises(ValueError, match=r"This optimizer is closed \(close\(\) was called\); nothing was updated"):
        optimizer.step()


def test_a_second_optimizer_over_the_model_takes_over_with_every_candidate():
    """Re-running a notebook cell: the new optimizer sees what the first saw, not its frozen blocks."""
    model = MLP()
    first = bcd.BlockCoordinateOptimizer(model, lr=0.1, switch_every=1, order="ascending")
    train(model, first, CASES["mlp"], 1)
    second = bcd.BlockCoordinateOptimizer(model, lr=0.1, switch_every=1, order="ascending")
    assert second.blocks == first.blocks and len(second.blocks) == 5
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    CASES["mlp"].loss(model, 0).backward()
    with pytest.raises(ValueError, match="a newer optimizer over the same model took over"):
        first.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    changed = set()
    for step in range(5):
        snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
        if step:
            CASES["mlp"].loss(model, step).backward()
        second.step()
        second.zero_grad()
        changed |= {n for n, p in model.named_parameters() if not torch.equal(p, snapshot[n])}
    assert changed == set(before)  # every parameter trained within one block-epoch


def test_parameters_replaced_mid_visit_are_refused_at_the_next_step():
    model = MLP()
    optimizer = bcd.BlockCoordinateOptimizer(model, lr=0.1, switch_every=5, order="ascending")
    train(model, optimizer, CASES["mlp"], 1)
    fresh = {n: p.detach().clone() + 1 for n, p in model.state_dict().items()}
    model.load_state_dict(fresh, assign=True)
    CASES["mlp"].loss(model, 1).backward()
    with pytest.raises(ValueError, match=r"parameters were replaced .*'inp.weight'.*assign=True.*nothing was updated"):
        optimizer.step()
    assert all(torch.equal(p, fresh[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("copier", [copy.deepcopy, copy.copy, lambda o: pickle.loads(pickle.dumps(o))])
def test_copies_are_refused_pointing_to_state_dict(copier):
    model = MLP()
    optimizer = bcd.BlockCoordinateOptimizer(model, lr=0.1)
    with pytest.raises(TypeError, match=r"cannot be pickled or copied.*optimizer.state_dict\(\)"):
        copier(optimizer)


def test_torch_state_dict_hooks_fire():
    model = MLP()
    optimizer = bcd.BlockCoordinateOptimizer(model, lr=0.1)
    train(model, optimizer, CASES["mlp"], 1)
    calls = []
    optimizer.register_state_dict_pre_hook(lambda opt: calls.append("pre"))
    optimizer.register_state_dict_post_hook(lambda opt, sd: {**sd, "note": "added"})
    optimizer.register_load_state_dict_pre_hook(lambda opt, sd: {k: v for k, v in sd.items() if k != "note"})
    optimizer.register_load_state_dict_post_hook(lambda opt: calls.append("loaded"))
    saved = optimizer.state_dict()
    assert saved["note"] == "added" and calls == ["pre"]
    optimizer.load_state_dict(saved)
    assert calls == ["pre", "loaded"]


def test_step_hooks_fire_and_a_bad_group_value_leaves_the_block_untouched():
    model = MLP()
    optimizer = bcd.BlockCoordinateOptimizer(model, lr=0.1)
    steps = []
    optimizer.register_step_post_hook(lambda opt, args, kwargs: steps.append(opt.global_step))
    train(model, optimizer, CASES["mlp"], 2)
    assert steps == [1, 2]
    optimizer.param_groups[0]["lr"] = "fast"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    CASES["mlp"].loss(model, 2).backward()
    with pytest.raises(ValueError, match=r"Invalid param_groups\[0\]: lr='fast'; accepted: a finite number >= 0"):
        optimizer.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()) and optimizer.global_step == 2


def test_a_collected_optimizer_hands_back_every_candidate_trainable():
    """Collected (not closed) mid-run, an optimizer once left all but its active block frozen: the next trained D = 1."""
    model = MLP()
    model.inp.requires_grad_(False)
    optimizer = bcd.BlockCoordinateOptimizer(model, lr=0.1, switch_every=1)
    blocks = optimizer.blocks
    train(model, optimizer, CASES["mlp"], 2)
    del optimizer
    gc.collect()
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters()} - {"inp.weight", "inp.bias"}
    assert bcd.BlockCoordinateOptimizer(model, lr=0.1).blocks == blocks


def test_an_optimizer_over_a_wrapper_takes_over_the_model_it_wraps():
    """Take-over is keyed by the parameters: nn.Sequential(model) (or DDP's module) is the same model."""
    model = MLP()
    first = bcd.BlockCoordinateOptimizer(model, lr=0.1, switch_every=1)
    train(model, first, CASES["mlp"], 1)
    wrapper = nn.Sequential(model)
    second = bcd.BlockCoordinateOptimizer(wrapper, lr=0.1, switch_every=1)
    assert first.closed
    assert len(second.blocks) == len(first.blocks)
    assert set(second.candidates) == {f"0.{n}" for n in first.candidates}
