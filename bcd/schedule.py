r"""The block schedule: which block is active, and for how many more steps. No model needed.

A run is a sequence of **visits**. Block-epoch :math:`t` visits the blocks in the order
:math:`\pi^t` that the ordering gives for :math:`t`; each visit lasts :math:`K` optimizer steps
(``switch_every``). Global step :math:`n` (0-based) belongs to visit :math:`\lfloor n/K \rfloor`,
the first one included. :class:`BlockSchedule` is an immutable value: :meth:`BlockSchedule.step`
returns the next one, so a schedule can be tested, saved and compared without a model.

The **revisit rule**: when the next visit is to the block that is active already (D = 1, or the
``fixed`` order), it is one longer visit and the solver state is kept; that is what makes D = 1
exactly the inner solver.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from bcd.checks import positive_int
from bcd.contracts import Ordering, options_of

SCHEDULE_KEYS = ("block_epoch", "position", "order", "step_in_block", "global_step")


def order_for(ordering: Ordering, num_blocks: int, epoch: int) -> tuple[int, ...]:
    """The ordering's order for block-epoch ``epoch``, checked.

    Raises:
        ValueError: the order is empty or names a block outside ``0 ... num_blocks - 1``.
    """
    order = tuple(int(i) for i in ordering.order(num_blocks, epoch))
    if not order or any(not 0 <= i < num_blocks for i in order):
        raise ValueError(
            f"Invalid order from ordering {type(ordering).__name__}: {list(order)}; accepted: block indices "
            f"0 ... {num_blocks - 1}, at least one."
        )
    return order


def _natural(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"Invalid state dict: schedule.{key} is {value!r}; accepted: an integer >= 0.")
    return value


@attrs.frozen(kw_only=True)
class BlockSchedule:
    """Where a run stands: block-epoch, position in its order, step within the visit.

    Attributes:
        ordering: the ordering (any object with ``order(num_blocks, epoch)``).
        num_blocks: D.
        switch_every: K, optimizer steps per visit.
        block_epoch: block-epochs completed (the current one's number, 0-based).
        position: index of the current visit in :attr:`order`.
        step_in_block: steps taken in the current visit, 0 ... K-1.
        global_step: optimizer steps taken in all.
        order: the current block-epoch's order (derived from the ordering when not given).
    """

    ordering: Ordering = attrs.field(eq=False)
    num_blocks: int
    switch_every: int = attrs.field(validator=lambda _, __, v: positive_int("switch_every", v))
    block_epoch: int = 0
    position: int = 0
    step_in_block: int = 0
    global_step: int = 0
    order: tuple[int, ...] = attrs.field(converter=tuple)

    @order.default
    def _order(self) -> tuple[int, ...]:
        return order_for(self.ordering, self.num_blocks, self.block_epoch)

    @property
    def active(self) -> int:
        """The index of the active block."""
        return self.order[self.position]

    def step(self) -> BlockSchedule:
        """The schedule after one more optimizer step: the same visit, or the next one after K steps."""
        taken = self.step_in_block + 1
        if taken < self.switch_every:
            return attrs.evolve(self, step_in_block=taken, global_step=self.global_step + 1)
        position, epoch = self.position + 1, self.block_epoch
        if position == len(self.order):
            position, epoch = 0, epoch + 1
        return BlockSchedule(
            ordering=self.ordering, num_blocks=self.num_blocks, switch_every=self.switch_every,
            block_epoch=epoch, position=position, global_step=self.global_step + 1,
            **({"order": self.order} if epoch == self.block_epoch else {}),
        )

    def continues(self, previous: BlockSchedule) -> bool:
        """Whether this visit continues ``previous``'s: the revisit rule (same block, D = 1 or ``fixed``)."""
        return self.active == previous.active

    def state_dict(self) -> dict[str, Any]:
        """Plain data: the position and the options that determine every later order."""
        return {
            "block_epoch": self.block_epoch,
            "position": self.position,
            "order": list(self.order),
            "step_in_block": self.step_in_block,
            "global_step": self.global_step,
            "ordering_options": options_of(self.ordering),
        }

    def load(self, state: Any) -> BlockSchedule:
        """A schedule like this one (same ordering, D and K) at the position ``state`` records.

        Everything is checked; nothing is changed (schedules are immutable).

        Raises:
            ValueError: a key is missing or has the wrong type or range, the ordering's options
                differ from the saved ones, or the saved order is not the one this ordering gives.
        """
        if not isinstance(state, Mapping):
            raise ValueError(f"Invalid state dict: schedule is {type(state).__name__}; accepted: a dict.")
        missing = [k for k in SCHEDULE_KEYS if k not in state]
        if missing:
            raise ValueError(f"Invalid state dict: schedule has no {missing[0]!r}; accepted: a dict with {list(SCHEDULE_KEYS)}.")
        epoch, position, step_in_block, global_step = (
            _natural(k, state[k]) for k in ("block_epoch", "position", "step_in_block", "global_step")
        )
        if step_in_block >= self.switch_every:
            raise ValueError(
                f"Invalid state dict: schedule.step_in_block is {step_in_block}; accepted: 0 ... {self.switch_every - 1} "
                f"(switch_every={self.switch_every})."
            )
        saved_options = state.get("ordering_options")
        if saved_options is not None and saved_options != options_of(self.ordering):
            raise ValueError(
                f"Invalid state dict: saved with ordering options {saved_options!r}, this optimizer's are "
                f"{options_of(self.ordering)!r}; build the optimizer with the saved ones."
            )
        order = order_for(self.ordering, self.num_blocks, epoch)
        saved_order = state["order"]
        if not isinstance(saved_order, (list, tuple)) or list(saved_order) != list(order):
            raise ValueError(
                f"Invalid state dict: block-epoch {epoch} was saved with order {saved_order!r}, this optimizer's "
                f"ordering gives {list(order)}; the ordering options (seed, start_block) differ."
            )
        if position >= len(order):
            raise ValueError(
                f"Invalid state dict: schedule.position is {position}; accepted: 0 ... {len(order) - 1} for order {list(order)}."
            )
        return attrs.evolve(
            self, block_epoch=epoch, position=position, order=order, step_in_block=step_in_block, global_step=global_step
        )
