"""Blocks and partitions: which parameters are trained together.

A :class:`Partition` is a frozen value naming its parameters by their qualified names in the
model (``model.named_parameters()``, where a tied tensor appears once, under its first name).
Names rather than tensors keep a partition comparable across processes, which is what lets a
state dict refuse to load into a different model or partition.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import attrs
import torch
from torch import nn


def _non_empty_names(instance: Block, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
    if not value:
        raise ValueError(f"Invalid block {instance.name!r}: it has no parameters; a block needs at least one.")


@attrs.frozen(kw_only=True)
class Block:
    """A named set of parameters that are trained together.

    Attributes:
        name: a readable name, e.g. ``"model.layers.3"`` or ``"embedding"``.
        param_names: qualified parameter names, in model order.
    """

    name: str
    param_names: tuple[str, ...] = attrs.field(converter=tuple, validator=_non_empty_names)


@attrs.frozen
class Partition:
    """An ordered tuple of disjoint, non-empty blocks.

    Block indices follow model order (input to output) by convention, so the ``ascending``
    order means input to output.
    """

    blocks: tuple[Block, ...] = attrs.field(converter=tuple)

    @blocks.validator
    def _check(self, attribute: attrs.Attribute, blocks: tuple[Block, ...]) -> None:
        if not blocks:
            raise ValueError("Invalid partition: it has no blocks; a partition needs at least one block.")
        owner: dict[str, str] = {}
        names: set[str] = set()
        for block in blocks:
            if block.name in names:
                raise ValueError(f"Invalid partition: two blocks are named {block.name!r}; block names must be unique.")
            names.add(block.name)
            for name in block.param_names:
                if name in owner:
                    raise ValueError(
                        f"Invalid partition: parameter {name!r} is in block {owner[name]!r} and in block "
                        f"{block.name!r}; every parameter must be in exactly one block."
                    )
                owner[name] = block.name

    def __len__(self) -> int:
        return len(self.blocks)

    def __iter__(self):
        return iter(self.blocks)

    def __getitem__(self, index: int) -> Block:
        return self.blocks[index]

    @property
    def param_names(self) -> tuple[str, ...]:
        """Every parameter name in the partition, block by block."""
        return tuple(name for block in self.blocks for name in block.param_names)

    def index(self, block_name: str) -> int:
        """The index of the block called ``block_name``.

        Raises:
            ValueError: no block has that name.
        """
        for i, block in enumerate(self.blocks):
            if block.name == block_name:
                return i
        raise ValueError(f"Unknown block name: {block_name!r}; the blocks are {[b.name for b in self.blocks]}.")

    def fingerprint(self) -> list[list[str]]:
        """A plain-data description of the partition, stored in state dicts to detect mismatches."""
        return [[block.name, *block.param_names] for block in self.blocks]

    @classmethod
    def from_groups(cls, groups: Mapping[str, Iterable[str]] | Sequence[Iterable[str]]) -> Partition:
        """Build a partition from ``{block name: parameter names}`` or a list of name lists.

        Unnamed groups are called ``"block.0"``, ``"block.1"``, ...
        """
        if isinstance(groups, Mapping):
            items = list(groups.items())
        else:
            items = [(f"block.{i}", names) for i, names in enumerate(groups)]
        return cls(tuple(Block(name=name, param_names=tuple(names)) for name, names in items))


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters of ``model`` that require grad, by qualified name, tied tensors once.

    Raises:
        ValueError: the model has no trainable parameter.
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(
            f"Invalid model: {type(model).__name__} has no trainable parameters (every parameter has "
            "requires_grad=False); bcd trains the parameters that require grad when the optimizer is built."
        )
    return params


def block_numel(block: Block, params: Mapping[str, torch.Tensor]) -> int:
    """The number of elements in a block's parameters (global size, also for sharded tensors)."""
    return sum(params[name].numel() for name in block.param_names)
