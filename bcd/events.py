"""Values passed to event hooks."""

from __future__ import annotations

import attrs

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
        reason: ``"start"``, ``"switch"`` or ``"resume"``.
    """

    block: Block
    block_index: int
    previous: Block | None
    block_epoch: int
    position: int
    global_step: int
    reason: str
