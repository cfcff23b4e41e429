"""Loading a torch.distributed.checkpoint (DCP) optimizer checkpoint at the block it was saved in.

Save as torch documents, on every rank::

    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=path)

and load with :func:`load`, on any number of ranks (FSDP2 reshards; one process without a
process group reads the shards into plain tensors). Why not torch's three lines alone: DCP loads
into a template, the state dict of the optimizer that loads, and refuses what the checkpoint
lacks. bcd's state (:mod:`bcd.layout`) holds the solver state and master copies of the block
active when it was saved; an optimizer at another block (a fresh one holds none) gives a template
without them. :func:`load` reads the saved header first, adds zero placeholders for the saved
block's tensors to the optimizer's own template, shaped and sharded like the parameters they
belong to (one block's state, allocated once more while loading), loads into it, and hands it to
``set_optimizer_state_dict``, which checks everything before anything changes.

A checkpoint saved at a visit's first step holds no tensors: any template loads it. So the
Trainer's sharded FSDP checkpoints (accelerate loads into a fresh optimizer's template) resume
exactly when every save falls on a visit boundary: ``save_steps`` a multiple of ``switch_every``.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

from bcd.blocks import entry_shape, parse_entry, rows_entry
from bcd.cost import keeps_master
from bcd.layout import RECORD
from bcd.state import Optimizing, canonical, solver_groups


def _item(key: str, *path: str) -> str:
    """The name DCP gives the packed record's item at ``path`` under ``key`` (it joins nested keys with dots)."""
    return ".".join((key, "param_groups", "0", RECORD, *path))


def saved_header(checkpoint_id: str, key: str = "optimizer") -> dict[str, Any]:
    """The header of the bcd state saved under ``key`` at ``checkpoint_id`` (schedule, partition, ...).

    Raises:
        ValueError: the checkpoint holds no bcd optimizer state under ``key``.
    """
    return _read_header(checkpoint_id, key)[0]


def _read_header(checkpoint_id: str, key: str) -> tuple[dict[str, Any], set[str]]:
    """:func:`saved_header`, and the names of every item the checkpoint holds (its metadata, read once)."""
    reader = dcp.FileSystemReader(checkpoint_id)
    items = set(reader.read_metadata().state_dict_metadata)
    item = _item(key, "header")
    if item not in items:
        raise ValueError(f"Invalid checkpoint: {checkpoint_id!r} holds no bcd optimizer state under {key!r} (no item "
                         f"{item!r}); accepted: a DCP checkpoint saved with {{{key!r}: get_optimizer_state_dict(model, "
                         "optimizer)}} from a bcd optimizer.")
    loaded = {item: ""}
    dcp.load(loaded, storage_reader=reader)
    try:
        return dict(json.loads(loaded[item])), items
    except (TypeError, ValueError):
        raise ValueError(f"Invalid checkpoint: its {item!r} is {loaded[item]!r:.80}; accepted: the JSON object "
                         "BlockCoordinateOptimizer.state_dict() saved.") from None


def _placeholders(optimizer: Optimizing, header: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Zero solver state and master copies for the block active in ``header``, laid out as a visit's would be."""
    try:
        entries = header["partition"][header["schedule"]["active_block"]][1:]
        parsed = [parse_entry(entry) for entry in entries]
    except (KeyError, IndexError, TypeError) as error:
        raise ValueError(f"Invalid checkpoint: its header names no active block ({error!r}); accepted: what "
                         "BlockCoordinateOptimizer.state_dict() saved.") from None
    own = {canonical(name): name for name in optimizer.candidates}
    unknown = [name for name, _ in parsed if name not in own]
    if unknown:
        raise ValueError(f"Invalid checkpoint: it was saved for another model (parameters {unknown[:3]!r} are not "
                         f"this optimizer's); accepted: a checkpoint of the same model and partition.")
    tensors, masters = {}, {}
    for entry, (name, rows) in zip(entries, parsed):
        param, mine = optimizer.candidates[own[name]], own[name] if rows is None else rows_entry(own[name], *rows)
        # Like the parameter (a DTensor sharded as it is under FSDP2), or a row block's plain rows.
        tensors[mine] = (torch.zeros_like(param, dtype=torch.float32) if rows is None else
                         torch.zeros(entry_shape(mine, optimizer.candidates), dtype=torch.float32, device=param.device))
        if keeps_master(param, optimizer.composition.lean):
            masters[entry] = torch.zeros_like(tensors[mine])
    groups, _ = solver_groups(optimizer.param_groups, optimizer.group_names, tensors)
    solver = optimizer.composition.solver_factory(groups, **optimizer.composition.solver_options)
    for tensor in tensors.values():
        tensor.grad = torch.zeros_like(tensor)
    solver.step()  # torch's solvers create their state at the first step: its values are overwritten
    return solver.state_dict(), masters


def load(model: nn.Module, optimizer: torch.optim.Optimizer, checkpoint_id: str, key: str = "optimizer",
         options: StateDictOptions | None = None) -> None:
    """Load the optimizer state saved with DCP under ``key`` (see the module docstring) into ``optimizer``.

    A collective under a process group: call it on every rank.

    Raises:
        ValueError: the checkpoint holds no bcd state, or one that does not fit ``optimizer``
            (nothing changed then).
    """
    header, items = _read_header(checkpoint_id, key)
    template = get_optimizer_state_dict(model, optimizer, options=options)
    record = template["param_groups"][0][RECORD]
    if any(item.startswith(_item(key, "solver_state", "")) for item in items):  # saved mid-visit
        record["solver_state"], record["master_copies"] = _placeholders(optimizer, header)
    else:
        record["solver_state"], record["master_copies"] = {}, {}
    dcp.load({key: template}, storage_reader=dcp.FileSystemReader(checkpoint_id))
    set_optimizer_state_dict(model, optimizer, template, options=options)
