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

On one process each step is taken as autograd accumulates the gradient, so at most one such
gradient lives at a time. That skips gradient clipping (the gradient is gone before
``clip_grad_norm_`` runs) and accumulation: with N micro-batches per step each takes its own step,
so divide ``scale`` by N. On several ranks (``data_parallel=True``, or a model DDP wraps) a
rank's own gradient would let the replicas drift apart, so the expansion keeps the gradients as
the active block's are kept, and steps once per ``optimizer.step()``, after the block's step,
from the gradient averaged over ranks (by DDP's buckets, or with ``data_parallel=True`` by bcd's,
:mod:`bcd.averaging`, as the active block's): accumulation sums the micro-batches first and clipping scales what is
stepped, as for the active block, at the cost of holding the expanded blocks' gradients (in the
model's dtype) until the step. Decoupled weight decay applies as for the active block, at the
group's rate: :math:`\theta_j \leftarrow \theta_j - \eta_j (s \operatorname{sign}(\nabla) + \lambda
\theta_j)`. Expanded tensors are stepped in place. A bf16/fp16 weight would lose every step
smaller than half its spacing to rounding to nearest, so its step is computed in fp32 and
stochastically rounded back (:mod:`bcd.rounding`): unbiased, no state, drawn from a generator
seeded by ``seed``, the optimizer's global step and the tensor's index, so a resumed run, and
every rank, draws the same. FSDP2's sharded tensors are not expanded.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from bcd import averaging, distributed, rounding
from bcd.activation import remove_all
from bcd.checks import flag, integer, is_number
from bcd.cost import GRADIENT_CHUNK
from bcd.events import BlockSwitch
from bcd.optimizer import BlockCoordinateOptimizer


#: Elements per chunk of an expanded step on a CPU: a 4 MB fp32 chunk whose temporaries stay in
#: cache, a third of the time of a 64 MB one (tools/bench_scale.py, docs/benchmarks.md);
#: an accelerator keeps :data:`GRADIENT_CHUNK` (fewer launches; the passes are cheap there).
CPU_CHUNK = rounding.CPU_CHUNK
#: Which blocks an expansion steps: those after the active one, or all but the active one.
REACHES = ("after", "all")
#: The live expansion of each optimizer: a second one would step the same tensors twice.
_LIVE: weakref.WeakKeyDictionary[BlockCoordinateOptimizer, LandscapeExpansion] = weakref.WeakKeyDictionary()


class LandscapeExpansion:
    """The expansion of one optimizer: which tensors it steps now, and its hooks.

    Built by :func:`landscape_expansion`; :meth:`remove` undoes it (the optimizer's ``close()``
    does too, at the next backward).
    """

    def __init__(self, optimizer: BlockCoordinateOptimizer, scale: float, sign: bool, reach: str, seed: int,
                 defer: bool | None = None) -> None:
        self.scale, self.sign, self.reach, self.seed = scale, sign, reach, seed
        #: Step once per optimizer step from the (averaged, clipped) gradient, not as backward accumulates.
        self.deferred = several_ranks(optimizer) if defer is None else defer
        self._optimizer = weakref.ref(optimizer)
        self._read_parameters(optimizer)
        # Roundings of each tensor in the current optimizer step (several with accumulation).
        self._draws: dict[int, int] = {}
        self._draws_step = -1
        #: The tensors stepped during this visit, by name.
        self.expanded: dict[str, nn.Parameter] = {}
        self._grad_hooks: list[RemovableHandle] = []
        # First in the chain: a user's hook that raises must not leave the new active block expanded.
        self._switch_hook = optimizer.register_block_switch_hook(self._on_switch, prepend=True)
        # Deferred: the steps of an optimizer step that did not switch (a switch takes them in _on_switch).
        self._post_step = optimizer.register_step_post_hook(self._after_step) if self.deferred else None
        self._taken_at = -1
        self._on_switch(optimizer, None)
        _LIVE[optimizer] = self

    def _read_parameters(self, optimizer: BlockCoordinateOptimizer) -> None:
        """Each parameter's group and index, by object (read again when a wrapper replaced them)."""
        self._group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        self._index = {id(p): i for i, p in enumerate(optimizer.candidates.values())}

    def _step(self, param: torch.Tensor) -> None:
        """One process: spend ``param``'s freshly accumulated gradient on its step, then drop it."""
        optimizer = self._optimizer()
        if optimizer is None or optimizer.closed:
            self.remove()
            return
        self._update(optimizer, param)

    def _update(self, optimizer: BlockCoordinateOptimizer, param: torch.Tensor) -> None:
        """Step ``param`` from its gradient (sign or SGD, weight decay, rounded), and drop the gradient."""
        group = self._group_of[id(param)]
        if optimizer.global_step != self._draws_step:
            self._draws, self._draws_step = {}, optimizer.global_step
        draw = self._draws.get(id(param), 0)
        self._draws[id(param)] = draw + 1
        source = rounding.generator(self.seed, optimizer.global_step, self._index[id(param)], draw, param.device)
        decay = group.get("weight_decay", 0.0)
        weights, grads = param.detach(), param.grad
        # In chunks: an fp32 temporary of a whole 128K-row embedding would be gigabytes.
        size = CPU_CHUNK if weights.device.type == "cpu" else GRADIENT_CHUNK
        parts = ([(weights.view(-1)[i:i + size], grads.view(-1)[i:i + size]) for i in range(0, weights.numel(), size)]
                 if weights.is_contiguous() and grads.is_contiguous() else [(weights, grads)])
        for part, grad in parts:  # one generator for the tensor, drawn chunk after chunk
            direction = grad.sign() if self.sign else grad
            if decay:  # decoupled, as AdamW's: rate * (scale * direction + decay * weight)
                direction = direction.float() + (decay / self.scale) * part.float()
            rounding.add_rounded_(part, direction, -group["lr"] * self.scale, source)
        param.grad = None

    def _take_pending(self, optimizer: BlockCoordinateOptimizer) -> None:
        """Deferred: step every expanded tensor that has a gradient (averaged over the ranks during backward)."""
        self._taken_at = optimizer.global_step
        for param in [p for p in self.expanded.values() if p.grad is not None]:
            self._update(optimizer, param)  # rounding.add_rounded_ writes under no_grad

    def _after_step(self, optimizer: BlockCoordinateOptimizer, args: Any, kwargs: Any) -> None:
        if optimizer.closed:
            self.remove()
        elif self._taken_at != optimizer.global_step:
            self._take_pending(optimizer)

    def _on_switch(self, optimizer: BlockCoordinateOptimizer, event: BlockSwitch | None) -> None:
        """Move the expansion to the blocks ``reach`` names around the block now active."""
        if self.deferred and event is not None and event.reason == "switch":
            self._take_pending(optimizer)  # this step's, before the expanded set moves
        if event is not None and event.reason == "adopt":  # the wrapper froze what was expanded
            self._read_parameters(optimizer)
            self.expanded = {}
        active = set(optimizer.active_block.tensor_names)
        self._release(keep=active)
        index = optimizer.active_block_index
        reached = [b for i, b in enumerate(optimizer.blocks) if i > index or (self.reach == "all" and i < index)]
        names = dict.fromkeys(n for block in reached for n in block.tensor_names if n not in active)
        candidates = optimizer.candidates
        self.expanded = {name: candidates[name] for name in names}
        for param in self.expanded.values():
            param.requires_grad_(True)
            if not self.deferred:
                self._grad_hooks.append(param.register_post_accumulate_grad_hook(self._step))
        if self.deferred and optimizer.data_parallel:
            # Averaged as backward accumulates them, as the active block's are: clipping sees the mean.
            self._grad_hooks.extend(averaging.average_gradients(self.expanded.values()))

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
        if self._post_step is not None:
            self._post_step.remove()
        optimizer = self._optimizer()
        if optimizer is not None and _LIVE.get(optimizer) is self:
            del _LIVE[optimizer]
        # A closed optimizer made every candidate trainable again: leave them so.
        self._release(keep=set(self.expanded) if optimizer is None or optimizer.closed else frozenset())


def landscape_expansion(optimizer: BlockCoordinateOptimizer, scale: float, *, sign: bool = True,
                        reach: str = "after", seed: int = 0, defer: bool | None = None) -> LandscapeExpansion:
    """Step the blocks after the active one too (or all of them), from the gradients backward computes.

    Args:
        optimizer: a bcd optimizer (fp32 parameters, or bf16/fp16 ones stepped with stochastic
            rounding), on one process or on several with ``data_parallel=True`` or a DDP wrapper.
        scale: the expansion's rate as a multiple of each tensor's group rate, > 0 (0.25 is the
            measured setting with ``sign=True``, docs/benchmarks.md "Quality").
        sign: a sign step (default); False takes a plain SGD step, ``rate * scale * gradient``.
        reach: ``"after"`` (default, BREAD's) expands the blocks after the active one, which
            backward crosses anyway; ``"all"`` every block but the active one, with backward
            through the whole model (its time and activation memory).
        seed: seeds the stochastic rounding of bf16/fp16 weights (with the step and the tensor).
        defer: step at ``optimizer.step()`` from the kept gradients (accumulated, clipped, averaged
            over ranks) rather than as backward produces each; None (default): on several ranks
            only, where it is required. True on one process gives the several-rank semantics at
            the cost of holding the expanded blocks' gradients.

    Returns:
        The :class:`LandscapeExpansion`; ``remove()`` stops it. It keeps no state, so after a
        resume (``load_state_dict``) call this again on the new optimizer.

    Raises:
        ValueError: a wrong optimizer, ``scale``, ``sign``, ``reach`` or ``seed``, a sharded parameter,
            or an optimizer with an expansion already; nothing is changed.
    """
    if not isinstance(optimizer, BlockCoordinateOptimizer):
        raise ValueError(f"Invalid optimizer: {type(optimizer).__name__}; accepted: a bcd.BlockCoordinateOptimizer.")
    check_expansion(scale, sign, reach, seed)
    if defer is not None:
        flag("defer", defer)
        if not defer and several_ranks(optimizer):
            raise ValueError("Invalid defer: False on several ranks; accepted: None or True there (each rank's own "
                             "gradient would let the replicas drift apart).")
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
    return LandscapeExpansion(optimizer, scale, sign, reach, seed, defer)


def several_ranks(optimizer: BlockCoordinateOptimizer) -> bool:
    """Whether ``optimizer`` trains on several ranks, so that each rank's gradient must be averaged first."""
    return optimizer.data_parallel or optimizer.composition.awaiting_wrapper or distributed.world_size() > 1


def check_expansion(scale: float, sign: bool, reach: str, seed: int) -> None:
    """The checks of :func:`landscape_expansion` that need no optimizer (``bcd.BAdam`` runs them before building one).

    Raises:
        ValueError: a wrong ``scale``, ``sign``, ``reach`` or ``seed``.
    """
    if not is_number(scale) or scale <= 0:
        raise ValueError(f"Invalid scale: {scale!r}; accepted: a finite number > 0.")
    flag("sign", sign)
    if reach not in REACHES:
        raise ValueError(f"Invalid reach: {reach!r}; accepted: {' or '.join(map(repr, REACHES))}.")
    integer("seed", seed)
