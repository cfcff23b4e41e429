r"""The block schedule: which block is active, and for how many more steps. No model needed.

A run is a sequence of **visits**. Block-epoch :math:`t` visits the blocks in the order
:math:`\pi^t` that the ordering gives for :math:`t`; each visit lasts :math:`K` optimizer steps
(``switch_every``). Global step :math:`n` (0-based) belongs to visit :math:`\lfloor n/K \rfloor`,
the first one included. :class:`BlockSchedule` is an immutable value: :meth:`BlockSchedule.step`
returns the next one, so a schedule can be tested, saved and compared without a model.

The **revisit rule**: when the next visit is to the block that is active already (D = 1, or the
``fixed`` order), it is one longer visit and the solver state is kept; that is what makes D = 1
exactly the inner solver.

An **observing** ordering (``observes = True``, :mod:`bcd.observe`) is also given what the
optimizer saw at the visits so far; the schedule carries those observations, so its state dict
still determines every later order.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

import attrs
import torch

from bcd.checks import is_int, positive_int
from bcd.contracts import Ordering, options_of
from bcd.observe import Observations, observes

SCHEDULE_KEYS = ("block_epoch", "position", "order", "step_in_block", "global_step")


def _indices(order: Any, num_blocks: int) -> bool:
    """Whether ``order`` is a non-empty sequence of block indices ``0 ... num_blocks - 1`` (ints, not bools)."""
    return bool(order) and all(is_int(i, 0, num_blocks - 1) for i in order)


def order_for(ordering: Ordering, num_blocks: int, epoch: int, observed: Observations | None = None) -> tuple[int, ...]:
    """The ordering's order for block-epoch ``epoch``, checked; an observing ordering also gets ``observed``.

    Raises:
        ValueError: the order is empty or names a block outside ``0 ... num_blocks - 1``.
    """
    if observes(ordering):
        proposed = ordering.order(num_blocks, epoch, observed if observed is not None else Observations.empty(num_blocks))
    else:
        proposed = ordering.order(num_blocks, epoch)
    if isinstance(proposed, torch.Tensor) and proposed.ndim == 1 and not proposed.is_floating_point():
        proposed = proposed.tolist()
    order = tuple(_index(i) for i in proposed) if isinstance(proposed, (list, tuple, range)) else ()
    if not _indices(order, num_blocks):
        raise ValueError(
            f"Invalid order from ordering {type(ordering).__name__}: {proposed!r:.120}; accepted: a list of block "
            f"indices (integers, not bools, floats or strings) 0 ... {num_blocks - 1}, at least one."
        )
    return order


def _index(value: Any) -> Any:
    """An integer index as an int (numpy's too, through ``__index__``); anything else as it is, for the check to refuse."""
    if isinstance(value, int):  # bools too: the check refuses them
        return value
    try:
        return operator.index(value)
    except TypeError:
        return value


def _natural(key: str, value: Any) -> int:
    if not is_int(value, 0):
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
        steps_in_visit: steps since the active block's solver started: ``step_in_block``, plus K
            for each visit this one continues (the revisit rule).
        global_step: optimizer steps taken in all.
        observed: what the optimizer observed at the visits (measured only for an observing ordering).
        order: the current block-epoch's order (derived from the ordering when not given).
    """

    ordering: Ordering = attrs.field(eq=False)
    num_blocks: int
    switch_every: int = attrs.field(validator=lambda _, __, v: positive_int("switch_every", v))
    block_epoch: int = 0
    position: int = 0
    step_in_block: int = 0
    steps_in_visit: int = 0
    global_step: int = 0
    observed: Observations = attrs.field()
    order: tuple[int, ...] = attrs.field(converter=tuple)

    @observed.default
    def _observed(self) -> Observations:
        return Observations.empty(self.num_blocks)

    @order.default
    def _order(self) -> tuple[int, ...]:
        return order_for(self.ordering, self.num_blocks, self.block_epoch, self.observed)

    @property
    def active(self) -> int:
        """The index of the active block."""
        return self.order[self.position]

    def step(self, grad_norm: float | None = None) -> BlockSchedule:
        """The schedule after one more optimizer step: the same visit, or the next one after K steps.

        Args:
            grad_norm: the active block's gradient norm at this step, for an observing ordering.
        """
        observed = self.observed if grad_norm is None else self.observed.add(grad_norm)
        taken = self.step_in_block + 1
        if taken < self.switch_every:
            return attrs.evolve(self, step_in_block=taken, steps_in_visit=self.steps_in_visit + 1,
                                global_step=self.global_step + 1, observed=observed)
        observed = observed.close(self.active)
        position, epoch = self.position + 1, self.block_epoch
        if position == len(self.order):
            position, epoch = 0, epoch + 1
        following = BlockSchedule(
            ordering=self.ordering, num_blocks=self.num_blocks, switch_every=self.switch_every,
            block_epoch=epoch, position=position, global_step=self.global_step + 1, observed=observed,
            **({"order": self.order} if epoch == self.block_epoch else {}),
        )
        return attrs.evolve(following, steps_in_visit=self.steps_in_visit + 1) if following.continues(self) else following

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
            "steps_in_visit": self.steps_in_visit,
            "global_step": self.global_step,
            "ordering_options": options_of(self.ordering),
            "observed": self.observed.state_dict(),
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
        # Absent from dicts saved before it was kept: then the visit is taken to have begun with the block.
        steps_in_visit = _natural("steps_in_visit", state.get("steps_in_visit", step_in_block))
        if steps_in_visit < step_in_block or (steps_in_visit - step_in_block) % self.switch_every:
            raise ValueError(
                f"Invalid state dict: schedule.steps_in_visit is {steps_in_visit}; accepted: step_in_block ({step_in_block}) "
                f"plus a multiple of switch_every ({self.switch_every})."
            )
        saved_options = state.get("ordering_options")
        if saved_options is not None and saved_options != options_of(self.ordering):
            raise ValueError(
                f"Invalid state dict: saved with ordering options {saved_options!r}, this optimizer's are "
                f"{options_of(self.ordering)!r}; build the optimizer with the saved ones."
            )
        saved_order = state["order"]
        observed = (Observations.load(state["observed"], self.num_blocks, self.switch_every) if "observed" in state
                    else Observations.empty(self.num_blocks))  # absent from dicts saved before it was recorded
        if observes(self.ordering):
            # The order came from what was observed before this block-epoch: the saved one is the record.
            if not isinstance(saved_order, (list, tuple)) or not _indices(saved_order, self.num_blocks):
                raise ValueError(f"Invalid state dict: schedule.order is {saved_order!r:.80}; accepted: a non-empty list "
                                 f"of block indices 0 ... {self.num_blocks - 1}.")
            order = tuple(saved_order)
        else:
            order = order_for(self.ordering, self.num_blocks, epoch)
            if not isinstance(saved_order, (list, tuple)) or list(saved_order) != list(order):
                raise ValueError(
                    f"Invalid state dict: block-epoch {epoch} was saved with order {saved_order!r}, this optimizer's "
                    f"ordering gives {list(order)}; the ordering options (seed, start_block) differ."
                )
        if position >= len(order):
            raise ValueError(
                f"Invalid state dict: schedule.position is {position}; accepted: 0 ... {len(order) - 1} for order {list(order)}."
            )
        return attrs.evolve(self, block_epoch=epoch, position=position, order=order, step_in_block=step_in_block,
                            steps_in_visit=steps_in_visit, global_step=global_step, observed=observed)
