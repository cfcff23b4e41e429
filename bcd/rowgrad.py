r"""Row gradients: a row block's backward computes the gradient of its rows only.

A tensor larger than a layer (a modern vocabulary's embedding or head) is trained a row range
at a time (:mod:`bcd.blocks`). Autograd has no switch finer than a tensor: with the whole weight
trainable, backward computes and holds its whole gradient (1.05 GB in bf16 for Llama-3-8B's head)
to update a third of it. Instead, for the visit, the rows become a parameter of their own, a view
that shares the weight's storage, registered on the module beside the weight (as
:data:`ROWS`, so that ``model.parameters()``, and with it clipping and ``model.zero_grad()``,
see it), and the module's forward computes the same output through a function whose backward
produces only that parameter's gradient:

- ``nn.Linear`` (:math:`y = x W^\top + b`): :math:`\partial W_{a:b} = (x^\top\, \partial y_{:, a:b})^\top`,
  :math:`(b - a)/V` of the weight-gradient product;
- ``nn.Embedding``: the tokens that fall in rows :math:`a \ldots b - 1` summed into their rows, by
  the kernel that computes the whole embedding's gradient.

Both are the operations autograd would run for the whole tensor, restricted to the rows, so a
block-epoch in fp32 is bit-identical to training the whole tensor with the other rows zeroed
(tested). The weight itself stays frozen. The function is used where it is exact and the rows'
gradient reaches everything that reads ``.grad``: one process (DDP would not average a parameter
it did not register), the weight used by one module only (not tied), a plain ``nn.Linear`` or
``nn.Embedding`` forward (no ``max_norm``, ``scale_grad_by_freq`` or ``sparse``). Elsewhere the
whole tensor is trained and the other rows' gradient zeroed (:mod:`bcd.activation`).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from bcd.distributed import sharded, world_size

#: The name under which a visit's rows are registered on their module.
ROWS = "bcd_weight_rows"


class _RowsLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)``; backward gives ``rows`` (weight rows ``start...``) their gradient."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: torch.Tensor,
                start: int) -> torch.Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        x, weight, _, rows, start = inputs
        ctx.save_for_backward(x, weight)
        ctx.span = (start, start + rows.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        x, weight = ctx.saved_tensors
        # Under autocast the forward ran in grad's dtype: cast as autocast did (a no-op otherwise).
        x, weight = x.to(grad.dtype), weight.to(grad.dtype)
        flat_grad, flat_x = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        a, b = ctx.span
        # The products autograd's addmm backward computes, over the rows' columns of grad only.
        grad_x = grad.matmul(weight) if ctx.needs_input_grad[0] else None
        grad_weight = flat_x.t().mm(flat_grad).t() if ctx.needs_input_grad[1] else None
        grad_bias = flat_grad.sum(0) if ctx.needs_input_grad[2] else None
        grad_rows = flat_x.t().mm(flat_grad[:, a:b]).t() if ctx.needs_input_grad[3] else None
        return grad_x, grad_weight, grad_bias, grad_rows, None


class _RowsEmbedding(torch.autograd.Function):
    """``F.embedding(ids, weight, padding_idx)``; backward gives ``rows`` their gradient."""

    @staticmethod
    def forward(ids: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, start: int,
                padding_idx: int | None) -> torch.Tensor:
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ids, weight, rows, start, padding_idx = inputs
        ctx.save_for_backward(ids)
        ctx.span, ctx.padding_idx, ctx.num_weights = (start, start + rows.shape[0]), padding_idx, weight.shape[0]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        (ids,) = ctx.saved_tensors
        a, b = ctx.span
        flat_ids, flat_grad = ids.reshape(-1), grad.reshape(-1, grad.shape[-1])
        padding = -1 if ctx.padding_idx is None else ctx.padding_idx
        grad_weight = (torch.ops.aten.embedding_dense_backward(flat_grad, flat_ids, ctx.num_weights, padding, False)
                       if ctx.needs_input_grad[1] else None)
        grad_rows = None
        if ctx.needs_input_grad[2]:
            inside = (flat_ids >= a) & (flat_ids < b)
            # The same kernel over the tokens in the rows, in their order: the same sums, bit for bit.
            grad_rows = torch.ops.aten.embedding_dense_backward(
                flat_grad[inside], flat_ids[inside] - a, b - a, padding - a if a <= padding < b else -1, False)
        return None, grad_weight, grad_rows, None, None


def _forward_for(module: nn.Module) -> Callable[..., torch.Tensor] | None:
    """The rows-aware forward for a module whose own forward is torch's and exact here, else None."""
    if "forward" in vars(module) or hasattr(module, ROWS):  # a forward patched by someone else, or ours
        return None
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return _linear
    if (isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward and module.max_norm is None
            and not module.scale_grad_by_freq and not module.sparse):
        return _embedding
    return None


def is_rows(name: str) -> bool:
    """Whether ``name`` (qualified, from ``named_parameters()`` or a state dict) is a visit's registered rows."""
    return name.rpartition(".")[2] == ROWS


def registered(model: nn.Module) -> dict[str, nn.Parameter]:
    """The rows registered on ``model`` now, by the qualified name of the weight they are rows of."""
    return {f"{prefix}.weight" if prefix else "weight": getattr(module, ROWS)
            for prefix, module in model.named_modules() if isinstance(getattr(module, ROWS, None), nn.Parameter)}


def owners(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    """The tensors among ``names`` (qualified names of row-split tensors) whose row blocks compute
    only their rows' gradient, each with the module that owns it as its ``weight``.

    None on several ranks or with sharded parameters; a tensor used by more than one module
    (tied embedding and head) or owned by a module with its own forward is left out.
    """
    from torch.nn.parallel import DistributedDataParallel

    params = list(model.named_parameters(remove_duplicate=False))
    if world_size() != 1 or isinstance(model, DistributedDataParallel) or any(sharded(p) for _, p in params):
        return {}
    uses = Counter(id(p) for _, p in params)
    found = {}
    for name in names:
        prefix, _, attribute = name.rpartition(".")
        try:
            module = model.get_submodule(prefix)
        except AttributeError:
            continue
        param = getattr(module, attribute, None)
        if attribute == "weight" and isinstance(param, nn.Parameter) and uses[id(param)] == 1 and _forward_for(module):
            found[name] = module
    return found


class RowGradient:
    """One visit's rows of a module's weight as a parameter of their own, with the forward that fills its gradient.

    Attaching registers the rows (a view of the weight: the model's updates to the weight are
    theirs) as :data:`ROWS` on ``module``, which ``state_dict()`` leaves out and
    ``load_state_dict()`` does not ask for; :meth:`release` undoes all of it.

    Args:
        module: an ``nn.Linear`` or ``nn.Embedding`` that :func:`owners` accepted.
        span: the rows ``(start, stop)`` of its weight.
    """

    def __init__(self, module: nn.Module, span: tuple[int, int]) -> None:
        start, stop = span
        self.module = module
        forward = _forward_for(module)  # before the rows are registered, which it refuses
        weight = module.weight
        #: The rows, a trainable view of the frozen weight; its ``.grad`` is the block's gradient.
        self.rows = nn.Parameter(weight.detach()[start:stop], requires_grad=True)
        module.register_parameter(ROWS, self.rows)
        # A partial of a module-level function, not a closure: a deepcopy of the model (a reference
        # model, an EMA) gets a forward over its own copy's weights, and pickling works.
        module.forward = functools.partial(forward, module, start)
        self.handles: list[RemovableHandle] = [module.register_state_dict_post_hook(_leave_out),
                                               module.register_load_state_dict_post_hook(_not_missing)]

    def release(self) -> None:
        """Unregister the rows, drop their gradient, restore the module's own forward. Idempotent."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.rows.grad = None
        if getattr(self.module, ROWS, None) is self.rows:
            delattr(self.module, ROWS)
            del self.module.forward


def _linear(module: nn.Linear, start: int, x: torch.Tensor) -> torch.Tensor:
    return _RowsLinear.apply(x, module.weight, module.bias, getattr(module, ROWS), start)


def _embedding(module: nn.Embedding, start: int, ids: torch.Tensor) -> torch.Tensor:
    return _RowsEmbedding.apply(ids, module.weight, getattr(module, ROWS), start, module.padding_idx)


def _leave_out(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    state_dict.pop(prefix + ROWS, None)


def _not_missing(module: nn.Module, incompatible_keys: Any) -> None:
    missing = incompatible_keys.missing_keys
    missing[:] = [key for key in missing if not is_rows(key)]


def release_all(attached: dict[str, RowGradient]) -> None:
    """Release every attached :class:`RowGradient` and empty the mapping."""
    for row_gradient in attached.values():
        row_gradient.release()
    attached.clear()
