"""fp32 master copies of the active block's low-precision parameters.

With the model in bf16/fp16, the active block's parameters get fp32 copies; the inner solver
updates those, from gradients cast to fp32, and the result is written back to the model rounded
to its dtype. Memory for a block of ``m`` parameters is then ``4m`` (master) ``+ 4m`` (fp32
gradient) ``+ 8m`` (Adam's two moments), the ``16M/D`` of the paper's ``2M + 16M/D``.
fp32 (and fp64) parameters are their own master: the solver updates them in place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from bcd.distributed import like

LOW_PRECISION = (torch.bfloat16, torch.float16)


def needs_master(param: torch.Tensor) -> bool:
    """Whether ``param`` is stored in a precision too low for the solver to update in place."""
    return param.dtype in LOW_PRECISION


class MasterCopies:
    """The tensors the inner solver updates for one block: fp32 copies or the parameters themselves.

    Works for plain tensors and for sharded DTensors alike: it only ever uses ``.to``,
    ``.copy_`` and ``.grad``, which act shard by shard.

    Args:
        params: the active block's parameters.
        names: their qualified names, for state dicts.
    """

    def __init__(self, params: Sequence[nn.Parameter], names: Sequence[str]) -> None:
        self.params = list(params)
        self.names = list(names)
        self.solver_params: list[torch.Tensor] = [
            p.detach().to(torch.float32) if needs_master(p) else p for p in self.params
        ]

    def pairs(self):
        """``(param, master)`` for each parameter that has a separate master copy."""
        return ((p, m) for p, m in zip(self.params, self.solver_params) if m is not p)

    def grads_in(self) -> None:
        """Move each low-precision gradient to its master as fp32 and free the original."""
        for param, master in self.pairs():
            if param.grad is None:
                # No gradient this step (e.g. an unused MoE expert): the solver skips it.
                master.grad = None
            else:
                master.grad = param.grad.to(torch.float32)
                param.grad = None

    @torch.no_grad()
    def write_back(self) -> None:
        """Round updated masters into the model and free their fp32 gradients."""
        for param, master in self.pairs():
            if master.grad is not None:
                param.copy_(master)
                master.grad = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The master copies by parameter name (fp32 parameters are not included: the model holds them)."""
        return {name: m for name, p, m in zip(self.names, self.params, self.solver_params) if m is not p}

    @torch.no_grad()
    def load_state_dict(self, masters: Mapping[str, torch.Tensor]) -> None:
        """Restore saved masters and write them, rounded, into the model."""
        for name, param, master in zip(self.names, self.params, self.solver_params):
            if master is not param:
                master.copy_(like(masters[name], master))
                param.copy_(master)
