"""Blocks and partitions: which parameters, or rows of them, are trained together.

A :class:`Partition` is a frozen value naming its parameters by their qualified names in the
model (``model.named_parameters()``, where a tied tensor appears once, under its first name).
Names rather than tensors keep a partition comparable across processes, which is what lets a
state dict refuse to load into a different model or partition.

An entry may also name a **row block**: a contiguous range of rows (dim 0) of one tensor,
written ``"lm_head.weight[0:42752]"``. A tensor larger than a transformer layer (a modern
vocabulary's embedding or head) is then spread over several blocks, so that no block costs more
than one layer (:meth:`Partition.limit`). The row ranges of a tensor must tile it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

import attrs
import torch
from torch import nn

from bcd.checks import positive_int
from bcd.distributed import sharded


_ROWS = re.compile(r"^(?P<name>.+)\[(?P<start>\d+):(?P<stop>\d+)\]$")


def parse_entry(entry: str) -> tuple[str, tuple[int, int] | None]:
    """``"w[3:7]"`` as ``("w", (3, 7))``; a whole tensor's name as ``(name, None)``."""
    match = _ROWS.match(entry)
    if match is None:
        return entry, None
    return match["name"], (int(match["start"]), int(match["stop"]))


def rows_entry(name: str, start: int, stop: int) -> str:
    """The entry naming rows ``start ... stop - 1`` of tensor ``name``."""
    return f"{name}[{start}:{stop}]"


def entry_shape(entry: str, params: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    """The shape of what ``entry`` names: the tensor's, or its row range's."""
    name, rows = parse_entry(entry)
    shape = tuple(params[name].shape)
    return shape if rows is None else (rows[1] - rows[0], *shape[1:])


def entry_numel(entry: str, params: Mapping[str, torch.Tensor]) -> int:
    """The number of elements ``entry`` names."""
    return math.prod(entry_shape(entry, params))


def _non_empty_names(instance: Block, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
    if not value:
        raise ValueError(f"Invalid block {instance.name!r}: it has no parameters; a block needs at least one.")
    for entry in value:
        rows = parse_entry(entry)[1]
        if rows is not None and rows[0] >= rows[1]:
            raise ValueError(
                f"Invalid block {instance.name!r}: entry {entry!r} has an empty row range; accepted: "
                "'name[start:stop]' with start < stop."
            )


@attrs.frozen(kw_only=True)
class Block:
    """A named set of parameters that are trained together.

    Attributes:
        name: a readable name, e.g. ``"model.layers.3"`` or ``"embedding"``.
        param_names: qualified parameter names (or row entries ``"name[start:stop]"``), in model order.
    """

    name: str
    param_names: tuple[str, ...] = attrs.field(converter=tuple, validator=_non_empty_names)

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """The names of the tensors the block touches, each once, in order."""
        return tuple(dict.fromkeys(parse_entry(entry)[0] for entry in self.param_names))

    @property
    def row_spans(self) -> dict[str, list[tuple[int, int]]]:
        """The row ranges the block holds of each tensor it holds only in part."""
        return _spans(self.param_names)


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
        # Per tensor: the (start, stop, block) ranges claimed so far; a whole tensor claims all rows.
        owner: dict[str, list[tuple[float, float, str]]] = {}
        names: set[str] = set()
        for block in blocks:
            if block.name in names:
                raise ValueError(f"Invalid partition: two blocks are named {block.name!r}; block names must be unique.")
            names.add(block.name)
            for entry in block.param_names:
                name, rows = parse_entry(entry)
                start, stop = rows if rows is not None else (0, math.inf)
                for other_start, other_stop, other in owner.get(name, ()):
                    if start < other_stop and other_start < stop:
                        raise ValueError(
                            f"Invalid partition: parameter {entry!r} is in block {other!r} and in block {block.name!r}"
                            f"{'' if entry == name else f' (rows overlap what {other!r} holds of {name!r})'}; "
                            "every parameter (or row) must be in exactly one block."
                        )
                owner.setdefault(name, []).append((start, stop, block.name))

    def __len__(self) -> int:
        return len(self.blocks)

    def __iter__(self):
        return iter(self.blocks)

    def __getitem__(self, index: int) -> Block:
        return self.blocks[index]

    @property
    def param_names(self) -> tuple[str, ...]:
        """Every entry (parameter name or row entry) in the partition, block by block."""
        return tuple(name for block in self.blocks for name in block.param_names)

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """The names of the tensors the partition touches, each once."""
        return tuple(dict.fromkeys(name for block in self.blocks for name in block.tensor_names))

    @property
    def row_spans(self) -> dict[str, list[tuple[int, int]]]:
        """The row ranges, over all blocks, of each tensor given by rows."""
        return _spans(self.param_names)

    def limit(self, params: Mapping[str, torch.Tensor], max_block_params: int) -> Partition:
        """This partition with every block larger than ``max_block_params`` elements split.

        The block's entries are cut into units no larger than the limit (a tensor too large
        becomes near-equal row ranges; a single row is never split, nor is a sharded tensor),
        then packed in order into as few consecutive blocks as fit, named ``"<block>/0"``,
        ``"<block>/1"``, ...

        Raises:
            ValueError: ``max_block_params`` is not an integer >= 1.
        """
        positive_int("max_block_params", max_block_params)
        blocks: list[Block] = []
        for block in self.blocks:
            if block_numel(block, params) <= max_block_params:
                blocks.append(block)
                continue
            packs: list[list[str]] = [[]]
            size = 0
            for piece in (p for entry in block.param_names for p in _row_units(entry, params, max_block_params)):
                numel = entry_numel(piece, params)
                if packs[-1] and size + numel > max_block_params:
                    packs.append([])
                    size = 0
                packs[-1].append(piece)
                size += numel
            blocks.extend(Block(name=f"{block.name}/{i}", param_names=pack) for i, pack in enumerate(packs))
        return Partition(tuple(blocks))

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


def _spans(entries: Iterable[str]) -> dict[str, list[tuple[int, int]]]:
    spans: dict[str, list[tuple[int, int]]] = {}
    for entry in entries:
        name, rows = parse_entry(entry)
        if rows is not None:
            spans.setdefault(name, []).append(rows)
    return spans


def _row_units(entry: str, params: Mapping[str, torch.Tensor], limit: int) -> list[str]:
    """``entry`` as row entries of near-equal size no larger than ``limit`` (one row at least).

    A sharded tensor (FSDP2's DTensor, whose rows are spread over ranks already) stays whole.
    """
    numel = entry_numel(entry, params)
    name, rows = parse_entry(entry)
    shape = tuple(params[name].shape)
    if numel <= limit or not shape or shape[0] <= 1 or sharded(params[name]):
        return [entry]
    start, stop = rows if rows is not None else (0, shape[0])
    pieces = min(stop - start, -(-numel // limit))
    bounds = [start + (stop - start) * i // pieces for i in range(pieces + 1)]
    return [rows_entry(name, a, b) for a, b in zip(bounds, bounds[1:])]


def check_rows(partition: Partition, params: Mapping[str, torch.Tensor]) -> None:
    """Every tensor given by row ranges is tiled by them exactly, within its rows.

    Raises:
        ValueError: naming the tensor, its rows and the ranges found.
    """
    for name, spans in partition.row_spans.items():
        param = params[name]
        spans.sort()
        covered = param.ndim >= 1 and spans[0][0] == 0 and spans[-1][1] == param.shape[0] and all(
            a[1] == b[0] for a, b in zip(spans, spans[1:]))
        if not covered:
            raise ValueError(
                f"Invalid partition: the row ranges of {name!r} are {spans}, which do not tile its "
                f"{param.shape[0] if param.ndim else 0} rows; accepted: contiguous ranges from 0 to the row count."
            )


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
    """The number of elements in a block's parameters or rows (global size, also for sharded tensors)."""
    return sum(entry_numel(entry, params) for entry in block.param_names)
