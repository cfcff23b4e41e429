"""BAdam (arXiv 2404.02827, Algorithm 1): the reference composition of bcd's pieces.

BAdam = ``layer`` partition + an ordering + ``adamw`` inner solver, K steps per block:

.. code-block:: python

    BlockCoordinateOptimizer(
        model, lr=lr, switch_every=K,
        partitioner="layer", partitioner_options={"include_embedding": True, "include_head": True},
        max_block_params=max_block_params,
        order="random", order_options={"seed": seed},
        solver="adamw", solver_options={"betas": betas, "eps": eps, "weight_decay": weight_decay},
    )

``tests/test_badam.py`` checks that the two spellings train identically.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

import torch
from torch import nn

from bcd import distributed
from bcd.checks import positive_int
from bcd.construction import resolve_partition
from bcd.expansion import REACHES, check_expansion, landscape_expansion
from bcd.optimizer import BlockCoordinateOptimizer


def _check_keywords(solver_options: dict[str, Any]) -> None:
    """Refuse a keyword that is neither BAdam's nor AdamW's, listing both (a typo of ``switch_every`` is not an AdamW option).

    Raises:
        ValueError: naming the keyword, a close match, and both lists.
    """
    own = [n for n in inspect.signature(BAdam.__init__).parameters if n not in ("self", "model", "solver_options")]
    adamw = [n for n in inspect.signature(torch.optim.AdamW.__init__).parameters if n not in ("self", "params")]
    unknown = sorted(set(solver_options) - set(adamw))
    if unknown:
        close = difflib.get_close_matches(unknown[0], own + adamw, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"Unknown keyword(s) {unknown} for bcd.BAdam{hint}; accepted: BAdam's own ({', '.join(own)}) or "
            f"torch.optim.AdamW's ({', '.join(sorted(adamw))})."
        )


#: ``switch_every=AUTO``: K from the run length, about three block-epochs over ``total_steps``;
#: ``expansion=AUTO``: the expansion over every block when the run length is given.
AUTO = "auto"
#: K when the run length is not given: the paper's, for runs of thousands of steps.
PAPER_SWITCH_EVERY = 100
#: The expansion's sign step as a multiple of the rate (docs/benchmarks.md, "Quality", has its sweep).
EXPANSION_SCALE = 0.25
#: Block-epochs a run of ``total_steps`` makes with ``switch_every="auto"`` (docs/benchmarks.md, "Quality").
AUTO_BLOCK_EPOCHS = 3


def _resolve_switch_every(model: nn.Module, switch_every: Any, total_steps: Any, options: dict[str, Any],
                          max_block_params: Any) -> Any:
    """K: ``switch_every`` as given, or for ``"auto"`` ``max(1, total_steps // (3 D))``, D from the partition
    BAdam will use; by default ``"auto"`` when ``total_steps`` is given and 100 when it is not.

    Raises:
        ValueError: ``"auto"`` without ``total_steps``, or ``total_steps`` not an integer >= 1.
    """
    if switch_every is None:  # the default: "auto" with the run length, the paper's K without
        switch_every = PAPER_SWITCH_EVERY if total_steps is None else AUTO
    if total_steps is None:
        if switch_every != AUTO:
            return switch_every
        raise ValueError(f"Invalid switch_every: {switch_every!r} needs the run length; accepted: "
                         "switch_every='auto' with total_steps=N (the run's optimizer steps), or an integer K.")
    positive_int("total_steps", total_steps)
    if switch_every != AUTO:
        return switch_every  # K given: total_steps is only the run length
    blocks = len(resolve_partition(model, "layer", options, max_block_params=max_block_params)[2])
    return max(1, total_steps // (AUTO_BLOCK_EPOCHS * blocks))


def _resolve_expansion(model: nn.Module, expansion: Any, total_steps: Any) -> Any:
    """The expansion's reach: ``expansion`` as given, or for ``"auto"`` (the default) ``"all"`` when
    the run length is given and no parameter is sharded (FSDP2's are not expanded), else None."""
    if expansion != AUTO:
        if expansion is not None and expansion not in REACHES:
            raise ValueError(f"Invalid expansion: {expansion!r}; accepted: 'auto' (the default: 'all' with total_steps), "
                             f"None, {' or '.join(map(repr, REACHES))}.")
        return expansion
    if total_steps is None or any(distributed.sharded(p) for p in model.parameters()):
        return None
    return "all"


class BAdam(BlockCoordinateOptimizer):
    """Block-coordinate Adam: one transformer layer at a time, fp32 state for that layer only.

    Defaults and where they come from:

    - blocks: every trainable parameter, one block per transformer layer plus the embedding and
      the head (final norm, output layer, classifier) as blocks of their own, each split into row
      blocks where it is larger than a layer (``max_block_params``): D = 34 for Llama 2-7B, 38 for
      Llama 3-8B. ``include_embedding=False`` / ``include_head=False`` freeze those instead (the
      paper's layer-only partition, D = number of layers).
    - ``order="random"``: Algorithm 1 draws a fresh order each block-epoch (random
      reshuffling); ``"importance"`` (blocks drawn by their gradient norm, MISA-style),
      ``"ascending"``, ``"descending"`` and ``"fixed"`` are the alternatives.
    - The run length, ``total_steps``, turns on the recipe measured in docs/benchmarks.md
      ("Quality"): K = steps / (3D), for three block-epochs over the run, and the landscape
      expansion over every block (``expansion="all"``: each step, every block but the active
      one takes a stateless sign step from the gradient backward computes on its way). The
      Trainer integration passes its ``max_steps``. Without ``total_steps``, Algorithm 1:
      K = 100 (the paper's, for runs of thousands of steps) and no expansion.
      ``expansion=None`` keeps backward stopping at the active block, the least activation
      memory, at the accuracy the benchmarks show for it.
    - ``betas=(0.9, 0.999)``, ``eps=1e-8``: Adam's standard values, which Algorithm 1 uses.
    - ``weight_decay=0.0``: Algorithm 1 is plain Adam. A value you set is used exactly, with
      decoupled (AdamW) decay; with 0 the update is Adam's.
    - ``lr=1e-5``: a typical full-parameter fine-tuning rate; tune it. BAdam wants a larger rate
      than AdamW on the same run (docs/benchmarks.md, "Quality", has the sweeps).

    What to write (docs/user-guide.md, "What to write"): ``BAdam(model, lr=..., total_steps=steps)``
    for a bf16 LLM on one GPU, for several GPUs (under DDP, or with ``data_parallel=True``: the
    expansion then steps from the gradient averaged over ranks; on FSDP2 the default gives no
    expansion) and for a small pretrained classifier (``lr=2e-4`` on all-MiniLM-L6-v2 in bf16:
    within 0.25 of AdamW and ahead of LoRA, docs/benchmarks.md "Quality"). Inside the Trainer,
    ``badam_from_training_args(model, args)`` gives the same from ``args``.

    Args:
        model: the model, ideally in bf16 (fp32 master copies then exist for the active block only).
        lr: learning rate.
        switch_every: K; ``"auto"`` (the default with ``total_steps``) for three block-epochs over
            the run; the default without it is 100.
        order: ``random``, ``importance``, ``ascending``, ``descending``, ``fixed`` or a plugin ordering.
        weight_decay: decoupled weight decay.
        betas: Adam's moment coefficients.
        eps: Adam's epsilon.
        seed: seed of the random order (only with ``order="random"`` or ``"importance"``; default 0).
        start_block: index or name of the first block.
        include_embedding: train the embedding as a block of its own (default); False freezes it.
        include_head: train the head (final norm, output layer, rest) as a block of its own
            (default); False freezes it.
        max_block_params: the most parameters a block may hold; default (None) the largest
            layer's. Larger blocks are split by rows.
        no_decay: exempt biases and norm weights from weight decay.
        data_parallel: average the active block's gradients across ranks (see :mod:`bcd.distributed`).
        total_steps: the run's optimizer steps; with it the defaults are the recipe (above).
        expansion: ``"auto"`` (default: ``"all"`` with ``total_steps`` unless parameters are
            FSDP2-sharded, else none), ``None``, ``"after"`` or ``"all"``: a
            :func:`bcd.landscape_expansion` with that reach, kept as ``self.expansion`` (refused
            on FSDP2: sharded weights are not expanded).
        expansion_scale: its sign step as a multiple of the rate (default 0.25).
        lean: no fp32 master copies: a bf16 block is stepped in fp32 chunks and stochastically
            rounded back (:mod:`bcd.precision`), 4 bytes per active element less; opt-in.
            ``"8bit"``: also Adam's moments in 8 bits (:mod:`bcd.quantized`, needs bitsandbytes),
            another 6 bytes per active element less.
        **solver_options: further ``torch.optim.AdamW`` options (``foreach``, ``fused``, ``amsgrad``...);
            ``fused=True`` is the default on CPU and CUDA unless you pass ``fused`` or ``foreach``.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-5,
        *,
        switch_every: int | str | None = None,
        order: str = "random",
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        seed: int | None = None,
        start_block: int | str | None = None,
        include_embedding: bool = True,
        include_head: bool = True,
        max_block_params: int | None = None,
        no_decay: bool = False,
        data_parallel: bool = False,
        total_steps: int | None = None,
        expansion: str | None = AUTO,
        expansion_scale: float = EXPANSION_SCALE,
        lean: bool | str = False,
        **solver_options: Any,
    ) -> None:
        _check_keywords(solver_options)
        order_options: dict[str, Any] = {}
        if seed is not None:
            order_options["seed"] = seed
        if start_block is not None:
            order_options["start_block"] = start_block
        partitioner_options = {"include_embedding": include_embedding, "include_head": include_head}
        switch_every = _resolve_switch_every(model, switch_every, total_steps, partitioner_options, max_block_params)
        expansion = _resolve_expansion(model, expansion, total_steps)
        if expansion is not None:  # checked before anything changes: a refused expansion leaves the model alone
            check_expansion(expansion_scale, True, expansion, 0)
        super().__init__(
            model,
            lr=lr,
            switch_every=switch_every,
            partitioner="layer",
            partitioner_options=partitioner_options,
            order=order,
            order_options=order_options,
            solver="adamw",
            solver_options={"betas": betas, "eps": eps, "weight_decay": weight_decay, **solver_options},
            no_decay=no_decay,
            data_parallel=data_parallel,
            max_block_params=max_block_params,
            lean=lean,
        )
        #: The landscape expansion asked for with ``expansion=``, or None.
        self.expansion = landscape_expansion(self, expansion_scale, reach=expansion) if expansion is not None else None
