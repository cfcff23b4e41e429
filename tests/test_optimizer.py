"""BlockCoordinateOptimizer: schedule, precision, hyperparameters, events and errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bcd

from conftest import CASES, MLP, snapshot, train


def mlp_optimizer(**kwargs):
    torch.manual_seed(0)
    model = MLP()
    kwargs.setdefault("lr", 1e-2)
    return model, bcd.BlockCoordinateOptimizer(model, **kwargs)


def test_each_block_gets_exactly_k_steps_the_first_included():
    model, optimizer = mlp_optimizer(switch_every=4, order="ascending")
    seen = []
    for step in range(4 * len(optimizer.blocks) * 2):
        seen.append(optimizer.active_block.name)
        CASES["mlp"].loss(model, step).backward()
        optimizer.step()
        optimizer.zero_grad()
    names = [b.name for b in optimizer.blocks]
    assert seen == [n for n in names for _ in range(4)] * 2
    assert optimizer.block_epoch == 2 and optimizer.step_in_block == 0


def test_gradient_accumulation_counts_only_optimizer_steps():
    model, optimizer = mlp_optimizer(switch_every=2)
    first = optimizer.active_block
    for micro in range(3):  # three backward passes, one step
        CASES["mlp"].loss(model, micro).backward()
    optimizer.step()
    assert optimizer.active_block == first and optimizer.step_in_block == 1


def test_start_block_by_name_and_descending_default_start():
    _, optimizer = mlp_optimizer(order="ascending", order_options={"start_block": "layers.1"})
    assert optimizer.active_block.name == "layers.1"
    assert [optimizer.blocks[i].name for i in optimizer.block_order][:2] == ["layers.1", "layers.2"]
    _, optimizer = mlp_optimizer(order="descending")
    assert optimizer.active_block.name == "head"


def test_fp32_model_is_updated_in_place_with_a_note():
    with pytest.warns(bcd.PrecisionNote, match="bf16"):
        model, optimizer = mlp_optimizer()
    assert optimizer.solver is None  # built at the first step of the visit
    CASES["mlp"].loss(model, 0).backward()
    optimizer.step()
    assert optimizer.master_copies.state_dict() == {}
    assert all(m is p for m, p in zip(optimizer.master_copies.solver_params, optimizer.master_copies.params))


def test_bf16_step_uses_fp32_masters_and_rounds_back():
    torch.manual_seed(0)
    model = MLP().to(torch.bfloat16)
    optimizer = bcd.BlockCoordinateOptimizer(model, lr=1e-3, switch_every=5)
    CASES["mlp"].loss(model, 0).backward()
    optimizer.step()
    masters = optimizer.master_copies.state_dict()
    params = dict(model.named_parameters())
    for name, master in masters.items():
        assert master.dtype == torch.float32
        assert torch.equal(params[name], master.to(torch.bfloat16))
        assert params[name].grad is None and master.grad is None  # both gradients freed after the step
    assert optimizer.solver.state  # Adam's m, v exist for the masters, in fp32
    for state in optimizer.solver.state.values():
        assert state["exp_avg"].dtype == torch.float32


def test_lr_scheduler_and_per_group_values_reach_the_solver():
    torch.manual_seed(0)
    model = MLP()
    optimizer = bcd.BlockCoordinateOptimizer(
        model, lr=1.0, switch_every=100, solver="sgd", partitioner="explicit",
        partitioner_options={"blocks": {"all": ["*"]}},
        groups=[{"params": [model.out.weight], "lr": 10.0}],
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** (step + 1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    CASES["mlp"].loss(model, 0).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    scheduler.step()
    for name, param in model.named_parameters():
        lr = 10.0 * 0.5 if name == "out.weight" else 0.5
        torch.testing.assert_close(param, before[name] - lr * grads[name])
    assert [g["lr"] for g in optimizer.param_groups] == [0.25, 2.5]


def test_weight_decay_is_exactly_what_the_user_set_and_no_decay_exempts_1d():
    model, optimizer = mlp_optimizer(solver="adamw", solver_options={"weight_decay": 0.3}, no_decay=True)
    train(model, optimizer, CASES["mlp"], 1)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.3, 0.0]
    assert all(p.ndim == 1 for p in optimizer.param_groups[1]["params"])
    assert all(p.ndim == 2 for p in optimizer.param_groups[0]["params"])
    assert sorted(g["weight_decay"] for g in optimizer.solver.param_groups) == [0.0, 0.3]
    # The reference let the base optimizer's default overwrite the user's value; here it cannot.
    model = MLP()
    badam = bcd.BAdam(model, weight_decay=0.25)
    train(model, badam, CASES["mlp"], 1)
    assert badam.solver.param_groups[0]["weight_decay"] == 0.25


def test_clip_grad_norm_over_model_parameters():
    model, optimizer = mlp_optimizer()
    CASES["mlp"].loss(model, 0).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    assert norm > 1e-3
    active = [p for p in model.parameters() if p.grad is not None]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in active]))
    torch.testing.assert_close(total, torch.tensor(1e-3), rtol=1e-3, atol=0)
    optimizer.step()


class TwoExperts(nn.Module):
    """Only expert 0 is used: expert 1 gets no gradient, like an unrouted MoE expert."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    def forward(self, x):
        return self.experts[0](x)


def test_active_parameter_without_gradient_is_skipped():
    model = TwoExperts()
    optimizer = bcd.BlockCoordinateOptimizer(
        model, lr=0.1, partitioner="explicit", partitioner_options={"blocks": {"all": ["*"]}},
        solver_options={"weight_decay": 0.5},
    )
    unused = model.experts[1].weight.detach().clone()
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    assert torch.equal(model.experts[1].weight, unused)
    assert not torch.equal(model.experts[0].weight, unused)


def test_block_switch_hooks_see_every_activation_until_removed():
    model, optimizer = mlp_optimizer(switch_every=2, order="ascending")
    events, other = [], []
    handle = optimizer.register_block_switch_hook(lambda opt, event: events.append((opt, event)))
    optimizer.register_block_switch_hook(lambda opt, event: other.append(event.block.name))
    train(model, optimizer, CASES["mlp"], 4)
    assert [(e.reason, e.block.name, e.global_step) for _, e in events] == [
        ("switch", "layers.0", 2), ("switch", "layers.1", 4)
    ]
    assert all(opt is optimizer for opt, _ in events)
    assert events[0][1].previous.name == "embedding"
    handle.remove()
    train(model, optimizer, CASES["mlp"], 2, start=4)
    assert len(events) == 2 and other == ["layers.0", "layers.1", "layers.2"]
    optimizer.load_state_dict(optimizer.state_dict())
    assert other[-1] == "layers.2" and len(other) == 4  # a resume is an activation too


def test_excluded_parameters_stay_frozen():
    torch.manual_seed(0)
    model = MLP()
    optimizer = bcd.BlockCoordinateOptimizer(
        model, lr=0.1, partitioner_options={"include_embedding": False, "include_head": False}, switch_every=1
    )
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(("inp", "out"))}
    train(model, optimizer, CASES["mlp"], 6)
    assert [b.name for b in optimizer.blocks] == ["layers.0", "layers.1", "layers.2"]
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]) and not param.requires_grad


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"switch_every": 0}, r"switch_every: 0; accepted: an integer >= 1"),
        ({"switch_every": 2.5}, r"switch_every: 2.5"),
        ({"lr": -0.1}, r"lr: -0.1; accepted: a finite number >= 0"),
        ({"lr": float("inf")}, r"lr: inf; accepted: a finite number >= 0"),
        ({"solver_options": {"eps": float("inf")}}, r"solver_options for solver 'adamw': eps=inf; accepted: a finite number >= 0"),
        ({"solver_options": {"weight_decay": float("nan")}}, r"Invalid weight_decay value: nan"),
        ({"solver_options": {"betas": (0.9, float("inf"))}}, r"Invalid beta parameter at index 1: inf"),
        ({"partitioner": "nope"}, r"Unknown partitioner: 'nope'; registered partitioners: explicit, layer"),
        ({"order": "sideways"}, r"Unknown ordering: 'sideways'; registered orderings: ascending"),
        ({"solver": "lion"}, r"Unknown solver: 'lion'; registered solvers: adam, adamw, sgd"),
        ({"solver_options": {"betaz": 1}}, r"Unknown option\(s\) \['betaz'\] for solver 'adamw'; accepted: .*betas"),
        ({"solver_options": {"betas": (2.0, 0.9)}}, r"beta parameter at index 0: 2.0"),
        ({"partitioner_options": {"depth": 1}}, r"Unknown option\(s\) \['depth'\] for partitioner 'layer'"),
        ({"order_options": {"start_block": 99}}, r"start_block: 99; accepted: a block index 0 ... 4"),
        ({"order_options": {"start_block": "layers.9"}}, r"Unknown block name: 'layers.9'"),
        ({"partitioner": "explicit", "partitioner_options": {"blocks": {}}}, r"no blocks given"),
        ({"partitioner": "explicit", "partitioner_options": {"blocks": {"a": ["*"], "b": ["out.*"]}}},
         r"'out.weight' is in block 'a' and in block 'b'"),
        ({"partitioner": "explicit", "partitioner_options": {"blocks": {"a": ["layers.*"]}}},
         r"4 trainable parameter\(s\) are in no block, e.g. \[\'inp.weight\'"),
        ({"partitioner": "explicit", "partitioner_options": {"blocks": {"a": ["*"], "b": ["nothing.*"]}}},
         r"pattern 'nothing.\*' of block 'b' matches no trainable parameter"),
        ({"groups": [{"lr": 1.0}]}, r"has no 'params'"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, match):
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=match):
        bcd.BlockCoordinateOptimizer(MLP(), **kwargs)


def test_model_without_trainable_parameters_is_refused():
    model = MLP().requires_grad_(False)
    with pytest.raises(ValueError, match="has no trainable parameters"):
        bcd.BlockCoordinateOptimizer(model)


def test_not_a_module_is_refused():
    with pytest.raises(ValueError, match="Invalid model: list; accepted: a torch.nn.Module"):
        bcd.BlockCoordinateOptimizer([nn.Parameter(torch.zeros(1))])


def test_refused_construction_leaves_the_model_untouched():
    model = MLP()
    with pytest.raises(ValueError):
        bcd.BlockCoordinateOptimizer(model, solver_options={"lr": -1.0})
    assert all(p.requires_grad for p in model.parameters())


def test_weights_loaded_after_construction_are_what_training_starts_from():
    """As the Trainer does on resume: the optimizer exists, then the weights are loaded."""
    torch.manual_seed(0)
    model = MLP().to(torch.bfloat16)
    optimizer = bcd.BlockCoordinateOptimizer(model, lr=1e-3, switch_every=2)
    torch.manual_seed(1)
    trained = MLP().to(torch.bfloat16).state_dict()
    model.load_state_dict(trained)
    optimizer.load_state_dict(optimizer.state_dict())  # accelerate's prepare() does this round trip
    CASES["mlp"].loss(model, 0).backward()
    optimizer.step()
    for name, param in model.named_parameters():
        # One small step from the loaded weights, not from the ones at construction.
        assert (param.float() - trained[name].float()).abs().max() < 2e-2, name


class _FailsLater:
    """An ordering that raises from block-epoch 1 on (a plugin's bug, found only after block-epoch 0)."""

    def order(self, num_blocks, epoch):
        if epoch >= 1:
            raise ValueError("no order after block-epoch 0")
        return list(range(num_blocks))


class _Recounts:
    """A dynamic partitioner whose block-epoch 1 has another number of blocks (random-subset with a changing limit)."""

    dynamic = True

    def partition(self, model, params, epoch):
        names = list(params)
        return bcd.Partition.from_groups([names] if epoch else [names[:4], names[4:]])


@pytest.mark.parametrize("kwargs, match", [
    ({"order": _FailsLater()}, r"no order after block-epoch 0"),
    ({"partitioner": _Recounts()}, r"a dynamic partitioner may regroup, not add, drop or recount"),
])
def test_a_step_whose_next_block_fails_moves_no_weight(kwargs, match):
    """The next order and partition are computed before the step: a failure leaves weights, schedule and state as they were."""
    model = MLP()
    optimizer = bcd.BlockCoordinateOptimizer(model, lr=0.1, switch_every=1, **kwargs)
    train(model, optimizer, CASES["mlp"], len(optimizer.blocks) - 1)  # the last visit of block-epoch 0 is next
    CASES["mlp"].loss(model, 99).backward()
    before, saved = snapshot(model), copy.deepcopy(bcd.layout.unpack(optimizer.state_dict(), optimizer))
    for _ in range(2):  # a retry steps no more than the first try
        with pytest.raises(ValueError, match=match):
            optimizer.step()
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
        assert optimizer.schedule.global_step == saved["schedule"]["global_step"]
    optimizer.load_state_dict(optimizer.state_dict())  # what it saves now still loads
    assert bcd.layout.unpack(optimizer.state_dict(), optimizer)["schedule"] == saved["schedule"]


def test_fp16_gradient_norms_are_observed_without_overflow():
    """Every fp16 gradient finite, their norm above fp16's 65504: the importance order measures it in fp32."""
    model = MLP().to(torch.float16)
    optimizer = bcd.BlockCoordinateOptimizer(model, lr=1e-3, switch_every=1, order="importance")
    for param in model.parameters():
        param.grad = torch.full_like(param, 3e4) if param.requires_grad else None
    first = optimizer.active_block_index
    optimizer.step()
    assert optimizer.schedule.observed.grad_norm[first] > 65504


def test_a_non_finite_gradient_norm_is_refused_before_any_weight_moves():
    model = MLP()
    optimizer = bcd.BlockCoordinateOptimizer(model, lr=0.1, switch_every=1, order="importance")
    before = snapshot(model)
    for param in model.parameters():
        param.grad = torch.full_like(param, float("nan")) if param.requires_grad else None
    with pytest.raises(ValueError, match=r"block '\w+' has a non-finite norm \(nan\); nothing was updated"):
        optimizer.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert optimizer.global_step == 0
