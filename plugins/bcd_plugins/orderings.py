"""Built-in orderings: ``ascending``, ``descending``, ``random`` and ``fixed``.

``order(num_blocks, epoch)`` is a pure function of the options and its arguments, so a resumed
run recomputes exactly the order it was in. ``start_block`` rotates the first block-epoch so that
it starts there; later block-epochs are unaffected (for ascending and descending, rotating the
first one already fixes the cycle).
"""

from __future__ import annotations

import attrs
import torch

from bcd.hookspecs import hookimpl


def _check_start(start_block: int, num_blocks: int) -> None:
    if not isinstance(start_block, int) or not 0 <= start_block < num_blocks:
        raise ValueError(f"Invalid start_block: {start_block!r}; accepted: a block index 0 ... {num_blocks - 1} or a block name.")


def _rotated(order: list[int], start_block: int) -> list[int]:
    at = order.index(start_block)
    return order[at:] + order[:at]


@attrs.frozen(kw_only=True)
class Ascending:
    """Input to output: 0, 1, ..., D-1 every block-epoch."""

    start_block: int = 0

    def order(self, num_blocks: int, epoch: int) -> list[int]:
        _check_start(self.start_block, num_blocks)
        order = list(range(num_blocks))
        return _rotated(order, self.start_block) if epoch == 0 else order


@attrs.frozen(kw_only=True)
class Descending:
    """Output to input: D-1, ..., 0 every block-epoch (``start_block`` defaults to the last)."""

    start_block: int | None = None

    def order(self, num_blocks: int, epoch: int) -> list[int]:
        order = list(range(num_blocks - 1, -1, -1))
        if self.start_block is None:
            return order
        _check_start(self.start_block, num_blocks)
        return _rotated(order, self.start_block) if epoch == 0 else order


@attrs.frozen(kw_only=True)
class Random:
    """A fresh permutation every block-epoch (random reshuffling), seeded by ``seed`` and the block-epoch.

    With ``start_block`` the first block-epoch's permutation is rotated to begin there.
    """

    seed: int = 0
    start_block: int | None = None

    def order(self, num_blocks: int, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(num_blocks, generator=generator).tolist()
        if self.start_block is None or epoch != 0:
            return order
        _check_start(self.start_block, num_blocks)
        return _rotated(order, self.start_block)


@attrs.frozen(kw_only=True)
class Fixed:
    """One block forever: ``start_block`` (default 0). A block-epoch is then one visit."""

    start_block: int = 0

    def order(self, num_blocks: int, epoch: int) -> list[int]:
        _check_start(self.start_block, num_blocks)
        return [self.start_block]


@hookimpl
def register_orderings(register) -> None:
    register("ascending", Ascending)
    register("descending", Descending)
    register("random", Random)
    register("fixed", Fixed)
