"""Checking and resolving everything a :class:`bcd.BlockCoordinateOptimizer` is built from, before it changes anything.

:func:`compose` turns the constructor's arguments (names with options, or objects) into a
:class:`Composition`: the candidates, the partition, the schedule, the solver factory and its
defaults, the outer groups. Every mistake is a ``ValueError`` naming the value received and what
is accepted, raised while the model is still untouched.
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch
from torch import nn

from bcd import checkpointing, contracts, cost, distributed, plugins, quantized
from bcd.blocks import Partition, check_rows, trainable_parameters
from bcd.checks import flag, is_number, positive_int
from bcd.groups import check_hyperparameters, outer_groups
from bcd.observe import observes
from bcd.cost import needs_master
from bcd.schedule import BlockSchedule
from bcd.rowgrad import is_rows
from bcd.tenure import owner_of


def candidates_of(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters bcd trains in ``model``, by qualified name: the candidates.

    Those that require grad now, and those the optimizer driving the model (or a model it wraps)
    took as candidates, which it may have frozen: what the user left trainable when the first
    optimizer was built, whatever blocks are frozen now.

    Raises:
        ValueError: no parameter qualifies.
    """
    owner = owner_of(model)
    known = {id(p) for p in owner.candidates.values()} if owner is not None else set()
    # Not the rows another optimizer registered for its visit (bcd.rowgrad): they are views of a candidate.
    params = {name: p for name, p in model.named_parameters()
              if (p.requires_grad or id(p) in known) and not is_rows(name)}
    return params if params else trainable_parameters(model)


class PrecisionNote(UserWarning):
    """A note that the model's precision costs memory bcd could save."""


def caller_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside bcd (e.g. BAdam's caller)."""
    package = os.path.dirname(__file__)
    frame, level = inspect.currentframe().f_back, 1
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def warn_if_fp32(candidates: Mapping[str, nn.Parameter]) -> None:
    """A :class:`PrecisionNote` when fp32 parameters are trained: a bf16 model needs about half the memory."""
    if any(not needs_master(p) and p.is_floating_point() for p in candidates.values()):
        warnings.warn(
            "bcd: some trainable parameters are fp32 and are updated in place; a bf16 model "
            "(model.to(torch.bfloat16)) keeps fp32 master copies for the active block only and "
            "needs about half the memory.",
            PrecisionNote,
            stacklevel=caller_stacklevel(),
        )


def check_partition(partition: Any, name: str, candidates: Mapping[str, nn.Parameter], epoch: int,
                    first: Partition | None = None) -> Partition:
    """A partitioner's result, refused unless it is a :class:`bcd.Partition` of candidates.

    After block-epoch 0 (``first`` given) it must cover the same parameters in as many blocks.

    Raises:
        ValueError: naming the partitioner and what is wrong.
    """
    if not isinstance(partition, Partition):
        raise ValueError(f"Invalid partition from partitioner {name!r}: {type(partition).__name__}; accepted: a bcd.Partition.")
    unknown = [n for n in partition.tensor_names if n not in candidates]
    if unknown:
        raise ValueError(
            f"Invalid partition from partitioner {name!r}: {unknown[:5]} are not trainable parameters of the model; "
            "a block may only hold parameters that require grad."
        )
    check_rows(partition, candidates)
    split = sorted(partition.row_spans)
    if any(distributed.sharded(candidates[n]) for n in split):
        raise ValueError(
            f"Unsupported partition from partitioner {name!r}: row blocks of sharded (FSDP2) parameters, e.g. "
            f"{split[0]!r}. Accepted: whole tensors per block with FSDP2 (max_block_params above the largest tensor's "
            "size), or row blocks without sharding."
        )
    if first is not None and epoch > 0 and (
            set(partition.param_names) != set(first.param_names) or len(partition) != len(first)):
        raise ValueError(
            f"Invalid partition from partitioner {name!r} at block-epoch {epoch}: {len(partition)} blocks over other "
            f"parameters than block-epoch 0's {len(first)}; a dynamic partitioner may regroup, not add, drop or recount."
        )
    return partition


def resolve_partition(model: nn.Module, partitioner: Any = "layer", options: Mapping[str, Any] | None = None,
                      candidates: Mapping[str, nn.Parameter] | None = None,
                      max_block_params: int | None = None) -> tuple[Any, str, Partition]:
    """A partitioner (a registered name with options, or an object) and its checked block-epoch-0 partition.

    The one way a name becomes a partition: the optimizer, ``bcd.memory.estimate`` and the
    profiler all take it, so what one accepts the others accept.

    Args:
        model: the model.
        partitioner: a registered name or a partitioner object.
        options: options for a partitioner given by name.
        candidates: the parameters to split; default :func:`candidates_of` the model.
        max_block_params: split every block larger than this many elements by rows, whatever the
            partitioner (a third party's need not know about row blocks); None: the partitioner's
            ``block_limit`` if it has one (``layer``: the largest layer), else as it partitions.

    Returns:
        ``(partitioner object, its recorded name, partition)``.

    Raises:
        ValueError: an unknown name, bad options, or a partition that is not one of the candidates
            (unknown names, row ranges that do not tile their tensor, row blocks of sharded tensors).
    """
    candidates = dict(candidates) if candidates is not None else candidates_of(model)
    if max_block_params is not None:
        positive_int("max_block_params", max_block_params)
    try:
        obj, name = contracts.resolve("partitioner", partitioner, options)
    except ValueError as error:
        if isinstance(options, Mapping) and "max_block_params" in options:  # a partitioner option until 0.1
            raise ValueError(f"{error} max_block_params is the optimizer's keyword now, applied around any partitioner: "
                             "BlockCoordinateOptimizer(..., max_block_params=N), bcd.BAdam(..., max_block_params=N), "
                             "--max-block-params N.") from error
        raise
    return obj, name, partition_of(obj, name, model, candidates, 0, max_block_params)


def partition_of(partitioner: Any, name: str, model: nn.Module, candidates: Mapping[str, nn.Parameter], epoch: int,
                 max_block_params: int | None, first: Partition | None = None) -> Partition:
    """``partitioner``'s partition of block-epoch ``epoch``, limited to ``max_block_params`` and checked.

    The limit is a composition step around any partitioner (optax's ``chain`` in spirit): the
    partitioner says which parameters go together, :meth:`bcd.Partition.limit` splits what is too
    large by rows. Without ``max_block_params`` the partitioner's own ``block_limit`` applies, if it
    has one (``layer``: the largest layer's size).
    """
    partition = partitioner.partition(model, candidates, epoch)
    if isinstance(partition, Partition):
        limit = max_block_params if max_block_params is not None else contracts.block_limit(
            partitioner, name, partition, candidates)
        partition = partition if limit is None else partition.limit(candidates, limit)
    return check_partition(partition, name, candidates, epoch, first)


@attrs.frozen(kw_only=True)
class Composition:
    """The checked pieces an optimizer is wired from."""

    candidates: dict[str, nn.Parameter]
    partitioner: contracts.Partitioner
    partitioner_name: str
    partition: Partition
    ordering_name: str
    schedule: BlockSchedule
    solver_factory: Callable[..., torch.optim.Optimizer]
    solver_name: str
    solver_options: dict[str, Any]
    defaults: dict[str, Any]
    groups: list[tuple[dict[str, Any], list[str]]]
    awaiting_wrapper: bool
    max_block_params: int | None = None
    #: No fp32 master copies: low-precision blocks stepped in fp32 scratch, stochastically rounded back;
    #: ``"8bit"``: and their moments kept in 8 bits (:mod:`bcd.quantized`).
    lean: bool | str = False
    #: fp32 elements by (kind, device) the buffers allocate once (bcd.cost.plan_buffers).
    buffers: dict[tuple[str, torch.device], int] = attrs.field(factory=dict)


def _options(label: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"Invalid {label}: {value!r}; accepted: a dict of keyword options, or None.")
    return dict(value)


FUSED_SOLVERS = (torch.optim.Adam, torch.optim.AdamW)


def fast_kernels(factory: Callable[..., Any], options: dict[str, Any], candidates: Mapping[str, nn.Parameter]) -> dict[str, Any]:
    """``options`` with ``fused=True`` for torch's Adam and AdamW, unless the user chose ``fused`` or ``foreach``.

    Only where every candidate is a plain (not sharded) floating-point tensor on the CPU or a CUDA
    device, where torch has fused kernels: the same arithmetic in fewer passes over memory
    (``tools/bench_step.py`` measures the gain).
    """
    base = factory.func if isinstance(factory, functools.partial) else factory
    chosen = set(options) | set(getattr(factory, "keywords", None) or {})
    if base in FUSED_SOLVERS and not {"fused", "foreach"} & chosen and all(
            p.device.type in ("cpu", "cuda") and p.is_floating_point() and not distributed.sharded(p)
            for p in candidates.values()):
        return {**options, "fused": True}
    return options


def _refuse_complex(candidates: Mapping[str, nn.Parameter]) -> None:
    for name, param in candidates.items():
        if param.is_complex():
            raise ValueError(
                f"Unsupported parameter: {name} is {param.dtype}; accepted: real floating-point parameters (bf16, fp16, "
                "fp32, fp64). Freeze it (requires_grad=False) before building the optimizer, or train its real and "
                "imaginary parts as two real parameters."
            )


def _refuse_sparse(model: nn.Module, candidates: Mapping[str, nn.Parameter]) -> None:
    for name, module in model.named_modules():
        if getattr(module, "sparse", False) and any(p is candidates.get(f"{name}.{n}") for n, p in module.named_parameters()):
            raise ValueError(
                f"Unsupported parameter: {name or type(module).__name__} ({type(module).__name__}) has sparse=True, "
                "so its gradient is sparse and the inner solvers cannot step it. Accepted: sparse=False, or freeze it "
                "(requires_grad=False) before building the optimizer."
            )


def compose(model: Any, *, lr: Any, switch_every: Any, partitioner: Any,
            partitioner_options: Any, order: Any, order_options: Any, solver: Any, solver_options: Any,
            no_decay: Any, groups: Any, data_parallel: Any, max_block_params: Any = None,
            lean: Any = False) -> Composition:
    """Check and resolve the constructor's arguments; see :class:`bcd.BlockCoordinateOptimizer`.

    Raises:
        ValueError: any invalid argument; nothing has been changed.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"Invalid model: {type(model).__name__}; accepted: a torch.nn.Module.")
    distributed.check_supported(model)
    positive_int("switch_every", switch_every)
    flag("no_decay", no_decay)
    flag("data_parallel", data_parallel)
    if not (isinstance(lean, bool) or (isinstance(lean, str) and lean == "8bit")):
        raise ValueError(f"Invalid lean: {lean!r}; accepted: False (fp32 master copies), True (none: stochastic rounding) "
                         "or '8bit' (none, and Adam's moments in 8 bits).")
    solver_options = _options("solver_options", solver_options)
    if lr is not None:
        if "lr" in solver_options:
            raise ValueError(f"lr given twice: lr={lr!r} and solver_options['lr']={solver_options['lr']!r}; give one.")
        solver_options["lr"] = lr
    if "lr" in solver_options and not (is_number(solver_options["lr"]) and solver_options["lr"] >= 0):
        raise ValueError(f"Invalid lr: {solver_options['lr']!r}; accepted: a finite number >= 0.")
    candidates = candidates_of(model)
    _refuse_sparse(model, candidates)
    _refuse_complex(candidates)

    partitioner_obj, partitioner_name, partition = resolve_partition(model, partitioner, partitioner_options, candidates,
                                                                     max_block_params)
    order_options = _options("order_options", order_options)
    if isinstance(order_options.get("start_block"), str):
        order_options["start_block"] = partition.index(order_options["start_block"])
    ordering, ordering_name = contracts.resolve("ordering", order, order_options or None)
    if observes(ordering) and partitioner_obj.dynamic:
        # What was observed of block b says nothing about a regrouped block b.
        raise ValueError(
            f"Invalid combination: ordering {ordering_name!r} observes the blocks' gradients, partitioner "
            f"{partitioner_name!r} regroups them every block-epoch; accepted: an observing ordering with a static "
            "partitioner (layer, per-module, explicit), or a non-observing ordering."
        )
    schedule = BlockSchedule(ordering=ordering, num_blocks=len(partition), switch_every=switch_every)

    factory, solver_name = contracts.resolve_solver(solver)
    solver_options = fast_kernels(factory, solver_options, candidates)
    try:
        probe = plugins.call(factory, solver_options, [torch.zeros(1)], label=f"solver {solver_name!r}")
    except RuntimeError as error:  # torch's own refusals, e.g. foreach and fused both True
        raise ValueError(f"Invalid options for solver {solver_name!r}: {solver_options!r}: {error}") from error
    if not isinstance(probe, torch.optim.Optimizer):
        raise ValueError(
            f"Invalid solver {solver_name!r}: its factory returned {type(probe).__name__}; accepted: a torch.optim.Optimizer."
        )
    if lean and (type(probe) not in cost.PREFILLED or any(distributed.sharded(p) for p in candidates.values())):
        raise ValueError(
            f"Invalid combination: lean={lean!r} with solver {solver_name!r}"
            f"{' and sharded (FSDP2) parameters' if type(probe) in cost.PREFILLED else ''}; accepted: lean with "
            "solver 'adam' or 'adamw' over unsharded parameters (their moments are stepped chunk by chunk in fp32 "
            "scratch), or lean=False (fp32 master copies)."
        )
    if lean == "8bit":
        quantized.library()  # refuses now, with what to install, rather than at the first step
    defaults = dict(probe.defaults)
    # torch checks some values (lr, betas) but not all (inf, a bool): the same checks as a group's.
    check_hyperparameters(f"solver_options for solver {solver_name!r}",
                          {k: v for k, v in solver_options.items() if k in defaults}, defaults)
    built_groups = outer_groups(candidates, partition.tensor_names, no_decay, groups, defaults)
    checkpointing.check(model)
    layout = cost.layout_or_none(factory, solver_options, device=next(iter(candidates.values())).device)
    return Composition(
        candidates=candidates, partitioner=partitioner_obj, partitioner_name=partitioner_name, partition=partition,
        ordering_name=ordering_name, schedule=schedule, solver_factory=factory, solver_name=solver_name,
        solver_options=solver_options, defaults=defaults, groups=built_groups,
        awaiting_wrapper=distributed.expects_wrapper(model, data_parallel), max_block_params=max_block_params,
        lean=lean, buffers=cost.plan_buffers([b.param_names for b in partition], candidates, layout, lean),
    )
