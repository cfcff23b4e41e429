"""bcd.BAdam is the documented composition of the core's pieces, and beats the reference's defects."""

from __future__ import annotations

import pytest
import torch

import bcd
from bcd import testing

from conftest import CASES, tiny_llama, train


def test_badam_equals_its_hand_built_composition():
    case = CASES["llama"]
    a_model, b_model = case.model(dtype=torch.bfloat16), case.model(dtype=torch.bfloat16)
    a = bcd.BAdam(a_model, lr=1e-3, switch_every=2, seed=4, weight_decay=0.01)
    b = bcd.BlockCoordinateOptimizer(
        b_model, lr=1e-3, switch_every=2,
        partitioner="layer", partitioner_options={"include_embedding": True, "include_head": True},
        order="random", order_options={"seed": 4},
        solver="adamw", solver_options={"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01},
    )
    assert a.blocks == b.blocks and a.block_order == b.block_order
    assert train(a_model, a, case, 7) == train(b_model, b, case, 7)
    for (name, p), (_, q) in zip(a_model.named_parameters(), b_model.named_parameters()):
        assert torch.equal(p, q), name


def test_badam_defaults_are_the_documented_ones():
    model = CASES["gpt2"].model()
    optimizer = bcd.BAdam(model)
    train(model, optimizer, CASES["gpt2"], 1)
    # Every parameter: the (tied) embedding, the layers, the final norm.
    assert [b.name for b in optimizer.blocks] == ["embedding", "transformer.h.0", "transformer.h.1", "head"]
    assert set(optimizer.blocks.tensor_names) == {n for n, _ in model.named_parameters()}
    assert optimizer.switch_every == 100
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (1e-5, (0.9, 0.999), 1e-8, 0.0)
    assert type(optimizer.solver) is torch.optim.AdamW


def test_badam_trains_models_whose_layers_are_not_called_layers():
    for name, layers in (("gpt2", ["transformer.h.0", "transformer.h.1"]), ("bert", ["bert.encoder.layer.0", "bert.encoder.layer.1"])):
        case = CASES[name]
        model = case.model()
        optimizer = bcd.BAdam(model, lr=1e-2, switch_every=1, order="ascending")
        assert [b.name for b in optimizer.blocks if b.name not in ("embedding", "head")] == layers
        # Every step moves the active block and nothing else, two block-epochs long.
        testing.check_invariants(model, optimizer, case.loss, steps=2 * len(optimizer.blocks))
        assert optimizer.block_epoch == 2


def test_a_misspelt_keyword_names_badams_own_and_adamws():
    with pytest.raises(ValueError, match=r"Unknown keyword\(s\) \['swich_every'\] for bcd.BAdam \(did you mean 'switch_every'\?\); "
                                         r"accepted: BAdam's own \(lr, switch_every, .*\) or torch.optim.AdamW's \(amsgrad"):
        bcd.BAdam(tiny_llama(layers=2), swich_every=3)


def test_switch_every_auto_makes_three_block_epochs_over_the_run():
    model = tiny_llama(layers=2)  # D = 4: embedding, 2 layers, head
    assert bcd.BAdam(model, switch_every="auto", total_steps=192).switch_every == 16
    assert bcd.BAdam(model, switch_every="auto", total_steps=5).switch_every == 1
    assert bcd.BAdam(model, switch_every="auto", total_steps=192, include_embedding=False).switch_every == 21


@pytest.mark.parametrize("kwargs, match", [
    ({"switch_every": "auto"}, r"switch_every: 'auto' needs the run length; accepted: switch_every='auto' with total_steps"),
    ({"switch_every": "auto", "total_steps": 0}, r"Invalid total_steps: 0; accepted: an integer >= 1"),
    ({"expansion": "before"}, r"Invalid expansion: 'before'; accepted: 'auto' \(the default: 'all' with total_steps\), None, 'after' or 'all'"),
    ({"expansion": "all", "expansion_scale": -1}, r"Invalid scale: -1"),
])
def test_refused_recipe_options_change_nothing(kwargs, match):
    model = tiny_llama(layers=2)
    with pytest.raises(ValueError, match=match):
        bcd.BAdam(model, **kwargs)
    assert all(p.requires_grad for p in model.parameters())


def test_the_expansion_as_an_option_and_every_parameter_trained_within_one_block_epoch():
    """BAdam's defaults train every parameter (embedding and head included) within one block-epoch; with
    expansion="all" every parameter moves at every step."""
    case = CASES["llama"]
    for expansion, steps in ((None, None), ("all", 1)):
        model = case.model()
        optimizer = bcd.BAdam(model, lr=1e-2, switch_every=1, expansion=expansion)
        assert (optimizer.expansion is None) == (expansion is None)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        train(model, optimizer, case, steps or len(optimizer.blocks))
        assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters()), expansion


def test_the_run_length_turns_on_the_recipe_and_every_bf16_parameter_moves_at_the_first_step(monkeypatch):
    """bcd.BAdam(model, lr, total_steps=N): K for three block-epochs and the expansion over every block;
    without N, Algorithm 1; on FSDP2-sharded parameters, no expansion (they are not expanded)."""
    case = CASES["llama"]
    model = case.model().to(torch.bfloat16)
    optimizer = bcd.BAdam(model, lr=4e-2, total_steps=12)  # D = 4: K = 12 // (3 x 4) = 1; a sign step of 1e-2
    assert (optimizer.switch_every, optimizer.expansion.reach) == (1, "all")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, optimizer, case, 1)
    # The active block by its solver, every other one by a sign step stochastically rounded to bf16.
    assert [n for n, p in model.named_parameters() if torch.equal(p, before[n])] == []
    optimizer.close()
    paper = bcd.BAdam(case.model())
    assert (paper.switch_every, paper.expansion) == (100, None)
    paper.close()
    monkeypatch.setattr(bcd.distributed, "sharded", lambda tensor: True)
    assert bcd.BAdam(case.model(), total_steps=12).expansion is None
