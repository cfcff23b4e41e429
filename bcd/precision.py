"""fp32 master copies of the active block, and the step that streams its gradients through them.

With the model in bf16/fp16, the active block's parameters (or rows of them, for a row block)
get fp32 copies; the inner solver updates those, from gradients cast to fp32, and the result is
written back to the model rounded to its dtype. fp32 (and fp64) parameters are their own master:
the solver updates them (or a view of their rows) in place.

Streaming. torch's optimizers update each tensor from its own gradient and state alone, so the
solver can be stepped one tensor at a time (the others' gradients unset, which torch skips) with
the same arithmetic as one step over all. bcd does that for ``torch.optim`` solvers: each bf16
gradient is cast into one reused fp32 buffer, stepped, rounded back and freed before the next,
so the block never holds its whole fp32 gradient. For Adam and AdamW, whose state bcd creates
itself (:mod:`bcd.buffers`), a large tensor is even stepped in row chunks of at most
:data:`bcd.cost.GRADIENT_CHUNK` elements (views of its master and moments, the step count advanced once),
so the fp32 gradient buffer is 16 MB whatever the model. For a block of ``m`` parameters the
peak is then ``2m`` (bf16 gradients) ``+ 4m`` (masters) ``+ 8m`` (Adam's moments) and one
chunk: under the paper's ``16m``. Solvers that are not torch's are stepped once over the
whole block, with its whole fp32 gradient.

Lean precision (``lean=True``, Adam and AdamW): no fp32 copies are kept. Each chunk of a
low-precision entry's rows is copied into fp32 scratch (one chunk, reused), stepped with views of
its moments, and written back to the model stochastically rounded (:mod:`bcd.rounding`, seeded by
the optimizer step, the tensor and the row, so a resumed run rounds as the uninterrupted one):
:math:`2m + 8m` and two chunks. The update survives rounding in expectation, not exactly: a weight
moves by a multiple of its bf16 spacing at each step, with the right mean. With ``lean="8bit"``
the moments of those entries are kept in 8 bits too (:mod:`bcd.quantized`): each chunk's are
dequantized for its step and quantized back, :math:`2m + 2m` and a few chunks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from bcd import cost, quantized, rounding
from bcd.buffers import Buffers, views
from bcd.cost import PREFILLED, chunk_rows, keeps_master, needs_master, quantizes, streams
from bcd.distributed import like, sharded


def _rows(tensor: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor:
    return tensor if rows is None else tensor[rows[0]:rows[1]]


class MasterCopies:
    """The tensors the inner solver updates for one block: fp32 copies, parameters or views of their rows.

    Works for plain tensors and for sharded DTensors (whole tensors only) alike: it only uses
    ``.to``, ``.copy_``, slicing and ``.grad``.

    Args:
        entries: ``(entry name, parameter, row range or None)`` for each entry of the block.
        buffers: where low-precision masters live across visits; None allocates them afresh.
        lean: keep no fp32 copies (see the module docstring); needs ``buffers`` and Adam or AdamW.
            ``"8bit"``: and keep the moments of those entries in 8 bits (:mod:`bcd.quantized`).
        indices: each entry's tensor index among the candidates, which seeds its rounding (lean).
        row_params: for a row entry whose rows are a parameter of their own (:mod:`bcd.rowgrad`), by
            entry index: that parameter, whose ``.grad`` is the entry's gradient (the tensor has none).
    """

    def __init__(self, entries: Sequence[tuple[str, nn.Parameter, tuple[int, int] | None]],
                 buffers: Buffers | None = None, lean: bool | str = False, indices: Sequence[int] = (),
                 row_params: Mapping[int, torch.Tensor] | None = None) -> None:
        self.names = [name for name, _, _ in entries]
        self.row_params = dict(row_params or {})
        self.rows = [rows for _, _, rows in entries]
        self.sources = [param for _, param, _ in entries]
        #: The distinct parameters the block touches.
        self.params = list({id(p): p for p in self.sources}.values())
        #: What each parameter was when the visit's solver was built: a step refuses any change.
        self.built_as = {id(p): (p.dtype, p.device) for p in self.params}
        self.buffers = buffers
        self.indices = list(indices) or list(range(len(entries)))
        #: Entries stepped in fp32 scratch chunks and rounded back, with a stand-in as the solver's tensor:
        #: a zero-stride fp32 view of one element, of the entry's shape (its moments are real).
        self.lean = {i for i, p in enumerate(self.sources) if needs_master(p) and not keeps_master(p, lean)}
        #: Lean entries whose moments are kept in 8 bits (``lean="8bit"``).
        self.quantized = {i for i in self.lean if quantizes(self.sources[i], _rows(self.sources[i], self.rows[i]).numel(), lean)}
        zero = {p.device: torch.zeros((), device=p.device) for p in self.sources}  # one element per device, shared
        stand_ins = {i: zero[self.sources[i].device].expand(_rows(self.sources[i], self.rows[i]).shape) for i in self.lean}
        low = [i for i, p in enumerate(self.sources) if needs_master(p) and i not in self.lean]
        shapes = [_rows(self.sources[i], self.rows[i]).shape for i in low]
        copies: list[torch.Tensor] = []
        if low and buffers is not None and not self.lean and not any(sharded(self.sources[i]) for i in low):
            device = self.sources[low[0]].device
            if all(self.sources[i].device == device for i in low):
                copies = views(buffers.take("masters", device, sum(s.numel() for s in shapes)), shapes)
                for view, i in zip(copies, low):
                    view.copy_(_rows(self.sources[i].detach(), self.rows[i]))
        if low and not copies:
            copies = [_rows(self.sources[i].detach(), self.rows[i]).to(torch.float32) for i in low]
        by_index = {**dict(zip(low, copies)), **stand_ins}
        self.solver_params: list[torch.Tensor] = [
            by_index[i] if i in by_index else (p if rows is None else p.detach()[rows[0]:rows[1]])
            for i, (p, rows) in enumerate(zip(self.sources, self.rows))
        ]

    def check_unchanged(self) -> None:
        """Refuse a parameter whose dtype or device changed since the visit began (``model.to(...)`` mid-visit).

        The solver's state and the master copies were made for the old dtype: stepping on would
        raise half-way or, for bf16 -> fp32, update copies the model no longer reads.

        Raises:
            ValueError: naming the parameter, both dtypes and devices, and what to do instead.
        """
        for index, param in enumerate(self.sources):
            was = self.built_as[id(param)]
            if (param.dtype, param.device) != was:
                raise ValueError(
                    f"{self.names[index]} changed from {was[0]} on {was[1]} to {param.dtype} on {param.device} in the middle "
                    "of a block visit (model.to(...)); nothing was updated. Accepted: convert the model before building "
                    "the optimizer, or save its state_dict(), convert, build a new optimizer and load the state there."
                )

    def quantized_params(self) -> list[torch.Tensor]:
        """The solver tensors (stand-ins) whose moments are kept in 8 bits."""
        return [self.solver_params[i] for i in sorted(self.quantized)]

    def _is_copy(self, index: int) -> bool:
        return needs_master(self.sources[index]) and index not in self.lean

    def _entry_gradient(self, index: int, grads: Mapping[int, torch.Tensor | None]) -> torch.Tensor | None:
        """Entry ``index``'s gradient in the model's dtype: its rows parameter's, or the tensor's (rows)."""
        if index in self.row_params:
            return self.row_params[index].grad
        grad = grads[id(self.sources[index])]
        return None if grad is None else _rows(grad, self.rows[index])

    def _free(self, index: int) -> None:
        """Drop a rows parameter's low-precision gradient once stepped (an fp32 one is kept, as torch's optimizers do)."""
        if index in self.row_params and needs_master(self.sources[index]):
            self.row_params[index].grad = None

    def _gradient(self, index: int, grad: torch.Tensor, buffer: bool) -> torch.Tensor:
        """The solver tensor's gradient from the entry's: in fp32, in the reused buffer when asked."""
        if not self._is_copy(index):
            return grad
        if buffer and self.buffers is not None and not sharded(grad):
            return self.buffers.take("gradient", grad.device, grad.numel()).view(grad.shape).copy_(grad)
        return grad.to(torch.float32)

    @torch.no_grad()
    def _write_back(self, index: int) -> None:
        if self._is_copy(index):
            _rows(self.sources[index].detach(), self.rows[index]).copy_(self.solver_params[index])

    def step(self, solver: torch.optim.Optimizer, step: int = 0) -> None:
        """One solver step from the parameters' gradients, rounded back into the model (``step``, the
        optimizer's global step, seeds the lean precision's rounding).

        Low-precision gradients are freed once read (the model's ``.grad`` is None after the
        step); an fp32 parameter keeps its gradient, as with any torch optimizer. An entry with no
        gradient (an unused MoE expert) is skipped.
        """
        grads = {id(p): p.grad for p in self.params}
        remaining = {id(p): sum(s is p for s in self.sources) for p in self.params}
        if not streams(solver):
            for index in range(len(self.sources)):
                grad = self._entry_gradient(index, grads)
                self.solver_params[index].grad = None if grad is None else self._gradient(index, grad, buffer=False)
                self._free(index)
            for param in self.params:
                if needs_master(param):
                    param.grad = None
            solver.step()
            for index, master in enumerate(self.solver_params):
                if master is not self.sources[index]:  # a copy or a view of rows: not the model's own gradient
                    if master.grad is not None:
                        self._write_back(index)
                    master.grad = None
            return
        # fp32 parameters are their own solver tensor: unset their gradients so the solver sees one at a time.
        for param in self.params:
            if not needs_master(param):
                param.grad = None
        for index, param in enumerate(self.sources):
            grad = self._entry_gradient(index, grads)
            if grad is not None and (index in self.lean or self._chunked(solver, index)):
                self._step_in_chunks(solver, index, grad, step)
            elif grad is not None:
                master = self.solver_params[index]
                master.grad = self._gradient(index, grad, buffer=True)
                solver.step()
                master.grad = None
                self._write_back(index)
            self._free(index)
            remaining[id(param)] -= 1
            if not remaining[id(param)] and needs_master(param):
                param.grad = None  # its last entry is done: free the low-precision gradient now
        for param in self.params:
            if not needs_master(param):
                param.grad = grads[id(param)]

    def _chunked(self, solver: torch.optim.Optimizer, index: int) -> bool:
        master = self.solver_params[index]
        return (type(solver) in PREFILLED and self._is_copy(index) and self.buffers is not None and master.ndim >= 1
                and master.numel() > cost.GRADIENT_CHUNK and master in solver.state and not sharded(master))

    def _step_in_chunks(self, solver: torch.optim.Optimizer, index: int, grad: torch.Tensor, step: int = 0) -> None:
        """Step one entry a few rows at a time: each chunk's moments are views, its fp32 gradient a part
        of one buffer; every chunk starts from the same step count. The chunk stepped is a view of the
        entry's master or, in the lean precision, its weights copied into fp32 scratch and, stepped,
        stochastically rounded back (seeded by ``step``, the tensor and the row)."""
        master, lean, eight = self.solver_params[index], index in self.lean, index in self.quantized
        weights = _rows(self.sources[index].detach(), self.rows[index]) if lean else master
        state = solver.state[master]
        group = next(g for g in solver.param_groups if any(p is master for p in g["params"]))
        position = next(i for i, p in enumerate(group["params"]) if p is master)
        rows = chunk_rows(weights.shape)
        first_row = self.rows[index][0] if self.rows[index] is not None else 0
        scalars: dict[str, torch.Tensor] = {}
        try:
            for start in range(0, weights.shape[0], rows):
                chunk = weights[start:start + rows]
                view = self.buffers.take("masters", chunk.device, chunk.numel()).view(chunk.shape).copy_(chunk) if lean else chunk
                view.grad = self.buffers.take("gradient", grad.device, view.numel()).view(view.shape)
                view.grad.copy_(grad[start:start + rows])
                if eight:  # this chunk's moments in fp32, for this step only
                    solver.state[view] = {**quantized.load(state, start, rows),
                                          **{k: v.clone() for k, v in state.items() if not v.ndim}}
                else:
                    solver.state[view] = {k: (v[start:start + rows] if v.ndim else v.clone()) for k, v in state.items()}
                group["params"][position] = view
                solver.step()
                stepped = solver.state.pop(view)
                scalars = {k: v for k, v in stepped.items() if not v.ndim}
                if eight:
                    quantized.store(state, stepped, start)
                view.grad = None
                if lean:
                    draws = rounding.generator(0, step, self.indices[index], first_row + start, chunk.device)
                    rounding.round_into_(chunk, view, draws)
        finally:
            group["params"][position] = master
        state.update(scalars)
        if not lean:
            self._write_back(index)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The master copies by entry name (fp32 parameters are not included: the model holds them)."""
        return {name: m for i, (name, m) in enumerate(zip(self.names, self.solver_params)) if self._is_copy(i)}

    @torch.no_grad()
    def load_state_dict(self, masters: Mapping[str, torch.Tensor]) -> None:
        """Restore saved masters and write them, rounded, into the model."""
        for index, (name, master) in enumerate(zip(self.names, self.solver_params)):
            if self._is_copy(index):
                master.copy_(like(masters[name], master))
                self._write_back(index)
