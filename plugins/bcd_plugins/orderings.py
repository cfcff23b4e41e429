"""Built-in orderings: ``ascending``, ``descending``, ``random``, ``fixed`` and ``importance``.

``order(num_blocks, epoch)`` is a pure function of the options and its arguments, so a resumed
run recomputes exactly the order it was in. For ``ascending`` and ``descending``, ``start_block``
rotates every block-epoch, so the visits stay one cycle (``[2, 3, 0, 1]`` then ``[2, 3, 0, 1]``:
no block is visited twice in a row at a block-epoch boundary); for ``random`` it rotates the
first block-epoch only. ``importance`` observes (:mod:`bcd.observe`): its order is a pure
function of its options, its arguments and the gradient norms the optimizer saw. Options are
checked when the ordering is built.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

from bcd.checks import fraction, integer, is_int, validator
from bcd.hookspecs import hookimpl


def _int_or_none(instance, attribute, value) -> None:
    if value is not None and not is_int(value):
        raise ValueError(f"Invalid {attribute.name}: {value!r}; accepted: an integer" +
                         (" (a block index) or a block name." if attribute.name == "start_block" else "."))


_int = validator(integer)


def _check_start(start_block: int, num_blocks: int) -> None:
    if not is_int(start_block, 0, num_blocks - 1):
        raise ValueError(f"Invalid start_block: {start_block!r}; accepted: a block index 0 ... {num_blocks - 1} or a block name.")


def _generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of block-epoch ``epoch``'s draws: a function of the seed and the epoch only."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def _rotated(order: list[int], start_block: int) -> list[int]:
    at = order.index(start_block)
    return order[at:] + order[:at]


@attrs.frozen(kw_only=True)
class Ascending:
    """Input to output: 0, 1, ..., D-1 every block-epoch."""

    start_block: int = attrs.field(default=0, validator=_int_or_none)

    def order(self, num_blocks: int, epoch: int) -> list[int]:
        _check_start(self.start_block, num_blocks)
        return _rotated(list(range(num_blocks)), self.start_block)


@attrs.frozen(kw_only=True)
class Descending:
    """Output to input: D-1, ..., 0 every block-epoch (``start_block`` defaults to the last)."""

    start_block: int | None = attrs.field(default=None, validator=_int_or_none)

    def order(self, num_blocks: int, epoch: int) -> list[int]:
        order = list(range(num_blocks - 1, -1, -1))
        if self.start_block is None:
            return order
        _check_start(self.start_block, num_blocks)
        return _rotated(order, self.start_block)


@attrs.frozen(kw_only=True)
class Random:
    """A fresh permutation every block-epoch (random reshuffling), seeded by ``seed`` and the block-epoch.

    With ``start_block`` the first block-epoch's permutation is rotated to begin there.
    """

    seed: int = attrs.field(default=0, validator=_int)
    start_block: int | None = attrs.field(default=None, validator=_int_or_none)

    def order(self, num_blocks: int, epoch: int) -> list[int]:
        order = torch.randperm(num_blocks, generator=_generator(self.seed, epoch)).tolist()
        if self.start_block is None or epoch != 0:
            return order
        _check_start(self.start_block, num_blocks)
        return _rotated(order, self.start_block)


@attrs.frozen(kw_only=True)
class Fixed:
    """One block forever: ``start_block`` (default 0). A block-epoch is then one visit."""

    start_block: int = attrs.field(default=0, validator=_int_or_none)

    def order(self, num_blocks: int, epoch: int) -> list[int]:
        _check_start(self.start_block, num_blocks)
        return [self.start_block]


_fraction = validator(fraction)


@attrs.frozen(kw_only=True)
class Importance:
    r"""Blocks drawn with probability growing with their gradient norm: importance sampling (MISA-style).

    Block-epoch 0 visits every block once, in a random order seeded by ``seed``, so that every
    block's gradient norm is observed. Every later block-epoch makes D visits, each drawn
    independently (with replacement) from

    .. math::

        p_b = (1 - m) \frac{\bar g_b}{\sum_j \bar g_j} + \frac{m}{D},

    with :math:`\bar g_b` the mean gradient norm at block :math:`b`'s latest visit and
    :math:`m` = ``mix``. Sampling in proportion to the gradient norm is the weight that minimises
    the variance of a sampled coordinate step; the uniform share keeps every block's chance at
    :math:`m/D` or more, so a block whose gradient was small once is seen again. Two draws of the
    same block in a row make one longer visit (the schedule's revisit rule).
    """

    observes: ClassVar[bool] = True
    seed: int = attrs.field(default=0, validator=_int)
    mix: float = attrs.field(default=0.5, validator=_fraction)

    def order(self, num_blocks: int, epoch: int, observed) -> list[int]:
        generator = _generator(self.seed, epoch)
        if epoch == 0 or any(g is None for g in observed.grad_norm):
            return torch.randperm(num_blocks, generator=generator).tolist()
        norms = torch.tensor(observed.grad_norm, dtype=torch.float64)
        total = norms.sum()
        share = norms / total if total > 0 else torch.full_like(norms, 1 / num_blocks)
        weights = (1 - self.mix) * share + self.mix / num_blocks
        return torch.multinomial(weights, num_blocks, replacement=True, generator=generator).tolist()


@hookimpl
def register_orderings(register) -> None:
    register("ascending", Ascending)
    register("descending", Descending)
    register("random", Random)
    register("fixed", Fixed)
    register("importance", Importance)
