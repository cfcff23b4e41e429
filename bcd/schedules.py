r"""Learning-rate schedules that follow the block schedule.

:func:`switch_warmup` is the warm-up at every switch of BREAD (NeurIPS 2025): each visit starts
its solver afresh (Adam's first steps are its largest: with bias correction the first update is
about ``lr`` in every coordinate), so the rate climbs linearly over the visit's first ``steps``
steps:

.. math::

    \eta_n = \eta \cdot b(n) \cdot \min\!\left(1, \frac{k_n + 1}{w}\right),

with :math:`k_n` the step within the visit (a continued visit, under the revisit rule, counts on), :math:`w` = ``steps`` and :math:`b` an optional
global schedule (cosine, say). It is a ``torch.optim.lr_scheduler.LambdaLR``: it reads
``optimizer.schedule.steps_in_visit``, which the optimizer's state dict restores, so resume stays exact.
"""

from __future__ import annotations

from collections.abc import Callable

from torch.optim.lr_scheduler import LambdaLR

from bcd.checks import positive_int
from bcd.optimizer import BlockCoordinateOptimizer


def switch_warmup(optimizer: BlockCoordinateOptimizer, steps: int,
                  base: Callable[[int], float] | None = None) -> LambdaLR:
    """A scheduler warming the rate up linearly over the first ``steps`` steps of every visit.

    Args:
        optimizer: a bcd optimizer (``scheduler.step()`` after each ``optimizer.step()``, as usual).
        steps: warm-up length in steps, at least 1 (1 means no warm-up).
        base: an optional global factor of the optimizer step count, e.g. a cosine decay.

    Raises:
        ValueError: ``optimizer`` is not a bcd optimizer, or ``steps`` is not a positive integer.
    """
    if not isinstance(optimizer, BlockCoordinateOptimizer):
        raise ValueError(f"Invalid optimizer: {type(optimizer).__name__}; accepted: a bcd.BlockCoordinateOptimizer.")
    positive_int("steps", steps)

    def factor(step: int) -> float:
        # Steps since the solver started, not since the block-epoch's visit: a revisit (the fixed
        # order, D = 1, an importance draw of the same block) keeps Adam's state, so no second warm-up.
        warm = min(1.0, (optimizer.schedule.steps_in_visit + 1) / steps)
        return warm * (base(step) if base is not None else 1.0)

    return LambdaLR(optimizer, factor)
