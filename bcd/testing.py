"""Conformance checks for plugin authors: call them from your own tests on your partitioner or ordering.

Each check raises ``AssertionError`` with what broke. They are the checks bcd's own test suite
runs over every registered plugin::

    from bcd import testing

    def test_my_partitioner():
        testing.check_partitioner(MyPartitioner(), build_tiny_model())

    def test_my_ordering():
        testing.check_ordering(MyOrdering(seed=3), num_blocks=5)

    def test_trains_like_bcd_says():
        testing.check_invariants(model, bcd.BlockCoordinateOptimizer(model, partitioner=MyPartitioner()), loss_fn)
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import torch
from torch import nn

from bcd import rowgrad
from bcd.blocks import Partition, check_rows
from bcd.construction import candidates_of
from bcd.contracts import check
from bcd.observe import Observations, observes
from bcd.optimizer import BlockCoordinateOptimizer


def free_port() -> int:
    """A free TCP port on the loopback interface, for ``MASTER_PORT`` in a multi-rank test."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_partitioner(partitioner: object, model: nn.Module, epochs: int = 3) -> list[Partition]:
    """A partitioner honours its contract on ``model``; returns its partitions for ``epochs`` block-epochs.

    The candidates are the model's trainable parameters, or, when an optimizer drives the model
    (and has frozen its inactive blocks), the ones that optimizer was built over.

    Checked: the Protocol (``partition``, ``dynamic``); a :class:`bcd.Partition` of candidate
    names only (disjoint and non-empty blocks, which ``Partition`` itself enforces); the same
    result when asked twice (a pure function); a static partitioner's result does not depend on
    the block-epoch; a dynamic one's covers the same parameters in as many blocks every time;
    and it does not read or change ``requires_grad``.
    """
    check("partitioner", partitioner)
    # An optimizer driving the model has frozen all but its active block: use what it saw.
    params = candidates_of(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    partitions = []
    for epoch in range(epochs):
        first = partitioner.partition(model, params, epoch)
        assert isinstance(first, Partition), f"block-epoch {epoch}: got {type(first).__name__}, not a bcd.Partition"
        unknown = set(first.tensor_names) - set(params)
        assert not unknown, f"block-epoch {epoch}: not candidates: {sorted(unknown)[:5]}"
        check_rows(first, params)
        again = partitioner.partition(model, params, epoch)
        assert again.fingerprint() == first.fingerprint(), f"block-epoch {epoch}: not a pure function of its inputs"
        if partitions:
            base = partitions[0]
            if not partitioner.dynamic:
                assert first.fingerprint() == base.fingerprint(), f"static, yet block-epoch {epoch} differs from 0"
            assert set(first.param_names) == set(base.param_names) and len(first) == len(base), (
                f"block-epoch {epoch}: covers other parameters or another number of blocks than block-epoch 0"
            )
        partitions.append(first)
    for name, param in model.named_parameters():
        assert param.requires_grad == flags[name], f"the partitioner changed requires_grad of {name}"
    victim = next(iter(params.values()))
    # Flip one candidate's requires_grad and ask again: the partition must not read it.
    victim.requires_grad_(not victim.requires_grad)
    try:
        assert partitioner.partition(model, params, 0).fingerprint() == partitions[0].fingerprint(), (
            "the partition changed when a candidate's requires_grad changed: it must not read requires_grad"
        )
    finally:
        victim.requires_grad_(not victim.requires_grad)
    return partitions


def check_ordering(ordering: object, num_blocks: int, epochs: int = 4) -> list[list[int]]:
    """An ordering honours its contract for ``num_blocks`` blocks; returns its orders for ``epochs`` block-epochs.

    Checked: the Protocol (``order``); every order non-empty with indices in ``0 ... num_blocks - 1``;
    the same order when asked twice (what exact resume relies on). An observing ordering is asked
    with nothing observed at block-epoch 0 and with every block observed (norms 1 ... D) after.
    """
    check("ordering", ordering)
    orders = []
    for epoch in range(epochs):
        observed = (Observations.empty(num_blocks) if epoch == 0 else
                    Observations(grad_norm=[1.0 + b for b in range(num_blocks)], visits=[epoch] * num_blocks))
        args = (num_blocks, epoch, observed) if observes(ordering) else (num_blocks, epoch)
        order = [int(i) for i in ordering.order(*args)]
        assert order, f"block-epoch {epoch}: empty order"
        assert all(0 <= i < num_blocks for i in order), f"block-epoch {epoch}: {order} has indices outside 0 ... {num_blocks - 1}"
        assert [int(i) for i in ordering.order(*args)] == order, f"block-epoch {epoch}: not a pure function"
        orders.append(order)
    return orders


def check_invariants(
    model: nn.Module,
    optimizer: BlockCoordinateOptimizer,
    loss: Callable[[nn.Module, int], torch.Tensor],
    steps: int | None = None,
) -> None:
    """Train ``steps`` steps and check bcd's invariants at each (by default three block-epochs' worth).

    Checked at every step: only the active block requires grad and receives a gradient (a row
    block's tensor either itself, or through its rows registered as :data:`bcd.rowgrad.ROWS`,
    whose gradient then has the rows' shape); only its parameters change, and they do; inactive
    parameters and the inactive rows of a row block are bit-identical; the solver and the master
    copies exist for the active block only, and not yet right after a switch.

    Args:
        model: the model the optimizer was built over.
        optimizer: the optimizer, before its first step.
        loss: ``loss(model, step)`` returns a scalar loss for that step's batch.
        steps: how many steps; default ``3 * K * D``.
    """
    params = {n: p for n, p in model.named_parameters() if not rowgrad.is_rows(n)}
    steps = steps if steps is not None else 3 * optimizer.switch_every * len(optimizer.blocks)
    previous_block, previous_solver = None, None
    for step in range(steps):
        active = set(optimizer.active_block.tensor_names)
        rows = optimizer.active_block.row_spans
        by_rows = rowgrad.registered(model)
        assert set(by_rows) <= set(rows), f"step {step}: rows registered for {sorted(set(by_rows) - set(rows))}"
        for name, param in params.items():
            trainable = param.requires_grad or (name in by_rows and by_rows[name].requires_grad)
            assert trainable == (name in active), f"step {step}: {name} requires_grad={param.requires_grad}"
        if optimizer.active_block != previous_block:
            assert optimizer.solver is None and optimizer.master_copies is None, f"step {step}: state kept across a switch"
        if optimizer.solver is not None:
            assert optimizer.solver is previous_solver, f"step {step}: the solver was rebuilt within a visit"
            solver_params = {id(t) for t in optimizer.master_copies.solver_params}
            assert all(id(t) in solver_params for t in optimizer.solver.state), f"step {step}: state outside the block"
            assert {id(p) for p in optimizer.master_copies.params} == {id(params[n]) for n in active}
        previous_block = optimizer.active_block
        before = {n: p.detach().clone() for n, p in params.items()}
        loss(model, step).backward()
        for name, param in params.items():
            assert param.grad is None or name in active, f"step {step}: frozen {name} has a gradient"
        for name, param in by_rows.items():
            (a, b), = rows[name]
            assert params[name].grad is None, f"step {step}: {name} has a whole-tensor gradient beside its rows'"
            assert param.grad is None or param.grad.shape[0] == b - a, f"step {step}: the rows of {name} have a wider gradient"
        optimizer.step()
        optimizer.zero_grad()
        previous_solver = optimizer.solver
        changed = {n for n, p in params.items() if not torch.equal(p, before[n])}
        assert changed <= active, f"step {step}: inactive parameters changed: {sorted(changed - active)[:5]}"
        for name, spans in rows.items():
            keep = torch.ones(params[name].shape[0], dtype=torch.bool)
            for a, b in spans:
                keep[a:b] = False
            assert torch.equal(params[name][keep], before[name][keep]), f"step {step}: inactive rows of {name} changed"
        assert changed, f"step {step}: the active block {optimizer.active_block.name} did not move"
