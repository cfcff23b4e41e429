"""The hooks a bcd plugin may implement. Specifications only: no behaviour lives here.

A plugin is any object (usually a module) with functions marked ``@bcd.hookimpl`` whose names
match the specifications below. Built-in plugins live in the ``bcd_plugins`` package and are
registered through the ``bcd`` entry-point group, exactly like a third party's.

To observe one optimizer's block switches, use
:meth:`bcd.BlockCoordinateOptimizer.register_block_switch_hook`: an observer belongs to an
optimizer, not to the process. The three ``register_*`` hooks follow one pattern: bcd calls them with a ``register`` callback
and the plugin calls ``register(name, factory)`` once per thing it provides. Names are global
across all plugins of a kind; a duplicate name is refused when the registry is built.
"""

from __future__ import annotations

from typing import Callable

import pluggy

hookspec = pluggy.HookspecMarker("bcd")
hookimpl = pluggy.HookimplMarker("bcd")


@hookspec
def register_partitioners(register: Callable[[str, Callable], None]) -> None:
    """Register partitioners: factories that split a model's trainable parameters into blocks.

    Called once whenever bcd builds its registry (first lookup, and again after a plugin is
    registered or unregistered).

    Args:
        register: call ``register(name, factory)`` for each partitioner. ``factory(**options)``
            returns an object with ``partition(model: torch.nn.Module, params: Mapping[str,
            Parameter], epoch: int) -> bcd.Partition`` and a ``dynamic: bool`` attribute.
            ``params`` are the candidates: the parameters that required grad when the optimizer
            was built, by qualified name, in model order (do not read ``requires_grad`` inside
            ``partition``: bcd has frozen the inactive blocks by then). The partition may leave
            candidates out; those stay frozen. ``partition`` must be a pure function of its
            options, the model's structure and ``epoch`` (seed a ``torch.Generator`` from them);
            a ``dynamic`` partitioner is asked again at the start of every block-epoch, a static
            one only once. Invalid options raise ``ValueError``.
    """


@hookspec
def register_orderings(register: Callable[[str, Callable], None]) -> None:
    """Register orderings: the order in which a block-epoch visits the blocks.

    Called once whenever bcd builds its registry.

    Args:
        register: call ``register(name, factory)`` for each ordering. ``factory(**options)``
            returns an object with ``order(num_blocks: int, epoch: int) -> Sequence[int]``: the
            block indices to visit in block-epoch ``epoch``. It must be a pure function of its
            options and arguments; that is what makes resume exact without saving RNG state. An
            ordering whose class sets ``observes = True`` is called ``order(num_blocks, epoch,
            observed)`` with the gradient norms seen at the visits (:mod:`bcd.observe`), which
            the state dict keeps.
    """


@hookspec
def register_solvers(register: Callable[[str, Callable], None]) -> None:
    """Register inner solvers: the optimizer that updates the active block.

    Called once whenever bcd builds its registry.

    Args:
        register: call ``register(name, factory)`` for each solver. ``factory(params,
            **hyperparameters)`` returns a ``torch.optim.Optimizer`` (a ``torch.optim`` class
            itself is such a factory). ``params`` is a list of parameter-group dicts. bcd keeps the
            hyperparameters in its own ``param_groups`` and copies them into the solver's groups
            before every step, so LR schedulers see and change them as usual.
    """
