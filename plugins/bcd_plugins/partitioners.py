"""Built-in partitioners: ``layer``, ``random-subset``, ``per-module`` and ``explicit``.

Each is a frozen attrs class: its fields are its options, ``partition(model, params, epoch)``
returns a :class:`bcd.Partition` over ``params`` (the parameters trainable when the optimizer was
built, by qualified name, in model order). Parameters a partitioner leaves out are frozen by the
optimizer and never trained.

None of them splits tensors: the optimizer's ``max_block_params`` does, around any partitioner
(:meth:`bcd.Partition.limit`). The ``layer`` partitioner names its default limit with
``block_limit``, the size of the model's largest layer, so an embedding or head larger than a
layer (Llama-3's 128K vocabulary) becomes a few row blocks; the others do not split unless asked.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

import attrs
import torch
from torch import nn

from bcd.blocks import Block, Partition, block_numel, parse_entry
from bcd.checks import flag, integer, positive_int, validator
from bcd.hookspecs import hookimpl
from bcd.layers import find_layer_stacks


_flag, _int = validator(flag), validator(integer)


def _in_module(module_name: str, param_name: str) -> bool:
    return not module_name or param_name.startswith(module_name + ".")


@attrs.frozen(kw_only=True)
class LayerPartitioner:
    """One block per transformer layer, plus an embedding block and a head block.

    The layers are found structurally (:func:`bcd.layers.find_layer_stacks`), so Llama
    (``model.layers.N``), GPT-2 (``transformer.h.N``), BERT (``encoder.layer.N``), T5/BART (both
    stacks) and plain ``nn.Sequential`` models all work. Parameters outside the stacks go to:

    - the **embedding** block: those registered before the first stack, and every ``nn.Embedding``
      outside the stacks (e.g. a decoder's position embeddings);
    - the **head** block: everything else (final norms, output head, pooler, classifier).

    A tied output head shares the embedding's tensor and is counted once, in the embedding block.
    No block is larger than a layer unless asked: :meth:`block_limit` is the default of the
    optimizer's ``max_block_params``, so a larger embedding or head becomes row blocks
    (``embedding/0``, ...).

    Args:
        include_embedding: train the embedding block; when False its parameters stay frozen.
        include_head: train the head block; when False its parameters stay frozen.
    """

    include_embedding: bool = attrs.field(default=True, validator=_flag)
    include_head: bool = attrs.field(default=True, validator=_flag)
    dynamic = False

    def block_limit(self, partition: Partition, params: Mapping[str, nn.Parameter]) -> int:
        """The largest layer's size: the most elements a block holds when the user sets no limit."""
        return max(block_numel(b, params) for b in partition if b.name not in ("embedding", "head"))

    def partition(self, model: nn.Module, params: Mapping[str, nn.Parameter], epoch: int) -> Partition:
        stacks = find_layer_stacks(model, params)
        if not stacks:
            raise ValueError(
                f"Invalid model for the 'layer' partitioner: no repeated layer stack (a nn.ModuleList or "
                f"nn.Sequential of same-typed modules holding trainable parameters) found in "
                f"{type(model).__name__}; use the 'per-module' or 'explicit' partitioner instead."
            )
        names = list(params)
        layer_blocks: list[Block] = []
        in_layers: set[str] = set()
        for stack in stacks:
            for layer in stack.layer_names:
                members = [n for n in names if _in_module(layer, n)]
                in_layers.update(members)
                layer_blocks.append(Block(name=layer, param_names=members))
        first_layer_param = names.index(layer_blocks[0].param_names[0])
        embedding_modules = [
            name for name, module in model.named_modules() if isinstance(module, nn.Embedding) and name
        ]
        embedding, head = [], []
        for position, name in enumerate(names):
            if name in in_layers:
                continue
            if position < first_layer_param or any(_in_module(m, name) for m in embedding_modules):
                embedding.append(name)
            else:
                head.append(name)
        blocks = []
        if self.include_embedding and embedding:
            blocks.append(Block(name="embedding", param_names=embedding))
        blocks.extend(layer_blocks)
        if self.include_head and head:
            blocks.append(Block(name="head", param_names=head))
        return Partition(blocks)


@attrs.frozen(kw_only=True)
class RandomSubsetPartitioner:
    """``num_blocks`` blocks of near-equal parameter count, drawn at random from the tensors.

    The tensors are shuffled with a generator seeded by ``seed`` (and the block-epoch when
    ``redraw``), then each goes to the block with the fewest elements so far. Blocks are named
    ``subset.0`` ... and, within each, parameters keep model order.

    Args:
        num_blocks: D, at least 1 and at most the number of parameter tensors.
        seed: the seed of the draw.
        redraw: draw a new partition at the start of every block-epoch.
    """

    num_blocks: int
    seed: int = attrs.field(default=0, validator=_int)
    redraw: bool = attrs.field(default=False, validator=_flag)

    def __attrs_post_init__(self) -> None:
        positive_int("num_blocks", self.num_blocks)

    @property
    def dynamic(self) -> bool:
        return self.redraw

    def partition(self, model: nn.Module, params: Mapping[str, nn.Parameter], epoch: int) -> Partition:
        names = list(params)
        if self.num_blocks > len(names):
            raise ValueError(
                f"Invalid num_blocks: {self.num_blocks}; the model has only {len(names)} trainable "
                f"parameter tensors, so accepted: 1 ... {len(names)}."
            )
        generator = torch.Generator().manual_seed(self.seed + (epoch if self.redraw else 0))
        shuffled = torch.randperm(len(names), generator=generator).tolist()
        sizes = [0] * self.num_blocks
        members: list[set[str]] = [set() for _ in range(self.num_blocks)]
        # The first num_blocks tensors seed one block each, so no block is left empty.
        for rank, index in enumerate(shuffled):
            target = rank if rank < self.num_blocks else min(range(self.num_blocks), key=sizes.__getitem__)
            members[target].add(names[index])
            sizes[target] += params[names[index]].numel()
        return Partition(tuple(
            Block(name=f"subset.{i}", param_names=[n for n in names if n in members[i]]) for i in range(self.num_blocks)
        ))


@attrs.frozen(kw_only=True)
class PerModulePartitioner:
    """One block per module of chosen kinds, e.g. attention and MLP of every layer.

    The paper's D = 64 split of Llama 2-7B is ``modules=["LlamaAttention", "LlamaMLP"]``. Only the
    outermost matching modules count: a matched module's sub-modules are part of its block.

    Args:
        modules: class names (``"Linear"``, ``"LlamaMLP"``) or classes to match.
        rest: what to do with parameters in no matched module: ``"block"`` puts them in one last
            block named ``rest``; ``"freeze"`` leaves them frozen.
    """

    modules: tuple[str | type, ...] = attrs.field(converter=lambda v: (v,) if isinstance(v, (str, type)) else tuple(v))
    rest: str = "block"

    def __attrs_post_init__(self) -> None:
        if not self.modules:
            raise ValueError("Invalid modules: (); accepted: one or more module class names or classes.")
        if self.rest not in ("block", "freeze"):
            raise ValueError(f"Invalid rest: {self.rest!r}; accepted: 'block', 'freeze'.")

    dynamic = False

    def _matches(self, module: nn.Module) -> bool:
        for kind in self.modules:
            if isinstance(kind, type) and isinstance(module, kind):
                return True
            if isinstance(kind, str) and type(module).__name__ == kind:
                return True
        return False

    def partition(self, model: nn.Module, params: Mapping[str, nn.Parameter], epoch: int) -> Partition:
        names = list(params)
        matched: list[str] = []
        for module_name, module in model.named_modules():
            if any(_in_module(m, module_name) for m in matched):
                continue
            if self._matches(module):
                matched.append(module_name)
        blocks: list[Block] = []
        assigned: set[str] = set()
        for module_name in matched:
            members = [n for n in names if _in_module(module_name, n) and n not in assigned]
            if members:
                assigned.update(members)
                blocks.append(Block(name=module_name or "model", param_names=members))
        if not blocks:
            kinds = sorted({type(m).__name__ for m in model.modules()})
            raise ValueError(
                f"Invalid modules for the 'per-module' partitioner: {list(self.modules)!r} match no module holding "
                f"trainable parameters; module classes in this model: {', '.join(kinds)}."
            )
        rest = [n for n in names if n not in assigned]
        if rest and self.rest == "block":
            blocks.append(Block(name="rest", param_names=rest))
        return Partition(blocks)


@attrs.frozen(kw_only=True)
class ExplicitPartitioner:
    """A partition spelled out by the user.

    Args:
        blocks: ``{block name: [names, fnmatch patterns or row entries "name[a:b]"]}``, or a list
            of such lists (blocks then are named ``block.0`` ...). Every trainable parameter must match exactly one
            block, and every pattern must match something; freeze what you do not want trained
            (``requires_grad=False``) before building the optimizer.
    """

    blocks: Mapping[str, Sequence[str]] | Sequence[Sequence[str]] = attrs.field()
    dynamic = False

    @blocks.validator
    def _check_blocks(self, attribute, value) -> None:
        groups = value.values() if isinstance(value, Mapping) else value
        if isinstance(value, str) or not isinstance(value, (Mapping, Sequence)) or not all(
                isinstance(g, str) or (isinstance(g, Sequence) and all(isinstance(p, str) for p in g)) for g in groups):
            raise ValueError(
                f"Invalid blocks: {value!r}; accepted: {{block name: [names or patterns]}} or a list of name lists."
            )

    def partition(self, model: nn.Module, params: Mapping[str, nn.Parameter], epoch: int) -> Partition:
        if isinstance(self.blocks, Mapping):
            spec = list(self.blocks.items())
        else:
            spec = [(f"block.{i}", patterns) for i, patterns in enumerate(self.blocks)]
        if not spec:
            raise ValueError("Invalid explicit partition: no blocks given; accepted: a mapping or list of name lists.")
        names = list(params)
        owner: dict[str, str] = {}
        members: dict[str, list[str]] = {}
        for block_name, patterns in spec:
            if isinstance(patterns, str):
                patterns = [patterns]
            members[block_name] = []
            for pattern in patterns:
                base, rows = parse_entry(pattern)
                # "name[a:b]": rows of one tensor, named exactly (the ranges must tile it, checked later).
                hits = [pattern] if rows is not None and base in params else [
                    n for n in names if fnmatch.fnmatchcase(n, pattern)]
                if not hits:
                    raise ValueError(
                        f"Invalid explicit partition: pattern {pattern!r} of block {block_name!r} matches no "
                        f"trainable parameter; trainable names start with {names[:3]}."
                    )
                for name in hits:
                    if owner.get(name, block_name) != block_name:
                        raise ValueError(
                            f"Invalid explicit partition: parameter {name!r} is in block {owner[name]!r} and in "
                            f"block {block_name!r}; every parameter must be in exactly one block."
                        )
                    if name not in owner:
                        owner[name] = block_name
                        members[block_name].append(name)
        split = {parse_entry(e)[0] for e in owner if parse_entry(e)[1] is not None}
        missing = [n for n in names if n not in owner and n not in split]
        if missing:
            raise ValueError(
                f"Invalid explicit partition: {len(missing)} trainable parameter(s) are in no block, e.g. "
                f"{missing[:5]}; list them in a block, or set requires_grad=False on them before building the optimizer."
            )
        # Parameters keep model order inside a block, whatever the order of the patterns.
        order = {n: i for i, n in enumerate(names)}
        return Partition(tuple(
            Block(name=b, param_names=sorted(m, key=lambda e: (order[parse_entry(e)[0]], parse_entry(e)[1] or ())))
            for b, m in members.items()
        ))


@hookimpl
def register_partitioners(register) -> None:
    register("layer", LayerPartitioner)
    register("random-subset", RandomSubsetPartitioner)
    register("per-module", PerModulePartitioner)
    register("explicit", ExplicitPartitioner)
