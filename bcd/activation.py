"""The active block of a model: what is trainable, its gradient hooks, its master copies and its solver.

Activating a block unfreezes its parameters (``requires_grad=True``) and freezes the previous
one's (``requires_grad=False``, ``grad=None``), so autograd computes no weight gradient for
frozen blocks and stops below the lowest active parameter. A row block's rows become a parameter
of their own whose backward computes only their gradient (:mod:`bcd.rowgrad`); where that does
not apply (several ranks, a tied or custom module) the whole tensor is made trainable and the
other rows' gradient zeroed as backward produces it, so what clipping and logging see is the
block's gradient either way. The master copies and the inner solver are built at the visit's
first step, from the weights as they are then, in fp32 buffers kept across visits
(:mod:`bcd.buffers`); the solver is dropped at the switch (no ``gc.collect()``, no
``empty_cache()``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from bcd import averaging, distributed, heap, quantized, rowgrad
from bcd.blocks import Block, parse_entry
from bcd.buffers import Buffers, prefill, rehome
from bcd.precision import MasterCopies


def _zero_other_rows(spans: list[tuple[int, int]]) -> Callable[[torch.Tensor], None]:
    """A post-accumulate-grad hook that zeroes every gradient row outside ``spans``."""
    spans = sorted(spans)

    def hook(param: torch.Tensor) -> None:
        if param.grad is None:
            return
        with torch.no_grad():
            start = 0
            for a, b in spans + [(param.shape[0], param.shape[0])]:
                if start < a:
                    param.grad[start:a].zero_()
                start = b
    return hook


def _release_heap(block: weakref.ref[ActiveBlock], param: torch.Tensor) -> None:
    """The heap's free pages back to the system at the first of the block's gradients in a step (:mod:`bcd.heap`)."""
    active = block()
    if active is not None and not active.released:
        active.released = heap.release([param])


def remove_all(handles: list[RemovableHandle]) -> None:
    """Remove every hook in ``handles`` and empty the list."""
    for handle in handles:
        handle.remove()
    handles.clear()


class ActiveBlock:
    """One model's trainable block.

    Args:
        candidates: every parameter that may be trained, by qualified name.
        data_parallel: average each active gradient across ranks as backward produces it.
        deferred: returns True while ``requires_grad`` must not be touched (every candidate stays
            trainable until a wrapper's first forward, see :class:`bcd.distributed.WrapperWait`).
        buffers: the fp32 buffers kept across visits.
        lean: keep no fp32 master copies (:class:`bcd.precision.MasterCopies`); ``"8bit"``: and 8-bit moments.
        row_owners: the row-split tensors whose row blocks compute only their rows' gradient, with
            their modules (:func:`bcd.rowgrad.owners`).
    """

    def __init__(self, candidates: dict[str, nn.Parameter], data_parallel: bool, deferred: Callable[[], bool],
                 buffers: Buffers | None = None, lean: bool | str = False,
                 row_owners: Mapping[str, nn.Module] | None = None) -> None:
        self.candidates = candidates
        self.row_owners = dict(row_owners or {})
        #: The visit's rows registered as parameters of their own, by tensor name.
        self.row_gradients: dict[str, rowgrad.RowGradient] = {}
        self.lean = lean
        #: Each candidate's fixed position, which seeds its stochastic rounding in the lean precision.
        self.index = {name: i for i, name in enumerate(candidates)}
        self.data_parallel = data_parallel
        self.deferred = deferred
        self.buffers = buffers if buffers is not None else Buffers()
        self.block: Block | None = None
        self.params: list[nn.Parameter] = []
        self.masters: MasterCopies | None = None
        self.solver: torch.optim.Optimizer | None = None
        self.solver_group_index: list[int] = []
        self.sync_handles: list[RemovableHandle] = []
        #: Post-accumulate-grad hooks on the block's tensors: zeroing other rows, the heap's release.
        self.grad_handles: list[RemovableHandle] = []
        #: Whether this step's backward already handed the heap back (at the block's first gradient).
        self.released = False
        weakref.finalize(self, remove_all, self.sync_handles)
        weakref.finalize(self, remove_all, self.grad_handles)
        weakref.finalize(self, rowgrad.release_all, self.row_gradients)

    def row_params(self) -> list[nn.Parameter]:
        """The visit's rows registered as parameters of their own (:mod:`bcd.rowgrad`)."""
        return [row_gradient.rows for row_gradient in self.row_gradients.values()]

    def zero_row_grads(self, set_to_none: bool = True) -> None:
        """Drop (or zero) the gradient of the visit's rows parameters, as ``zero_grad`` does a parameter's."""
        for rows in self.row_params():
            if rows.grad is not None and set_to_none:
                rows.grad = None
            elif rows.grad is not None:
                rows.grad.detach_().zero_()

    def freeze_all(self) -> None:
        """Freeze every candidate."""
        for param in self.candidates.values():
            param.requires_grad_(False)
            param.grad = None

    def release(self) -> None:
        """Freeze the block and drop its solver and master copies."""
        for param in self.params if not self.deferred() else ():
            param.requires_grad_(False)
            param.grad = None
        remove_all(self.sync_handles)
        remove_all(self.grad_handles)
        rowgrad.release_all(self.row_gradients)
        self.params, self.solver, self.masters = [], None, None

    def activate(self, block: Block) -> None:
        """Release the current block and make ``block`` trainable, with fresh solver state to come."""
        self.release()
        self.block = block
        self._unfreeze()
        if self.data_parallel:
            self.sync_handles.extend(averaging.average_gradients(self.params))

    def _unfreeze(self) -> None:
        """The block's parameters, read from the candidates, made trainable (unless deferred): each
        tensor, or for a row block whose module allows it, its rows as a parameter of their own."""
        deferred = self.deferred()
        spans = self.block.row_spans
        by_rows = {n: s[0] for n, s in spans.items() if n in self.row_owners and len(s) == 1 and not deferred}
        remove_all(self.grad_handles)
        rowgrad.release_all(self.row_gradients)
        self.params = []
        for name in self.block.tensor_names:
            if name in by_rows:
                # The weight stays frozen, also where something else (the expansion) had made it trainable.
                self.candidates[name].requires_grad_(False)
                self.candidates[name].grad = None
                self.row_gradients[name] = rowgrad.RowGradient(self.row_owners[name], by_rows[name])
                self.params.append(self.row_gradients[name].rows)
                continue
            param = self.candidates[name]
            self.params.append(param)
            if not deferred:
                param.requires_grad_(True)
            if name in spans:
                self.grad_handles.append(param.register_post_accumulate_grad_hook(_zero_other_rows(spans[name])))
        # When backward reaches the block, the activations it freed above it go back to the system
        # before the rest of the block's gradients are allocated (bcd.heap): once per step.
        # A weak reference: the parameters' hooks must not keep this block (and its optimizer) alive.
        this = weakref.ref(self)
        self.grad_handles.extend(p.register_post_accumulate_grad_hook(lambda param: _release_heap(this, param))
                                 for p in self.params if p.device.type == "cpu")

    def adopt(self, current: Mapping[str, nn.Parameter]) -> None:
        """Re-read the candidates by name (a wrapper replaced them), then freeze all but the block."""
        self.candidates = distributed.adopt(self.candidates, current)
        self.freeze_all()
        self._unfreeze()

    def ensure_solver(
        self,
        groups_for: Callable[[dict[str, torch.Tensor]], tuple[list[dict[str, Any]], list[int]]],
        factory: Callable[..., torch.optim.Optimizer],
        options: Mapping[str, Any],
    ) -> None:
        """Build the master copies and the solver from the block's current weights, once per visit.

        Args:
            groups_for: the solver's groups over the tensors it updates (by name), and each
                group's outer index.
            factory: the solver factory; ``options`` its keyword options.
        """
        if self.solver is not None:
            return
        names: Sequence[str] = self.block.param_names
        parsed = [parse_entry(entry) for entry in names]
        entries = [(entry, self.candidates[name], rows) for entry, (name, rows) in zip(names, parsed)]
        row_params = {i: self.row_gradients[name].rows for i, (name, _) in enumerate(parsed) if name in self.row_gradients}
        self.masters = MasterCopies(entries, self.buffers, self.lean, [self.index[name] for name, _ in parsed], row_params)
        groups, self.solver_group_index = groups_for(dict(zip(names, self.masters.solver_params)))
        self.solver = factory(groups, **options)
        prefill(self.solver, self.buffers, self.masters.quantized_params())

    def load_solver_state(self, solver_state: Mapping[str, Any], masters: Mapping[str, torch.Tensor]) -> None:
        """Load a checked solver state and master copies into this visit's solver (built first)."""
        quantized.load_into(self.solver, distributed.reshard_solver_state(solver_state, self.solver))
        rehome(self.solver, self.buffers)
        self.masters.load_state_dict(masters)

    def check_unchanged(self) -> None:
        """Refuse to step when a parameter's dtype or device changed since the visit's solver was built."""
        if self.masters is not None:
            self.masters.check_unchanged()

    def step(self, step: int = 0) -> None:
        """One solver step on the masters from the block's gradients, rounded back into the model
        (``step``, the optimizer's global step, seeds the lean precision's rounding). On the CPU the
        heap's free pages (what backward freed after the block's first gradient) go back to the system
        first (:mod:`bcd.heap`)."""
        heap.release(self.masters.params)
        self.released = False
        self.masters.step(self.solver, step)
