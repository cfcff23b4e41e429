"""Live memory: what a model and its optimizer really hold, by category, from their tensor storages.

Each storage counts once, in the first category that holds it, so a tensor shared by two
categories is not counted twice; the figures equal the sum of the tensors held (invariant 6).
``bcd.memory`` re-exports :func:`measure` beside its estimates.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import torch
from torch import nn


@attrs.frozen(kw_only=True)
class Breakdown:
    """Bytes by category."""

    weights: int = 0
    gradients: int = 0
    solver_state: int = 0
    master_copies: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.solver_state + self.master_copies



@attrs.frozen(kw_only=True)
class LiveMemory:
    """What a live model and optimizer really hold, from their deduplicated tensor storages.

    Attributes:
        parameters: bytes of parameter storage by dtype name (``"bfloat16"``, ...).
        gradients: bytes of gradient storage (model parameters' and master copies').
        solver_state: bytes of the solver's state tensors.
        master_copies: bytes of fp32 master copies.
        cuda_peak: ``torch.cuda.max_memory_allocated()`` when CUDA is in use, else None.
    """

    parameters: Mapping[str, int]
    gradients: int
    solver_state: int
    master_copies: int
    cuda_peak: int | None = None

    @property
    def breakdown(self) -> Breakdown:
        return Breakdown(weights=sum(self.parameters.values()), gradients=self.gradients,
                         solver_state=self.solver_state, master_copies=self.master_copies)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The shard this process holds, for a DTensor; the tensor itself otherwise."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def measure(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> LiveMemory:
    """Bytes really held by ``model`` and ``optimizer`` (a bcd optimizer or any torch one).

    Each storage counts once, in the first category that holds it: parameters, master copies
    (tensors the solver updates that are not model parameters), gradients, solver state, then
    bcd's buffers kept across visits (:mod:`bcd.buffers`) by their kind. Sharded parameters count
    their local shard.
    """
    seen: set[tuple[str, int]] = set()

    def claim(tensors: Iterable[Any]) -> int:
        total = 0
        for tensor in tensors:
            if not isinstance(tensor, torch.Tensor):
                continue
            tensor = _local(tensor)
            if tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            key = (str(tensor.device), storage.data_ptr())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        return total

    parameters: dict[str, int] = {}
    for param in model.parameters():
        label = str(param.dtype).removeprefix("torch.")
        parameters[label] = parameters.get(label, 0) + claim([param])
    # bcd's inner solver, the reference badam's base optimizer, or the optimizer itself.
    solver = getattr(optimizer, "solver", None) or getattr(optimizer, "base_optimizer", None) or optimizer
    model_params = {id(p) for p in model.parameters()}
    # What the solver updates that is not a model parameter is a master copy (fp32 copies of
    # bf16 weights, in bcd and in other mixed-precision optimizers alike).
    masters = [p for group in (solver.param_groups if solver is not None else []) for p in group["params"]
               if id(p) not in model_params]
    master_bytes = claim(masters)
    grads = [p.grad for p in model.parameters()] + [m.grad for m in masters]
    gradient_bytes = claim(grads)
    state_bytes = 0
    if solver is not None:
        state_bytes = claim(t for state in solver.state.values() for t in state.values())
    # bcd's fp32 buffers are held across visits, also between a switch and the next step.
    kept = optimizer.buffers.by_category() if hasattr(getattr(optimizer, "buffers", None), "by_category") else {}
    master_bytes += claim(kept.get("master_copies", ()))
    gradient_bytes += claim(kept.get("gradients", ()))
    state_bytes += claim(kept.get("solver_state", ()))
    cuda_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return LiveMemory(parameters=parameters, gradients=gradient_bytes, solver_state=state_bytes,
                      master_copies=master_bytes, cuda_peak=cuda_peak)
