"""BAdam (arXiv 2404.02827, Algorithm 1): the reference composition of bcd's pieces.

BAdam = ``layer`` partition + an ordering + ``adamw`` inner solver, K steps per block:

.. code-block:: python

    BlockCoordinateOptimizer(
        model, lr=lr, switch_every=K,
        partitioner="layer", partitioner_options={"include_embedding": False, "include_head": False},
        order="random", order_options={"seed": seed},
        solver="adamw", solver_options={"betas": betas, "eps": eps, "weight_decay": weight_decay},
    )

``tests/test_badam.py`` checks that the two spellings train identically.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from bcd.optimizer import BlockCoordinateOptimizer


class BAdam(BlockCoordinateOptimizer):
    """Block-coordinate Adam: one transformer layer at a time, fp32 state for that layer only.

    Defaults and where they come from:

    - blocks: one per transformer layer, embedding and head frozen (``include_embedding=False``,
      ``include_head=False``): the paper's layer-wise partition, D = number of layers (D = 32 for
      Llama 2-7B). Set them True to train those too, as blocks of their own.
    - ``order="random"``: Algorithm 1 draws a fresh order each block-epoch (random
      reshuffling); ``"ascending"``, ``"descending"`` and ``"fixed"`` are the alternatives.
    - ``switch_every=100``: K, Adam steps per block visit.
    - ``betas=(0.9, 0.999)``, ``eps=1e-8``: Adam's standard values, which Algorithm 1 uses.
    - ``weight_decay=0.0``: Algorithm 1 is plain Adam. A value you set is used exactly, with
      decoupled (AdamW) decay; with 0 the update is Adam's.
    - ``lr=1e-5``: a typical full-parameter fine-tuning rate; tune it.

    Args:
        model: the model, ideally in bf16 (fp32 master copies then exist for the active block only).
        lr: learning rate.
        switch_every: K.
        order: ``random``, ``ascending``, ``descending``, ``fixed`` or a plugin ordering.
        weight_decay: decoupled weight decay.
        betas: Adam's moment coefficients.
        eps: Adam's epsilon.
        seed: seed of the random order (only with ``order="random"``; default 0).
        start_block: index or name of the first block.
        include_embedding: train the embedding as a block of its own.
        include_head: train the head (final norm, output layer, rest) as a block of its own.
        no_decay: exempt biases and norm weights from weight decay.
        data_parallel: average the active block's gradients across ranks (see :mod:`bcd.distributed`).
        **solver_options: further ``torch.optim.AdamW`` options (``foreach``, ``fused``, ``amsgrad``...);
            ``fused=True`` is the default on CPU and CUDA unless you pass ``fused`` or ``foreach``.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-5,
        *,
        switch_every: int = 100,
        order: str = "random",
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        seed: int | None = None,
        start_block: int | str | None = None,
        include_embedding: bool = False,
        include_head: bool = False,
        no_decay: bool = False,
        data_parallel: bool = False,
        **solver_options: Any,
    ) -> None:
        order_options: dict[str, Any] = {}
        if seed is not None:
            order_options["seed"] = seed
        if start_block is not None:
            order_options["start_block"] = start_block
        super().__init__(
            model,
            lr=lr,
            switch_every=switch_every,
            partitioner="layer",
            partitioner_options={"include_embedding": include_embedding, "include_head": include_head},
            order=order,
            order_options=order_options,
            solver="adamw",
            solver_options={"betas": betas, "eps": eps, "weight_decay": weight_decay, **solver_options},
            no_decay=no_decay,
            data_parallel=data_parallel,
        )
