"""The optimizer's state dict in torch's layout, which torch.distributed.checkpoint saves and loads.

torch's tools (``get_optimizer_state_dict`` / ``set_optimizer_state_dict``, DCP, the Trainer's
FSDP checkpoints through accelerate) read an optimizer state dict as ``{"state": {parameter:
{...}}, "param_groups": [{..., "params": [...]}]}``, keep nothing else, keep ``state`` only for
parameters that require grad, and rename parameters by index or qualified name on the way. bcd's
record (:func:`bcd.state.save`: the schedule, the partition, one block's solver state and master
copies) is packed to survive that:

- ``state`` holds an empty entry for every candidate: there is no per-parameter state to keep,
  and torch's strict load finds an entry for whichever parameters require grad when it runs;
- ``param_groups`` are the optimizer's groups (parameters by index, as torch's own);
- ``param_groups[0]["bcd"]`` holds the rest: ``"header"``, the record's plain part as one JSON
  string (one checkpoint item, whatever the schedule holds); ``"solver_state"``, the active
  block's solver state dict; ``"master_copies"``, by entry name. The last two are ``{}`` before a
  visit's first step; ``"global_step"``, the header's step count as a one-element tensor on the
  parameters' device, checked against it on load: torch's full-state load takes the device from
  the loading optimizer's tensors and has none without it. Group values are carried whatever
  requires grad, and their tensors (DTensors under FSDP2) are gathered, sharded and resharded by
  torch like any state.

:func:`unpack` turns a packed dict (parameters by index or by torch's qualified names) back into
the record that :func:`bcd.state.check` checks; a record saved before packing passes unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

from bcd.checks import is_int
from bcd.state import Optimizing, canonical

#: The group key that carries bcd's record in a packed state dict.
RECORD = "bcd"
_TENSORS = ("solver_state", "master_copies")


def _fail(message: str) -> None:
    raise ValueError(f"Invalid state dict: {message}")


def pack(record: Mapping[str, Any], optimizer: Optimizing) -> dict[str, Any]:
    """``record`` (from :func:`bcd.state.save`) in torch's layout, parameters by index."""
    header = {k: v for k, v in record.items() if k not in ("param_groups", *_TENSORS)}
    groups, start = [], 0
    for group in record["param_groups"]:
        count = len(group["params"])
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": list(range(start, start + count))})
        start += count
    groups[0][RECORD] = {
        "header": json.dumps(header),
        "solver_state": record["solver_state"] if record["solver_state"] is not None else {},
        "master_copies": dict(record["master_copies"]),
        "global_step": torch.tensor([record["schedule"]["global_step"]],
                                    device=next(iter(optimizer.candidates.values())).device),
    }
    return {"state": {index: {} for index in range(start)}, "param_groups": groups}


def is_packed(saved: Any) -> bool:
    """Whether ``saved`` is in torch's layout with bcd's record in its first group."""
    groups = saved.get("param_groups") if isinstance(saved, Mapping) else None
    return (isinstance(groups, list) and bool(groups) and isinstance(groups[0], Mapping) and RECORD in groups[0]
            and "format" not in saved)


def header(saved: Mapping[str, Any]) -> dict[str, Any]:
    """The plain part of a packed state dict's record, decoded and checked to be a dict.

    Raises:
        ValueError: it is not a JSON object.
    """
    record = saved["param_groups"][0][RECORD]
    text = record.get("header") if isinstance(record, Mapping) else None
    try:
        decoded = json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError as error:
        _fail(f"param_groups[0]['{RECORD}']['header'] is not JSON ({error}); accepted: what state_dict() wrote.")
    if not isinstance(decoded, dict):
        _fail(f"param_groups[0]['{RECORD}'] is {record!r:.80}; accepted: a dict with a 'header' JSON object, "
              "'solver_state' and 'master_copies', as state_dict() writes.")
    return decoded


def _names(members: Any, flat: list[str], where: str) -> list[str]:
    """A saved group's members as names: torch's indices into ``flat``, or qualified names (canonical).

    An index past ``flat`` (a dict of another model) becomes ``"#<index>"``, a name no parameter has,
    so that :func:`bcd.state.check` names what differs: the partition, or the groups' members.
    """
    if not isinstance(members, list):
        _fail(f"{where} is {members!r:.80}; accepted: a list of parameter indices or names.")
    names = []
    for member in members:
        if isinstance(member, str):
            names.append(canonical(member))
        elif is_int(member, 0):
            names.append(flat[member] if member < len(flat) else f"#{member}")
        else:
            _fail(f"{where} holds {member!r}; accepted: parameter indices (integers >= 0) or parameter names.")
    return names


def unpack(saved: Any, optimizer: Optimizing) -> Any:
    """The record in a packed ``saved``, for :func:`bcd.state.check`; anything else is returned as is.

    Raises:
        ValueError: the packed parts are malformed, or ``state`` holds per-parameter state (not
            written by bcd: its solver state is the active block's, in the first group).
    """
    if not is_packed(saved):
        return saved
    record = saved["param_groups"][0][RECORD]
    plain = header(saved)
    # An empty dict can come back absent (torch's full-state load keeps no empty containers).
    if not isinstance(record, Mapping) or any(not isinstance(record.get(k, {}), Mapping) for k in _TENSORS):
        _fail(f"param_groups[0]['{RECORD}'] holds a 'solver_state' or 'master_copies' that is not a dict; "
              "accepted: what state_dict() wrote.")
    per_parameter = saved.get("state", {})
    empty = lambda value: isinstance(value, Mapping) and not value  # noqa: E731
    if not isinstance(per_parameter, Mapping) or not all(map(empty, per_parameter.values())):
        held = ({k: sorted(map(str, v)) if isinstance(v, Mapping) else type(v).__name__
                 for k, v in per_parameter.items() if not empty(v)} if isinstance(per_parameter, Mapping) else per_parameter)
        _fail(f"'state' holds per-parameter state {held!r:.120}; accepted: empty entries (bcd keeps the active "
              f"block's solver state in param_groups[0]['{RECORD}']): this dict was not written by bcd.")
    schedule = plain.get("schedule")
    steps = schedule.get("global_step") if isinstance(schedule, Mapping) else None  # else check() names it
    step = record.get("global_step")
    if steps is not None and not (isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_floating_point()
            and not step.is_meta and step.item() == steps):
        _fail(f"param_groups[0]['{RECORD}']['global_step'] is {step!r:.60}; accepted: a one-element integer tensor "
              f"equal to the header's schedule.global_step ({steps!r}).")
    flat = [name for names in optimizer.group_names for name in names]
    groups = [
        {**{k: v for k, v in group.items() if k not in ("params", RECORD)},
         "params": _names(group.get("params"), flat, f"param_groups[{index}]['params']")}
        if isinstance(group, Mapping) else group
        for index, group in enumerate(saved["param_groups"])
    ]
    # What the header lacks, bcd.state.check names ("it has no 'schedule'").
    return {**plain, "param_groups": groups, "solver_state": dict(record.get("solver_state", {})) or None,
            "master_copies": dict(record.get("master_copies", {}))}
