"""landscape_expansion: sign steps on the blocks after the active one (or all others), as backward produces their gradients."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import bcd

from conftest import CASES, MLP, snapshot, train

BLOCKS = ["embedding", "layers.0", "layers.1", "layers.2", "head"]


def build(seed: int = 0, start: int = 2, **options):
    model = CASES["mlp"].model(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bcd.PrecisionNote)
        optimizer = bcd.BlockCoordinateOptimizer(model, lr=0.05, switch_every=2, order_options={"start_block": start},
                                                 **options)
    return model, optimizer


def full_gradients(model, step: int) -> dict[str, torch.Tensor]:
    """Every parameter's gradient at ``step``'s batch, from a trainable copy."""
    twin = copy.deepcopy(model)
    for param in twin.parameters():
        param.requires_grad_(True)
    CASES["mlp"].loss(twin, step).backward()
    return {n: p.grad for n, p in twin.named_parameters()}


def block_of(name: str) -> str:
    return {"inp": "embedding", "out": "head"}.get(name.split(".")[0], ".".join(name.split(".")[:2]))


@pytest.mark.parametrize(("sign", "reach"), [(True, "after"), (False, "after"), (True, "all")])
def test_the_reached_blocks_take_the_step_and_the_others_stay_frozen(sign, reach):
    model, optimizer = build()
    plain_model, plain = build()
    bcd.landscape_expansion(optimizer, scale=0.5, sign=sign, reach=reach)
    before, grads = snapshot(model), full_gradients(model, 0)
    train(model, optimizer, CASES["mlp"], 1)
    train(plain_model, plain, CASES["mlp"], 1)
    for name, param in model.named_parameters():
        block = BLOCKS.index(block_of(name))
        # layers.2 and the head (and with reach "all" the embedding and layers.0): one step each,
        # decoupled weight decay at the group's rate (AdamW's default 0.01) as for the active block,
        # the gradient then dropped
        if block > 2 or (reach == "all" and block < 2):
            step = grads[name].sign() if sign else grads[name]
            decay = optimizer.param_groups[0]["weight_decay"]
            assert decay == 0.01
            torch.testing.assert_close(param.detach(), before[name] - 0.05 * (0.5 * step + decay * before[name]))
            assert param.grad is None
        elif block == 2:  # the active block: its solver's step, as without the expansion
            assert torch.equal(param, dict(plain_model.named_parameters())[name])
        else:
            assert torch.equal(param, before[name]) and not param.requires_grad and param.grad is None


def test_the_expansion_follows_the_active_block_and_remove_undoes_it():
    model, optimizer = build(start=3)
    expansion = bcd.landscape_expansion(optimizer, scale=0.5)
    assert list(expansion.expanded) == ["out.weight", "out.bias"]
    train(model, optimizer, CASES["mlp"], 2)  # K = 2: the switch to the head, the last block
    assert optimizer.active_block.name == "head" and expansion.expanded == {}
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["out.weight", "out.bias"]
    train(model, optimizer, CASES["mlp"], 2, start=2)  # ascending: back to the embedding, all after it expanded
    assert optimizer.active_block.name == "embedding"
    assert len(expansion.expanded) == 8 and all(p.requires_grad for p in model.parameters())
    expansion.remove()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["inp.weight", "inp.bias"]
    before = snapshot(model)
    train(model, optimizer, CASES["mlp"], 1, start=4)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if not n.startswith("inp."))


def test_reach_all_follows_the_active_block_over_every_other_block():
    model, optimizer = build(start=3)
    expansion = bcd.landscape_expansion(optimizer, scale=0.5, reach="all")
    everything = [n for n, _ in model.named_parameters()]
    assert list(expansion.expanded) == [n for n in everything if not n.startswith("layers.2.")]
    train(model, optimizer, CASES["mlp"], 2)  # the switch to the head
    assert list(expansion.expanded) == [n for n in everything if not n.startswith("out.")]
    assert all(p.requires_grad for p in model.parameters())
    expansion.remove()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["out.weight", "out.bias"]


def test_a_user_hook_that_raises_leaves_the_expansion_in_step_with_the_active_block():
    """The expansion moves first at a switch: a raising hook registered before it once left the new block expanded."""
    model, optimizer = build(start=3)

    def fails(optimizer, event):
        if event.reason == "switch":
            raise RuntimeError("a user's hook")

    optimizer.register_block_switch_hook(fails)
    expansion = bcd.landscape_expansion(optimizer, scale=0.5)
    with pytest.raises(RuntimeError, match="a user's hook"):
        train(model, optimizer, CASES["mlp"], 2)  # K = 2: the switch to the head
    assert optimizer.active_block.name == "head"
    assert expansion.expanded == {}  # the head's gradients reach its solver, not a sign step


def test_one_expansion_per_optimizer():
    model, optimizer = build()
    first = bcd.landscape_expansion(optimizer, scale=0.5)
    with pytest.raises(ValueError, match="has a landscape expansion already"):
        bcd.landscape_expansion(optimizer, scale=0.5)
    assert list(first.expanded) == ["layers.2.weight", "layers.2.bias", "out.weight", "out.bias"]
    first.remove()
    second = bcd.landscape_expansion(optimizer, scale=0.5)
    assert list(second.expanded) == ["layers.2.weight", "layers.2.bias", "out.weight", "out.bias"]


def test_a_closed_optimizer_takes_its_expansion_down_with_it():
    model, optimizer = build()
    expansion = bcd.landscape_expansion(optimizer, scale=0.5)
    optimizer.close()
    before = snapshot(model)
    CASES["mlp"].loss(model, 0).backward()  # everything trainable again, nothing stepped
    assert all(torch.equal(p, before[n]) and p.grad is not None for n, p in model.named_parameters())
    assert expansion.expanded == {}
    with pytest.raises(ValueError, match="closed"):
        bcd.landscape_expansion(optimizer, scale=0.5)


def test_resume_with_the_expansion_is_exact():
    def make():
        model, optimizer = build(seed=1, start=1, order="random")
        bcd.landscape_expansion(optimizer, scale=0.3)
        return model, optimizer

    model, optimizer = make()
    train(model, optimizer, CASES["mlp"], 9)
    reference = snapshot(model)
    model, optimizer = make()
    train(model, optimizer, CASES["mlp"], 3)  # mid-visit
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()))
    model, optimizer = make()
    model.load_state_dict(saved[0])
    optimizer.load_state_dict(saved[1])
    train(model, optimizer, CASES["mlp"], 6, start=3)
    assert all(torch.equal(p, reference[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize(("options", "message"), [
    ({"scale": 0}, r"Invalid scale: 0; accepted: a finite number > 0"),
    ({"scale": float("nan")}, r"Invalid scale: nan"),
    ({"scale": True}, r"Invalid scale: True"),
    ({"scale": 0.5, "sign": 1}, r"Invalid sign: 1; accepted: True or False"),
    ({"scale": 0.5, "reach": "before"}, r"Invalid reach: 'before'; accepted: 'after' or 'all'"),
    ({"scale": 0.5, "seed": 1.5}, r"Invalid seed: 1.5; accepted: an integer"),
])
def test_bad_arguments_are_refused_and_change_nothing(options, message):
    model, optimizer = build()
    trainable = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match=message):
        bcd.landscape_expansion(optimizer, **options)
    assert [p.requires_grad for p in model.parameters()] == trainable
    with pytest.raises(ValueError, match=r"Invalid optimizer: SGD"):
        bcd.landscape_expansion(torch.optim.SGD(model.parameters(), lr=0.1), scale=0.5)


def test_on_several_ranks_the_expansion_defers_and_its_step_waits_for_optimizer_step(monkeypatch):
    model, optimizer = build()
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; two-rank runs are in test_distributed.py
    with pytest.raises(ValueError, match=r"Invalid defer: False on several ranks; accepted: None or True"):
        bcd.landscape_expansion(optimizer, scale=0.5, defer=False)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["layers.1.weight", "layers.1.bias"]
    monkeypatch.delenv("WORLD_SIZE")
    expansion = bcd.landscape_expansion(optimizer, scale=0.5, defer=True)
    before = snapshot(model)
    CASES["mlp"].loss(model, 0).backward()
    CASES["mlp"].loss(model, 1).backward()  # two micro-batches: their gradients add up, nothing is stepped yet
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    summed = {n: p.grad.clone() for n, p in expansion.expanded.items()}
    optimizer.step()
    decay = optimizer.param_groups[0]["weight_decay"]
    for name, param in expansion.expanded.items():  # one step, from the sum, once
        torch.testing.assert_close(param.detach(), before[name] - 0.05 * (0.5 * summed[name].sign() + decay * before[name]))
        assert param.grad is None


def wide(dtype):
    """An MLP wide enough (64 x 64 layers) that a mean over a layer's elements is a measurement."""
    torch.manual_seed(0)
    model = MLP(width=64).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bcd.PrecisionNote)
        return model, bcd.BlockCoordinateOptimizer(model, lr=1e-4, switch_every=4, order_options={"start_block": 0})


def test_a_bf16_step_below_half_a_spacing_moves_the_weight_in_expectation():
    """1e-5 is far below half the bf16 spacing of these weights: to nearest, nothing would move; rounded
    stochastically, the mean change over a layer's weights is the step."""
    model, optimizer = wide(torch.bfloat16)
    bcd.landscape_expansion(optimizer, scale=0.1)  # sign steps of lr * scale = 1e-5
    layer = model.layers[1].weight
    before, grads = layer.detach().float().clone(), full_gradients(model, 0)["layers.1.weight"]
    spacing = torch.nextafter(layer.detach(), torch.full_like(layer.detach(), float("inf"))).float() - before
    coarse = spacing.abs() > 2.5e-5  # half a spacing above the step: rounded to nearest, these never move
    assert coarse.sum() > 3000
    train(model, optimizer, CASES["mlp"], 1)
    moved = ((layer.detach().float() - before) * -grads.sign().float())[coarse]  # along the step: 1e-5 expected
    spread = (moved.std() / moved.numel() ** 0.5).item()  # the standard error of the mean
    assert abs(moved.mean().item() - 1e-5) < 5 * spread
    assert (moved != 0).any() and spread < 1e-5 / 2  # the test can tell 1e-5 from 0


def test_bf16_expansion_draws_are_seeded_by_the_step_and_resume_exactly():
    def make():
        model, optimizer = wide(torch.bfloat16)
        return model, optimizer, bcd.landscape_expansion(optimizer, scale=0.5, reach="all", seed=3)

    model, optimizer, _ = make()
    train(model, optimizer, CASES["mlp"], 10)
    reference = snapshot(model)
    model, optimizer, expansion = make()
    train(model, optimizer, CASES["mlp"], 5)  # mid-visit (K = 4)
    saved = (copy.deepcopy(model.state_dict()), optimizer.state_dict())
    model, optimizer, expansion = make()
    model.load_state_dict(saved[0])
    optimizer.load_state_dict(saved[1])
    train(model, optimizer, CASES["mlp"], 5, start=5)
    assert all(torch.equal(p, reference[n]) for n, p in model.named_parameters())
    other, other_optimizer = wide(torch.bfloat16)
    bcd.landscape_expansion(other_optimizer, scale=0.5, reach="all", seed=4)
    train(other, other_optimizer, CASES["mlp"], 10)
    assert any(not torch.equal(p, reference[n]) for n, p in other.named_parameters())  # the seed matters


def test_large_tensors_are_stepped_in_chunks_with_the_same_arithmetic(monkeypatch):
    """A step is taken CPU_CHUNK elements at a time on a CPU (a 128K-row embedding's fp32 copy would be
    gigabytes): in fp32 the chunked step is the whole-tensor formula exactly."""
    monkeypatch.setattr(bcd.expansion, "CPU_CHUNK", 7)  # chunks that cut across rows
    model, optimizer = build()
    bcd.landscape_expansion(optimizer, scale=0.5, reach="all")
    before, grads = snapshot(model), full_gradients(model, 0)
    train(model, optimizer, CASES["mlp"], 1)
    decay = optimizer.param_groups[0]["weight_decay"]
    for name, param in model.named_parameters():
        if block_of(name) != "layers.1":
            expected = before[name] - 0.05 * (0.5 * grads[name].sign() + decay * before[name])
            torch.testing.assert_close(param.detach(), expected)


def test_bf16_chunks_draw_what_one_whole_tensor_draws(monkeypatch):
    """One generator per tensor, drawn chunk after chunk: the chunk size changes no weight, so resume and
    every rank agree whatever chunk a device uses."""
    def run(chunk):
        monkeypatch.setattr(bcd.expansion, "CPU_CHUNK", chunk)
        model, optimizer = wide(torch.bfloat16)
        bcd.landscape_expansion(optimizer, scale=0.5, reach="all", seed=3)
        train(model, optimizer, CASES["mlp"], 3)
        return snapshot(model)

    whole, chunked = run(2**30), run(1000)  # 1000 cuts the wide layers' rows
    assert all(torch.equal(whole[name], chunked[name]) for name in whole)
