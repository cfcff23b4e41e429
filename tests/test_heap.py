"""bcd.heap: the heap's free pages go back to the system during a CPU step, and nothing changes."""

from __future__ import annotations

import platform

import pytest
import torch

import bcd
from bcd import heap

GLIBC = platform.libc_ver()[0] == "glibc"


def test_release_runs_only_for_a_cpu_tensor():
    assert heap.release([]) is False
    assert heap.release([torch.empty(0, device="meta")]) is False
    assert heap.release([torch.zeros(3)]) is GLIBC


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
def test_every_cpu_step_releases_the_heap_and_the_update_is_unchanged(monkeypatch):
    """The trim runs twice a CPU step (at the block's first gradient in backward, and before the solver
    steps); the weights equal those of a run where it does nothing."""
    original, calls = heap.release, []

    def run(release) -> list[torch.Tensor]:
        monkeypatch.setattr(heap, "release", release)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)).to(torch.bfloat16)
        optimizer = bcd.BAdam(model, lr=1e-2, switch_every=1)
        for _ in range(4):
            model(torch.ones(4, 8, dtype=torch.bfloat16)).float().square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    trimmed = run(lambda tensors: calls.append(original(tensors)) or calls[-1])
    untouched = run(lambda tensors: False)
    assert calls == [True] * 8
    assert all(torch.equal(a, b) for a, b in zip(trimmed, untouched))
