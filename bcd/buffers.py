"""fp32 memory kept across block visits: master copies, one gradient, Adam's moments.

Allocating a block's fp32 tensors afresh at every switch costs time where it hurts most (page
faults on the CPU, allocator churn and fragmentation on CUDA) and gains nothing: the next block
needs about as much. :class:`Buffers` holds one flat fp32 tensor per kind and device, sized for
the largest block of the partition and grown if a later block needs more; a visit's tensors are
views into it. What a visit gets is the same as a fresh allocation would give (masters are
copied in, moments zeroed), so the arithmetic is unchanged.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence

import torch

from bcd import quantized
from bcd.cost import PREFILLED, solver_layout
from bcd.distributed import sharded

#: The kinds of buffer, and the :func:`bcd.lab.measure.measure` category each one counts in.
KINDS = {"masters": "master_copies", "gradient": "gradients", "moments": "solver_state"}


class Buffers:
    """Flat fp32 tensors by ``(kind, device)``, handed out as views and kept across visits.

    Args:
        planned: the size to allocate for each ``(kind, device)`` at its first use (the
            partition's largest need), so the buffer is allocated once.
    """

    def __init__(self, planned: Mapping[tuple[str, torch.device], int] | None = None) -> None:
        self.planned = dict(planned or {})
        self.flat: dict[tuple[str, torch.device], torch.Tensor] = {}

    def take(self, kind: str, device: torch.device, numel: int) -> torch.Tensor:
        """A 1-D fp32 view of ``numel`` elements of the ``kind`` buffer on ``device`` (contents undefined)."""
        key = (kind, torch.device(device))
        flat = self.flat.get(key)
        if flat is None or flat.numel() < numel:
            # Drop the old one first, so that growing never holds both.
            self.flat.pop(key, None)
            flat = self.flat[key] = torch.empty(max(numel, self.planned.get(key, 0)), device=device)
        return flat[:numel]

    def by_category(self) -> dict[str, list[torch.Tensor]]:
        """The buffers held, by :func:`bcd.lab.measure.measure` category."""
        held: dict[str, list[torch.Tensor]] = {}
        for (kind, _), flat in self.flat.items():
            held.setdefault(KINDS[kind], []).append(flat)
        return held


def views(flat: torch.Tensor, shapes: Sequence[torch.Size]) -> list[torch.Tensor]:
    """Consecutive views of ``flat`` with the given shapes."""
    out, offset = [], 0
    for shape in shapes:
        numel = shape.numel()
        out.append(flat[offset:offset + numel].view(shape))
        offset += numel
    return out


def _owns_state(solver: torch.optim.Optimizer) -> bool:
    """Whether bcd keeps ``solver``'s state in its buffers: torch's Adam or AdamW over plain fp32 tensors.

    The buffers are fp32: an fp64 parameter (its own master) keeps fp64 moments of the solver's making.
    """
    params = [p for g in solver.param_groups for p in g["params"]]
    return type(solver) in PREFILLED and all(p.dtype == torch.float32 and not sharded(p) for p in params)


def prefill(solver: torch.optim.Optimizer, buffers: Buffers, eight_bit: Collection[torch.Tensor] = ()) -> None:
    """Create ``solver``'s state in ``buffers`` (zeroed views), for torch's Adam and AdamW only.

    Other solvers, and sharded (DTensor) parameters, get their state at the first step, as usual.
    The tensors in ``eight_bit`` get zeroed 8-bit moments instead (:func:`bcd.quantized.zeros`).
    """
    if not _owns_state(solver):
        return
    # What the solver keeps per tensor, learnt once per group and device (bcd.cost.solver_layout).
    layouts = {}
    totals: dict[torch.device, int] = {}
    eight = {id(t) for t in eight_bit}
    for index, group in enumerate(solver.param_groups):
        for param in group["params"]:
            key = (index, param.device)
            if key not in layouts:
                layouts[key] = solver_layout(type(solver), None, group, param.device)
            if id(param) not in eight:
                totals[param.device] = totals.get(param.device, 0) + len(layouts[key].per_element) * param.numel()
    # One take per device, before any view is handed out: growing later would strand earlier views.
    flats = {device: buffers.take("moments", device, numel) for device, numel in totals.items()}
    offsets = dict.fromkeys(flats, 0)
    for index, group in enumerate(solver.param_groups):
        for param in group["params"]:
            layout = layouts[(index, param.device)]
            state = solver.state[param] = layout.fresh()
            if id(param) in eight:
                state.update(quantized.zeros(layout.per_element, param.shape, param.device))
                continue
            for key in layout.per_element:
                start = offsets[param.device]
                offsets[param.device] = start + param.numel()
                state[key] = flats[param.device][start:start + param.numel()].view(param.shape).zero_()


def rehome(solver: torch.optim.Optimizer, buffers: Buffers) -> None:
    """Move a loaded solver state back into ``buffers`` (``load_state_dict`` allocates its own tensors);
    8-bit moments stay where they are (:func:`bcd.quantized.load_into`)."""
    if not _owns_state(solver):
        return
    loaded: Iterable[tuple[torch.Tensor, dict]] = [(p, solver.state[p]) for g in solver.param_groups for p in g["params"]
                                                  if p in solver.state and not quantized.is_quantized(solver.state[p])]
    offsets: dict[torch.device, int] = {}
    plan = []
    for param, state in loaded:
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.ndim:
                start = offsets.get(value.device, 0)
                offsets[value.device] = start + value.numel()
                plan.append((state, key, value, start))
    flats = {device: buffers.take("moments", device, numel) for device, numel in offsets.items()}
    for state, key, value, start in plan:
        view = flats[value.device][start:start + value.numel()].view(value.shape)
        state[key] = view.copy_(value)
