"""The optimizer's outer parameter groups, built from the partition, and their hyperparameters checked.

The outer ``param_groups`` hold every parameter of the partition (so LR schedulers, the Trainer
and ``clip_grad_norm_`` see one stable set); at each visit the inner solver gets the groups'
hyperparameters for the active block's parameters. Hyperparameters are checked when the groups
are built and again before every step, so a value a scheduler or a user set to something wrong
is refused before any tensor is updated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from bcd.checks import is_number

# Hyperparameters that must be >= 0 where the solver has them (torch checks them only as defaults).
NON_NEGATIVE = ("lr", "eps", "weight_decay", "momentum", "dampening")
# torch's Optional[bool] kernel choices: None means "torch decides" (a state dict saved on FSDP2 ranks has it).
OPTIONAL_FLAGS = ("fused", "foreach")


def _real(value: Any) -> bool:
    """Whether ``value`` is an int or float, finite or not: a default tells a number's kind, not its range."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_groups(param_groups: Sequence[Mapping[str, Any]], defaults: Mapping[str, Any]) -> None:
    """:func:`check_hyperparameters` on each of an optimizer's ``param_groups`` (what a scheduler or user set)."""
    for index, group in enumerate(param_groups):
        check_hyperparameters(f"param_groups[{index}]", {k: v for k, v in group.items() if k in defaults}, defaults)


def check_hyperparameters(where: str, hyper: Mapping[str, Any], defaults: Mapping[str, Any]) -> None:
    """Refuse a hyperparameter of the wrong type or range, naming ``where`` it was found.

    Keys the solver does not know are refused (a misspelt ``"Lr"`` would otherwise be ignored);
    numbers must be finite and, for :data:`NON_NEGATIVE` names, >= 0; tuples (``betas``) must
    have the default's length with entries in [0, 1).

    Raises:
        ValueError: naming the key, the value received and what is accepted.
    """
    for key, value in hyper.items():
        if key not in defaults:
            raise ValueError(
                f"Invalid {where}: unknown hyperparameter {key!r}={value!r}; accepted: {', '.join(sorted(defaults))}."
            )
        default = defaults[key]
        if _real(default) or (key == "lr" and isinstance(default, torch.Tensor)):
            if not is_number(value) or (key in NON_NEGATIVE and value < 0):
                accepted = "a finite number >= 0" if key in NON_NEGATIVE else "a finite number"
                raise ValueError(f"Invalid {where}: {key}={value!r}; accepted: {accepted}.")
        elif isinstance(default, tuple) and default and all(_real(d) for d in default):
            if not (isinstance(value, (tuple, list)) and len(value) == len(default)
                    and all(is_number(v) and 0 <= v < 1 for v in value)):
                raise ValueError(
                    f"Invalid {where}: {key}={value!r}; accepted: {len(default)} numbers in [0, 1), like {default!r}."
                )
        elif isinstance(default, bool) and not (isinstance(value, bool) or (value is None and key in OPTIONAL_FLAGS)):
            accepted = "True, False or None" if key in OPTIONAL_FLAGS else "True or False"
            raise ValueError(f"Invalid {where}: {key}={value!r}; accepted: {accepted}.")


def outer_groups(
    candidates: Mapping[str, nn.Parameter],
    partition_names: Sequence[str],
    no_decay: bool,
    groups: Sequence[Mapping[str, Any]] | None,
    defaults: Mapping[str, Any],
) -> list[tuple[dict[str, Any], list[str]]]:
    """The outer groups as ``(hyperparameters, member names)``, empty groups dropped.

    Candidates in no user group form the first, default group; with ``no_decay`` the 1-D ones
    (biases, norm weights) not in a user group go to a last group with ``weight_decay=0``.

    Args:
        candidates: the trainable parameters by name, model order.
        partition_names: the names the partition covers.
        no_decay: exempt 1-D parameters from weight decay.
        groups: torch-style group dicts whose ``"params"`` are parameters or their names.
        defaults: the solver's defaults, against which group hyperparameters are checked.

    Raises:
        ValueError: a malformed group, a parameter outside the partition or in two groups, or a
            bad hyperparameter.
    """
    covered = set(partition_names)
    names = [n for n in candidates if n in covered]
    by_id = {id(p): n for n, p in candidates.items()}
    assigned: dict[str, int] = {}
    specs: list[dict[str, Any]] = [{}]
    if groups is not None and (isinstance(groups, (str, Mapping)) or not isinstance(groups, Sequence)):
        raise ValueError(f"Invalid groups: {groups!r}; accepted: a list of dicts with 'params'.")
    for index, spec in enumerate(groups or ()):
        if not isinstance(spec, Mapping) or "params" not in spec:
            raise ValueError(f"Invalid group: {spec!r} has no 'params'; accepted: dicts with 'params'.")
        hyper = {k: v for k, v in spec.items() if k != "params"}
        check_hyperparameters(f"group {index}", hyper, defaults)
        specs.append(hyper)
        items = spec["params"]
        if isinstance(items, (str, torch.Tensor)):
            items = [items]
        for item in items:
            name = item if isinstance(item, str) else by_id.get(id(item))
            if name not in covered:
                shown = item if isinstance(item, str) else tuple(getattr(item, "shape", ()))
                raise ValueError(
                    f"Invalid group {index}: parameter {shown!r} is not one of the partition's trainable parameters."
                )
            if name in assigned:
                raise ValueError(f"Invalid groups: parameter {name!r} is in two groups; accepted: at most one.")
            assigned[name] = len(specs) - 1
    if no_decay:
        specs.append({"weight_decay": 0.0})
        for name in names:
            if name not in assigned and candidates[name].ndim <= 1:
                assigned[name] = len(specs) - 1
    members: list[list[str]] = [[] for _ in specs]
    for name in names:
        members[assigned.get(name, 0)].append(name)
    return [(spec, member) for spec, member in zip(specs, members) if member]


def copy_hyperparameters(outer: Sequence[Mapping[str, Any]], solver: torch.optim.Optimizer, indices: Sequence[int]) -> None:
    """Copy the outer groups' hyperparameters into the solver's groups (``indices``: each one's outer group)."""
    for solver_group, index in zip(solver.param_groups, indices):
        solver_group.update({k: outer[index][k] for k in solver_group if k != "params" and k in outer[index]})
