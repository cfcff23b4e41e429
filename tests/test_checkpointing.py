"""Activation checkpointing with frozen blocks: savings kept, results unchanged, reentrant refused."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import bcd

from conftest import CASES, tiny_llama


def backward_flops(model, ids) -> int:
    loss = model(input_ids=ids, labels=ids).loss
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    return counter.get_total_flops()


def test_checkpointing_enabled_after_the_optimizer_keeps_the_savings():
    torch.manual_seed(0)
    model = tiny_llama(layers=4)
    optimizer = bcd.BAdam(model, lr=1e-3, order="descending", switch_every=100,
                          start_block="model.layers.3")  # top layer active
    ids = torch.randint(0, 64, (2, 12))
    without = backward_flops(model, ids)
    model.zero_grad()
    # As the Trainer does: checkpointing switched on after the optimizer exists, with the
    # transformers default that also installs the input-require-grads hook.
    model.gradient_checkpointing_enable()
    with_checkpointing = backward_flops(model, ids)
    assert not getattr(model, "_require_grads_hooks", None)
    # Backward recomputes the top layer's forward (at most its backward's cost again) and
    # reaches nothing below it; through the frozen layers it would be several times more.
    assert without < with_checkpointing <= 2 * without
    optimizer.zero_grad()


def train_steps(use_checkpointing: bool, steps: int = 6) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = tiny_llama(layers=3)
    if use_checkpointing:
        model.gradient_checkpointing_enable()
    optimizer = bcd.BAdam(model, lr=1e-2, switch_every=2, order="ascending", include_embedding=True, include_head=True)
    for step in range(steps):
        CASES["llama"].loss(model, step).backward()
        optimizer.step()
        optimizer.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_checkpointing_gives_the_same_parameters():
    plain, checkpointed = train_steps(False), train_steps(True)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=1e-5, msg=name)
    torch.manual_seed(0)
    initial = dict(tiny_llama(layers=3).named_parameters())
    assert sum(not torch.equal(plain[n], initial[n]) for n in plain) > len(plain) // 2  # it did train


def test_reentrant_checkpointing_is_refused_before_anything_changes():
    model = tiny_llama(layers=2)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match=r"Reentrant activation checkpointing .*'use_reentrant': False"):
        bcd.BAdam(model)
    assert all(p.requires_grad for p in model.parameters())


def test_reentrant_checkpointing_switched_on_later_fails_at_the_next_forward():
    model = tiny_llama(layers=2)
    optimizer = bcd.BAdam(model)  # noqa: F841 - a dropped optimizer removes its guard with its other hooks
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match=r"Reentrant activation checkpointing"):
        CASES["llama"].loss(model, 0)
