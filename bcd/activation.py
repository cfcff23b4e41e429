"""The active block of a model: what is trainable, its gradient hooks, its master copies and its solver.

Activating a block unfreezes its parameters (``requires_grad=True``) and freezes the previous
one's (``requires_grad=False``, ``grad=None``), so autograd computes no weight gradient for
frozen blocks and stops below the lowest active parameter. The master copies and the inner solver
are built at the visit's first step, from the weights as they are then, and dropped at the
switch: dropping them is what frees their memory (no ``gc.collect()``, no ``empty_cache()``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from bcd import distributed
from bcd.blocks import Block
from bcd.precision import MasterCopies


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
    """

    def __init__(self, candidates: dict[str, nn.Parameter], data_parallel: bool, deferred: Callable[[], bool]) -> None:
        self.candidates = candidates
        self.data_parallel = data_parallel
        self.deferred = deferred
        self.block: Block | None = None
        self.params: list[nn.Parameter] = []
        self.masters: MasterCopies | None = None
        self.solver: torch.optim.Optimizer | None = None
        self.solver_group_index: list[int] = []
        self.sync_handles: list[RemovableHandle] = []
        weakref.finalize(self, remove_all, self.sync_handles)

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
        self.params, self.solver, self.masters = [], None, None

    def activate(self, block: Block) -> None:
        """Release the current block and make ``block`` trainable, with fresh solver state to come."""
        self.release()
        self.block = block
        self._unfreeze()
        if self.data_parallel:
            self.sync_handles.extend(distributed.gradient_sync_hooks(self.params))

    def _unfreeze(self) -> None:
        """The block's parameters, read from the candidates, made trainable (unless deferred)."""
        self.params = [self.candidates[n] for n in self.block.param_names]
        for param in self.params if not self.deferred() else ():
            param.requires_grad_(True)

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
        self.masters = MasterCopies(self.params, names)
        groups, self.solver_group_index = groups_for(dict(zip(names, self.masters.solver_params)))
        self.solver = factory(groups, **options)

    def step(self) -> None:
        """One solver step on the masters from the block's gradients, rounded back into the model."""
        self.masters.grads_in()
        self.solver.step()
        self.masters.write_back()
