"""Block-switch events: the value passed to hooks, and the hooks an optimizer calls."""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from torch.utils.hooks import RemovableHandle

from bcd.blocks import Block


@attrs.frozen(kw_only=True)
class BlockSwitch:
    """One activation of a block, as passed to hooks registered with ``register_block_switch_hook``.

    Attributes:
        block: the block now active.
        block_index: its index in the partition.
        previous: the block active before, or None for the first activation of an optimizer
            (at construction, or when ``load_state_dict`` restores a position).
        block_epoch: the block-epoch the new block belongs to (0-based).
        position: the new block's position within that block-epoch's order.
        global_step: optimizer steps taken so far; the new block gets steps
            ``global_step ... global_step + K - 1``.
        reason: ``"start"``, ``"switch"`` or ``"resume"``; ``"adopt"`` when a wrapper built after
            the optimizer (DDP, FSDP2) ran its first forward: the parameters were re-read by name
            and every block but the active one frozen (the same block, no new visit).
    """

    block: Block
    block_index: int
    previous: Block | None
    block_epoch: int
    position: int
    global_step: int
    reason: str

    @classmethod
    def at(cls, schedule: Any, partition: Sequence[Block], previous: Block | None, reason: str) -> BlockSwitch:
        """The activation of ``schedule``'s active block of ``partition`` (a :class:`bcd.BlockSchedule`)."""
        return cls(block=partition[schedule.active], block_index=schedule.active, previous=previous,
                   block_epoch=schedule.block_epoch, position=schedule.position, global_step=schedule.global_step,
                   reason=reason)


class SwitchHooks:
    """Hooks called with ``(optimizer, event)`` at every block activation, in registration order."""

    def __init__(self) -> None:
        self.hooks: collections.OrderedDict[int, Callable[[Any, BlockSwitch], None]] = collections.OrderedDict()

    def register(self, hook: Callable[[Any, BlockSwitch], None], prepend: bool = False) -> RemovableHandle:
        """Add ``hook`` (first when ``prepend``, as torch's module hooks do); returns a removable handle."""
        handle = RemovableHandle(self.hooks)
        self.hooks[handle.id] = hook
        if prepend:
            self.hooks.move_to_end(handle.id, last=False)
        return handle

    def __call__(self, optimizer: Any, event: BlockSwitch) -> None:
        for hook in list(self.hooks.values()):  # a hook may remove itself
            hook(optimizer, event)
