"""What a partitioner, an ordering and a solver factory must be, checked when an optimizer is built.

The optimizer takes each piece as a registered **name** (with an options dict) or as an
**object**: a partitioner object, an ordering object, a solver factory such as
``functools.partial(torch.optim.AdamW, betas=(0.9, 0.95))``. Either way :func:`resolve` returns
the object, checked against its :class:`typing.Protocol`, and the name the state dict records (the
registered name when the object's class or factory is registered, so the two spellings save the
same state dict).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import attrs
import torch
from torch import nn

from bcd import plugins
from bcd.blocks import Partition
from bcd.checks import is_int


@runtime_checkable
class Partitioner(Protocol):
    """Splits a model's candidate parameters into blocks.

    Attributes:
        dynamic: asked again at every block-epoch (True) or once (False). A dynamic partitioner
            may regroup the same parameters into the same number of blocks, nothing else.

    A partitioner may also define ``block_limit(partition, params) -> int``: the most elements a
    block holds when the user sets no ``max_block_params`` (:func:`block_limit`). Splitting is
    not its job: the optimizer splits larger blocks by rows around any partitioner.
    """

    dynamic: bool

    def partition(self, model: nn.Module, params: Mapping[str, nn.Parameter], epoch: int) -> Partition:
        """The partition of ``params`` (candidates by qualified name, model order) for block-epoch ``epoch``."""


@runtime_checkable
class Ordering(Protocol):
    """Orders the visits of a block-epoch (an :class:`ObservingOrdering` is the other kind)."""

    def order(self, num_blocks: int, epoch: int) -> Sequence[int]:
        """The block indices to visit in block-epoch ``epoch``: a pure function of the options and arguments."""


@runtime_checkable
class ObservingOrdering(Protocol):
    """An ordering that adapts to what the optimizer saw: its class sets ``observes = True``.

    bcd then measures the active block's gradient norm at every step and calls ``order`` with the
    observations (:class:`bcd.observe.Observations`), which the schedule carries in its state
    dict, so the order stays a pure function of options, arguments and ``observed``.
    """

    observes: ClassVar[bool]

    def order(self, num_blocks: int, epoch: int, observed: Any) -> Sequence[int]:
        """The block indices to visit in block-epoch ``epoch``, given the observations so far."""


def block_limit(partitioner: Any, name: str, partition: Partition, params: Mapping[str, nn.Parameter]) -> int | None:
    """The partitioner's own default for ``max_block_params`` (its ``block_limit``), or None.

    Raises:
        ValueError: it returned something other than an integer >= 1.
    """
    method = getattr(partitioner, "block_limit", None)
    if method is None:
        return None
    limit = method(partition, params)
    if not is_int(limit, 1):
        raise ValueError(f"Invalid block_limit from partitioner {name!r}: {limit!r}; accepted: an integer >= 1.")
    return limit


SolverFactory = Callable[..., torch.optim.Optimizer]

_REQUIRED = {"partitioner": ("partition", "dynamic"), "ordering": ("order",)}


def check(kind: str, obj: Any) -> None:
    """Refuse an object that lacks what its kind's Protocol requires.

    Raises:
        ValueError: naming the object's type and each missing member.
    """
    missing = [m for m in _REQUIRED[kind] if not hasattr(obj, m)]
    missing += [m for m in _REQUIRED[kind] if m != "dynamic" and hasattr(obj, m) and not callable(getattr(obj, m))]
    if missing:
        raise ValueError(
            f"Invalid {kind}: {obj!r:.60} ({type(obj).__name__}) has no {', '.join(missing)}; accepted: a registered "
            f"{kind} name or an object with {', '.join(_REQUIRED[kind])} (bcd.contracts.{kind.capitalize()})."
        )
    if kind == "partitioner" and not isinstance(obj.dynamic, bool):
        raise ValueError(f"Invalid partitioner: {type(obj).__name__}.dynamic is {obj.dynamic!r}; accepted: True or False.")
    _check_signature(kind, obj)


# The positional arguments each method is called with, by kind, and for an observing ordering.
_CALLS = {"partitioner": ("partition", ("model", "params", "epoch")), "ordering": ("order", ("num_blocks", "epoch"))}


def _check_signature(kind: str, obj: Any) -> None:
    """Refuse a method that cannot take the arguments bcd calls it with (found now, not mid-run)."""
    method, arguments = _CALLS[kind]
    if kind == "ordering" and getattr(obj, "observes", False) is True:
        arguments = (*arguments, "observed")
    try:
        signature = inspect.signature(getattr(obj, method))
    except (TypeError, ValueError):  # a builtin or extension without a signature: trusted
        return
    try:
        signature.bind(*arguments)
    except TypeError as error:
        observing = " (observes = True)" if len(arguments) == 3 and kind == "ordering" else ""
        raise ValueError(
            f"Invalid {kind}: {type(obj).__name__}.{method}{signature} cannot be called as "
            f"{method}({', '.join(arguments)}){observing}: {error}; accepted: a method taking those "
            f"{len(arguments)} positional arguments (bcd.contracts.{kind.capitalize()})."
        ) from None


def options_of(obj: Any) -> dict[str, Any] | None:
    """The options an attrs-built plugin object was made with (plain data), else None."""
    if attrs.has(type(obj)):
        return attrs.asdict(obj, recurse=True, value_serializer=lambda _, __, v: list(v) if isinstance(v, tuple) else v)
    return None


def _registered_name(kind: str, factory: Any) -> str | None:
    for registration in plugins.registry()[kind].values():
        if registration.factory is factory:
            return registration.name
    return None


def resolve(kind: str, spec: Any, options: Mapping[str, Any] | None) -> tuple[Any, str]:
    """A partitioner or ordering from a registered name and options, or an object given as is.

    Returns:
        ``(object, name)``; the name is the registered one, or the class's qualified name.

    Raises:
        ValueError: unknown name, bad options, options given with an object, or an object that
            breaks the Protocol.
    """
    if isinstance(spec, str):
        if options is not None and not isinstance(options, Mapping):  # named as the user wrote it
            raise ValueError(f"Invalid {kind}_options: {options!r}; accepted: a dict of keyword options.")
        obj = plugins.create(kind, spec, dict(options or {}))
        name = spec
    else:
        if options:
            raise ValueError(
                f"Invalid {kind} options {dict(options)!r} with a {kind} object; accepted: options only with a "
                f"registered name (build the object with its options instead)."
            )
        obj = spec
        name = _registered_name(kind, type(obj)) or type(obj).__qualname__
    check(kind, obj)
    return obj, name


def resolve_solver(spec: str | SolverFactory) -> tuple[SolverFactory, str]:
    """A solver factory from a registered name, or a callable given as is (a class or a ``functools.partial``).

    Raises:
        ValueError: unknown name, or neither a name nor a callable.
    """
    if isinstance(spec, str):
        return plugins.lookup("solver", spec).factory, spec
    if not callable(spec):
        raise ValueError(
            f"Invalid solver: {spec!r}; accepted: a registered solver name or a callable factory(params, **options) "
            "returning a torch.optim.Optimizer, e.g. functools.partial(torch.optim.AdamW, betas=(0.9, 0.95))."
        )
    base = spec.func if isinstance(spec, functools.partial) and not spec.args else spec
    name = _registered_name("solver", base) or getattr(base, "__qualname__", type(base).__name__)
    return spec, name
