r"""Landscape expansion (BREAD, NeurIPS 2025): a stateless step on the blocks backward crosses anyway.

To reach the active block, backward runs through every block after it (for the ``layer``
partitioner: the layers above it and the head). Their weight gradients cost one more matrix
product each and no optimizer state, so the expansion lets backward produce them and spends
each one at once, as autograd accumulates it, on a sign step:

.. math::

    \theta_j \leftarrow \theta_j - \eta_j\, s\, \operatorname{sign}(\nabla_{\theta_j} f)
    \qquad \text{for every tensor } \theta_j \text{ of an expanded block,}

with :math:`\eta_j` the current rate of the tensor's group (schedulers apply) and :math:`s` the
``scale``; with ``sign=False`` the step is plain SGD, :math:`\eta_j s \nabla f`. The gradient is
dropped after its step, so at most one such gradient lives at a time and nothing is kept: the
memory cost is that gradient and the inputs the extra weight gradients need saved in forward.
What the active block gets is unchanged: its solver's step at ``optimizer.step()``.

``reach`` says which blocks are expanded. ``"after"`` (BREAD's): the blocks after the active
one; blocks before it stay frozen and backward still stops at the active block. ``"all"``: every
block but the active one, so backward runs through the whole model, at full fine-tuning's
backward time and activation memory (LoRA's too); the solver state stays one block's. On a short
fine-tune it is what brings the lower blocks, which the ``"after"`` reach leaves to their own
visits, up to AdamW's pace (docs/benchmarks.md, "Quality").

The steps skip what ``optimizer.step()`` does for the active block: weight decay, gradient
clipping (the gradient is gone before ``clip_grad_norm_`` runs), and accumulation: with N
micro-batches per step each takes its own step, so divide ``scale`` by N. Expanded tensors are
stepped in place. A bf16/fp16 weight would lose every step smaller than half its spacing to
rounding to nearest, so its step is computed in fp32 and stochastically rounded back
(:mod:`bcd.rounding`): unbiased, no state, drawn from a generator seeded by ``seed``, the
optimizer's global step and the tensor's index, so a resumed run draws the same. One process
only: on several ranks the steps would need their gradients averaged first.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from bcd import distributed, rounding
from bcd.activation import remove_all
from bcd.checks import flag, integer, is_number
from bcd.events import BlockSwitch
from bcd.optimizer import BlockCoordinateOptimizer


#: Which blocks an expansion steps: those after the active one, or all but the active one.
REACHES = ("after", "all")
#: The live expansion of each optimizer: a second one would step the same tensors twice.
_LIVE: weakref.WeakKeyDictionary[BlockCoordinateOptimizer, LandscapeExpansion] = weakref.WeakKeyDictionary()


class LandscapeExpansion:
    """The expansion of one optimizer: which tensors it steps now, and its hooks.

    Built by :func:`landscape_expansion`; :meth:`remove` undoes it (the optimizer's ``close()``
    does too, at the next backward).
    """

    def __init__(self, optimizer: BlockCoordinateOptimizer, scale: float, sign: bool, reach: str, seed: int) -> None:
        self.scale, self.sign, self.reach, self.seed = scale, sign, reach, seed
        self._optimizer = weakref.ref(optimizer)
        self._group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        self._index = {id(p): i for i, p in enumerate(optimizer.composition.candidates.values())}
        # Roundings of each tensor in the current optimizer step (several with accumulation).
        self._draws: dict[int, int] = {}
        self._draws_step = -1
        #: The tensors stepped during this visit, by name.
        self.expanded: dict[str, nn.Parameter] = {}
        self._grad_hooks: list[RemovableHandle] = []
        # First in the chain: a user's hook that raises must not leave the new active block expanded.
        self._switch_hook = optimizer.register_block_switch_hook(self._on_switch, prepend=True)
        self._on_switch(optimizer, None)
        _LIVE[optimizer] = self

    def _step(self, param: torch.Tensor) -> None:
        """Spend ``param``'s freshly accumulated gradient on its step, then drop it."""
        optimizer = self._optimizer()
        if optimizer is None or optimizer.closed:
            self.remove()
            return
        rate = self._group_of[id(param)]["lr"] * self.scale
        if optimizer.global_step != self._draws_step:
            self._draws, self._draws_step = {}, optimizer.global_step
        draw = self._draws.get(id(param), 0)
        self._draws[id(param)] = draw + 1
        source = rounding.generator(self.seed, optimizer.global_step, self._index[id(param)], draw, param.device)
        rounding.add_rounded_(param, param.grad.sign() if self.sign else param.grad, -rate, source)
        param.grad = None

    def _on_switch(self, optimizer: BlockCoordinateOptimizer, event: BlockSwitch | None) -> None:
        """Move the expansion to the blocks ``reach`` names around the block now active."""
        active = set(optimizer.active_block.tensor_names)
        self._release(keep=active)
        index = optimizer.active_block_index
        reached = [b for i, b in enumerate(optimizer.blocks) if i > index or (self.reach == "all" and i < index)]
        names = dict.fromkeys(n for block in reached for n in block.tensor_names if n not in active)
        candidates = optimizer.composition.candidates
        self.expanded = {name: candidates[name] for name in names}
        for param in self.expanded.values():
            param.requires_grad_(True)
            self._grad_hooks.append(param.register_post_accumulate_grad_hook(self._step))

    def _release(self, keep: set[str] = frozenset()) -> None:
        """Freeze the expanded tensors (except those in ``keep``) and drop their hooks."""
        remove_all(self._grad_hooks)
        for name, param in self.expanded.items():
            if name not in keep:
                param.requires_grad_(False)
                param.grad = None
        self.expanded = {}

    def remove(self) -> None:
        """Stop expanding: hooks removed, the expanded tensors frozen again (or, if the optimizer is closed, left trainable). Idempotent."""
        self._switch_hook.remove()
        optimizer = self._optimizer()
        if optimizer is not None and _LIVE.get(optimizer) is self:
            del _LIVE[optimizer]
        # A closed optimizer made every candidate trainable again: leave them so.
        self._release(keep=set(self.expanded) if optimizer is None or optimizer.closed else frozenset())


def landscape_expansion(optimizer: BlockCoordinateOptimizer, scale: float, *, sign: bool = True,
                        reach: str = "after", seed: int = 0) -> LandscapeExpansion:
    """Step the blocks after the active one too (or all of them), from the gradients backward computes.

    Args:
        optimizer: a bcd optimizer on one process (fp32 parameters, or bf16/fp16 ones stepped with
            stochastic rounding).
        scale: the expansion's rate as a multiple of each tensor's group rate, > 0 (0.25 is the
            measured setting with ``sign=True``, docs/benchmarks.md "Quality").
        sign: a sign step (default); False takes a plain SGD step, ``rate * scale * gradient``.
        reach: ``"after"`` (default, BREAD's) expands the blocks after the active one, which
            backward crosses anyway; ``"all"`` every block but the active one, with backward
            through the whole model (its time and activation memory).
        seed: seeds the stochastic rounding of bf16/fp16 weights (with the step and the tensor).

    Returns:
        The :class:`LandscapeExpansion`; ``remove()`` stops it. It keeps no state, so after a
        resume (``load_state_dict``) call this again on the new optimizer.

    Raises:
        ValueError: a wrong optimizer, ``scale``, ``sign``, ``reach`` or ``seed``, a sharded parameter,
            an optimizer over several ranks or one with an expansion already; nothing is changed.
    """
    if not isinstance(optimizer, BlockCoordinateOptimizer):
        raise ValueError(f"Invalid optimizer: {type(optimizer).__name__}; accepted: a bcd.BlockCoordinateOptimizer.")
    check_expansion(scale, sign, reach, seed, optimizer.data_parallel or optimizer.composition.awaiting_wrapper)
    if optimizer.closed:
        raise ValueError("Invalid optimizer: it is closed; accepted: the optimizer that drives the model now.")
    if optimizer in _LIVE:
        raise ValueError("Invalid optimizer: it has a landscape expansion already; accepted: an optimizer without "
                         "one (call remove() on the first to replace it).")
    for name, param in optimizer.composition.candidates.items():
        if distributed.sharded(param):
            raise ValueError(
                f"Invalid parameter for landscape expansion: {name} is sharded; accepted: whole tensors on one "
                "process, which the expansion steps in place.")
    return LandscapeExpansion(optimizer, scale, sign, reach, seed)


def check_expansion(scale: float, sign: bool, reach: str, seed: int, several_ranks: bool) -> None:
    """The checks of :func:`landscape_expansion` that need no optimizer (``bcd.BAdam`` runs them before building one).

    Raises:
        ValueError: a wrong ``scale``, ``sign``, ``reach`` or ``seed``, or several ranks.
    """
    if not is_number(scale) or scale <= 0:
        raise ValueError(f"Invalid scale: {scale!r}; accepted: a finite number > 0.")
    flag("sign", sign)
    if reach not in REACHES:
        raise ValueError(f"Invalid reach: {reach!r}; accepted: {' or '.join(map(repr, REACHES))}.")
    integer("seed", seed)
    if several_ranks or distributed.world_size() > 1:
        raise ValueError(
            f"Invalid optimizer for landscape expansion: it runs on {distributed.world_size()} ranks "
            f"(data_parallel={several_ranks}); accepted: one process, where each expansion step "
            "needs no averaged gradient.")
