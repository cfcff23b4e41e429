"""Checking a saved optimizer state against a live optimizer, completely, before anything changes.

:func:`check` reads a state dict made by :meth:`bcd.BlockCoordinateOptimizer.state_dict` and
returns a :class:`Restore`: a plan holding everything ``load_state_dict`` will write. Structure,
types, ranges, the schedule, the partition, the parameter groups and their hyperparameters, the
master copies (shape and dtype against the active block) and the solver state (loaded into a
throwaway solver over meta-device tensors of the active block's shapes, which allocates nothing)
are all checked first, so a refused dict leaves model and optimizer bit-identical.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import attrs
import torch

from bcd.blocks import Partition, entry_shape, parse_entry
from bcd.checks import is_int
from bcd.contracts import options_of
from bcd import quantized
from bcd.cost import keeps_master, layout_or_none, quantizes
from bcd.groups import check_hyperparameters
from bcd.schedule import BlockSchedule


class Optimizing(Protocol):
    """What saving and checking read of an optimizer: its public, read-only view (no import of bcd.optimizer)."""

    composition: Any
    partition: Partition
    schedule: BlockSchedule
    switches: int
    defaults: dict[str, Any]
    param_groups: list[dict[str, Any]]
    switch_every: int
    candidates: Mapping[str, torch.Tensor]
    group_names: Sequence[Sequence[str]]
    solver: torch.optim.Optimizer | None
    master_copies: Any

    def partition_for(self, epoch: int) -> Partition: ...

STATE_FORMAT = "bcd.BlockCoordinateOptimizer/1"
KEYS = ("switch_every", "partitioner", "ordering", "solver", "partition", "schedule", "param_groups",
        "solver_state", "master_copies")


@attrs.frozen(kw_only=True)
class Restore:
    """What a checked state dict restores."""

    schedule: BlockSchedule
    partition: Partition
    group_hyperparameters: tuple[dict[str, Any], ...]
    solver_state: dict[str, Any] | None
    master_copies: dict[str, torch.Tensor]
    switches: int


def _fail(message: str) -> None:
    raise ValueError(f"Invalid state dict: {message}")


# What wrappers add to parameter and module names: DDP and accelerate's ``module.`` and
# torch.compile's ``_orig_mod.`` in front, FSDP1's and activation checkpointing's inside.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def canonical(name: str) -> str:
    """``name`` without what wrappers add, so a state dict saved under DDP, torch.compile or FSDP loads into the bare model.

    >>> canonical("module._orig_mod.model.layers.0.mlp.up_proj.weight[0:8]")
    'model.layers.0.mlp.up_proj.weight[0:8]'
    """
    for segment in WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


def _canonical_lists(value: Any) -> Any:
    """Lists of names (a fingerprint, group members, options) as lists, every string made :func:`canonical`."""
    if isinstance(value, str):
        return canonical(value)
    if isinstance(value, (list, tuple)):
        return [_canonical_lists(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _canonical_lists(v) for k, v in value.items()}
    return value


def solver_groups(
    param_groups: Sequence[Mapping[str, Any]], group_names: Sequence[Sequence[str]], tensors: Mapping[str, torch.Tensor]
) -> tuple[list[dict[str, Any]], list[int]]:
    """The inner solver's groups over ``tensors`` (the active block's, by entry) and their outer group indices.

    A row entry ``"w[a:b]"`` belongs to the group of its tensor ``w``.
    """
    by_tensor: dict[str, list[torch.Tensor]] = {}
    for entry, tensor in tensors.items():
        by_tensor.setdefault(parse_entry(entry)[0], []).append(tensor)
    groups, indices = [], []
    for index, (group, names) in enumerate(zip(param_groups, group_names)):
        members = [t for n in names for t in by_tensor.get(n, ())]
        if members:
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": members})
            indices.append(index)
    return groups, indices


def _check_masters(saved: Any, expected: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    if not isinstance(saved, Mapping) or set(saved) != set(expected):
        got = sorted(saved)[:4] if isinstance(saved, Mapping) else type(saved).__name__
        _fail(
            f"master_copies hold {got!r}, the active block's low-precision parameters are {sorted(expected)[:4]!r}; "
            "it was saved for another block, with another model dtype, or with another lean setting."
        )
    for name, shape in expected.items():
        master = saved[name]
        if (not isinstance(master, torch.Tensor) or master.is_meta or master.dtype != torch.float32
                or tuple(master.shape) != tuple(shape)):
            got = (f"{master.dtype} {tuple(master.shape)}{' on the meta device' if master.is_meta else ''}"
                   if isinstance(master, torch.Tensor) else repr(master))
            _fail(f"master_copies[{name!r}] is {got}; accepted: torch.float32 {tuple(shape)} with values.")
    return dict(saved)


def _check_state_entry(where: str, value: Any, shape: tuple[int, ...], per_element: bool | None) -> None:
    """One tensor of the solver state: floating, real (not meta), and of the shape it will be used at.

    ``per_element`` says whether the solver keeps the key per element (the parameter's shape),
    as a scalar (0-d), or (None) unknown: then either is accepted. A fused kernel trusts these
    shapes: a moment of one element for a larger block is an out-of-bounds write, not an error.
    """
    if not isinstance(value, torch.Tensor):
        return
    if value.is_meta:
        _fail(f"{where} is a meta-device tensor (no data); accepted: a tensor with values, on any device.")
    if not value.is_floating_point():
        hint = " (8-bit moments: it was saved with lean='8bit')" if value.dtype == torch.uint8 else ""
        _fail(f"{where} has dtype {value.dtype}{hint}; accepted: a floating-point tensor.")
    accepted = {True: [shape], False: [()], None: [shape, ()]}[per_element]
    if tuple(value.shape) not in accepted:
        shown = " or ".join(str(s) for s in accepted)
        _fail(f"{where} has shape {tuple(value.shape)}; accepted: {shown}, "
              f"{'the shape of that parameter of the active block' if shape in accepted else 'a scalar'}.")


def _check_quantized(where: str, entry: Mapping[str, Any], keys: set[str], shape: tuple[int, ...]) -> None:
    """One entry's 8-bit moments (``lean="8bit"``): uint8 codes of the entry's shape and the scales of its chunks."""
    moments = keys & set(quantized.SIGNED)
    blocks = quantized.scales_before(shape, shape[0])
    for key in moments:
        codes, scales = entry.get(key), entry.get(key + quantized.SCALES)
        if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8 or tuple(codes.shape) != shape:
            got = f"{codes.dtype} {tuple(codes.shape)}" if isinstance(codes, torch.Tensor) else repr(codes)
            _fail(f"{where}[{key!r}] is {got}; accepted: torch.uint8 {shape}, 8-bit moments (lean='8bit'). It was "
                  "saved with another lean setting, or for another block.")
        if (not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32 or tuple(scales.shape) != (blocks,)
                or scales.is_meta or codes.is_meta):
            got = f"{scales.dtype} {tuple(scales.shape)}" if isinstance(scales, torch.Tensor) else repr(scales)
            _fail(f"{where}[{key + quantized.SCALES!r}] is {got}; accepted: torch.float32 ({blocks},) with values, "
                  "one scale per 256-element block of each chunk.")


def _check_solver_state(saved: Any, optimizer: Optimizing, groups: list[dict[str, Any]],
                        block_names: Sequence[str]) -> dict[str, Any]:
    if not isinstance(saved, Mapping) or not isinstance(saved.get("state"), Mapping) or "param_groups" not in saved:
        _fail(f"solver_state is {type(saved).__name__} without 'state' and 'param_groups'; accepted: a solver state_dict().")
    meta = {n: torch.empty(entry_shape(n, optimizer.candidates), device="meta") for n in block_names}
    probe_groups, _ = solver_groups(groups, optimizer.group_names, meta)
    params = [p for g in probe_groups for p in g["params"]]
    name_of = {id(t): n for n, t in meta.items()}
    candidates, lean = optimizer.candidates, optimizer.composition.lean
    eight = [quantizes(candidates[parse_entry(name_of[id(p)])[0]], p.numel(), lean) for p in params]
    # One throwaway step per group (its values may change the layout, e.g. amsgrad), shared by its tensors.
    composition = optimizer.composition
    by_group = [layout_or_none(composition.solver_factory, composition.solver_options, g) for g in probe_groups]
    layouts = [layout for g, layout in zip(probe_groups, by_group) for _ in g["params"]]
    for key, entry in saved["state"].items():
        if not is_int(key, 0, len(params) - 1) or not isinstance(entry, Mapping):
            _fail(f"solver_state['state'] has entry {key!r}; accepted: parameter indices 0 ... {len(params) - 1} with dicts.")
        layout = layouts[key]
        if layout is not None and entry and not layout.keys <= set(entry):
            _fail(f"solver_state['state'][{key}] holds {sorted(map(str, entry))}; accepted: {sorted(layout.keys)}, "
                  "what this solver keeps per parameter.")
        if eight[key] and entry:
            _check_quantized(f"solver_state['state'][{key}]", entry, layout.keys if layout else set(entry),
                             tuple(params[key].shape))
        for name, value in entry.items():
            if eight[key] and (name in quantized.SIGNED or name.endswith(quantized.SCALES)):
                continue
            _check_state_entry(f"solver_state['state'][{key}][{name!r}]", value, tuple(params[key].shape),
                               None if layout is None else layout.is_per_element(name))
    try:
        # A solver over meta tensors allocates nothing; loading into it runs torch's own checks.
        probe = optimizer.composition.solver_factory(probe_groups, **optimizer.composition.solver_options)
    except (ValueError, TypeError, RuntimeError):
        probe = None  # e.g. fused=True accepts no meta tensors: the checks above stand alone
    try:
        if probe is not None:
            probe.load_state_dict(saved)
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as error:
        _fail(f"solver_state does not fit the active block's solver: {error}")
    return dict(saved)


def _detached(value: Any) -> Any:
    """``value`` with every tensor cloned: what no later step or load writes into (bcd reuses its buffers)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, Mapping):
        return {k: _detached(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_detached(v) for v in value]
    return value


def save(optimizer: Optimizing) -> dict[str, Any]:
    """The state dict of ``optimizer``: plain data and tensors, parameters by qualified name."""
    return {
        "format": STATE_FORMAT,
        # Names without wrapper prefixes: the dict loads into the bare model or another wrapper.
        "partition": _canonical_lists(optimizer.partition.fingerprint()),
        "switch_every": optimizer.switch_every,
        "partitioner": optimizer.composition.partitioner_name,
        "partitioner_options": options_of(optimizer.composition.partitioner),
        "ordering": optimizer.composition.ordering_name,
        "solver": optimizer.composition.solver_name,
        "schedule": {**optimizer.schedule.state_dict(), "active_block": optimizer.schedule.active},
        "switches": optimizer.switches,
        "param_groups": [
            {**{k: v for k, v in group.items() if k != "params"}, "params": [canonical(n) for n in names]}
            for group, names in zip(optimizer.param_groups, optimizer.group_names)
        ],
        # None and {} before the visit's first step: nothing to restore but the position. Copies:
        # the solver state and masters live in buffers that the next visit (or a load) reuses.
        "solver_state": _detached(optimizer.solver.state_dict()) if optimizer.solver is not None else None,
        "master_copies": ({canonical(k): v for k, v in _detached(optimizer.master_copies.state_dict()).items()}
                          if optimizer.master_copies is not None else {}),
    }


def check(saved: Any, optimizer: Optimizing) -> Restore:
    """Check ``saved`` completely against ``optimizer``; return what loading it restores.

    Raises:
        ValueError: naming the key, the value received and what is accepted.
    """
    if not isinstance(saved, Mapping) or saved.get("format") != STATE_FORMAT:
        got = saved.get("format") if isinstance(saved, Mapping) else type(saved).__name__
        _fail(f"format {got!r}; accepted: {STATE_FORMAT!r} from BlockCoordinateOptimizer.state_dict().")
    missing = [k for k in KEYS if k not in saved]
    if missing:
        _fail(f"it has no {missing[0]!r}; accepted: a dict with {list(KEYS)}.")
    for key, mine in (("switch_every", optimizer.switch_every), ("partitioner", optimizer.composition.partitioner_name),
                      ("ordering", optimizer.composition.ordering_name), ("solver", optimizer.composition.solver_name)):
        if saved[key] != mine:
            _fail(f"saved with {key}={saved[key]!r}, this optimizer has {mine!r}.")
    epoch = saved["schedule"].get("block_epoch") if isinstance(saved["schedule"], Mapping) else None
    if optimizer.composition.partitioner.dynamic and is_int(epoch, 0):
        partition = optimizer.partition_for(epoch)
    else:  # a bad epoch is refused by the schedule below
        partition = optimizer.partition
    fingerprint = saved["partition"]
    if (not isinstance(fingerprint, list)
            or [_canonical_lists(list(b)) for b in fingerprint if isinstance(b, (list, tuple))]
            != _canonical_lists(partition.fingerprint())):
        shown = [b[0] for b in fingerprint if isinstance(b, (list, tuple)) and b][:6] if isinstance(fingerprint, list) else fingerprint
        _fail(
            f"it was saved for another partition (block or parameter names differ); saved blocks {shown!r}..., "
            f"this optimizer's {[b.name for b in partition][:6]}...."
        )
    mine = options_of(optimizer.composition.partitioner)
    # Compared as lists: a packed dict's header is JSON (tuples come back as lists), an older one kept tuples.
    if saved.get("partitioner_options") is not None and _canonical_lists(saved["partitioner_options"]) != _canonical_lists(mine):
        _fail(f"it was saved for another partition: partitioner options {saved['partitioner_options']!r}, this optimizer's are {mine!r}.")
    schedule = attrs.evolve(optimizer.schedule, num_blocks=len(partition)).load(saved["schedule"])
    groups = saved["param_groups"]
    if (not isinstance(groups, list) or not all(isinstance(g, Mapping) and "params" in g for g in groups)
            or [_canonical_lists(list(g["params"])) for g in groups] != _canonical_lists(optimizer.group_names)):
        count = len(groups) if isinstance(groups, list) else type(groups).__name__
        _fail(
            f"{count} parameter group(s) with other members than this optimizer's {len(optimizer.group_names)}; "
            "build the optimizer with the same groups/no_decay."
        )
    hyper = []
    for index, group in enumerate(groups):
        values = {k: v for k, v in group.items() if k != "params"}
        check_hyperparameters(f"state dict: param_groups[{index}]",
                              {k: v for k, v in values.items() if k in optimizer.defaults}, optimizer.defaults)
        hyper.append(values)
    block = partition[schedule.active]
    solver_state, masters = saved["solver_state"], {}
    if solver_state is not None:
        solver_state = _check_solver_state(solver_state, optimizer, groups, block.param_names)
        expected = {n: entry_shape(n, optimizer.candidates) for n in block.param_names
                    if keeps_master(optimizer.candidates[parse_entry(n)[0]], optimizer.composition.lean)}
        own = {canonical(n): n for n in expected}
        keyed = saved["master_copies"]
        if isinstance(keyed, Mapping):  # saved under another wrapper: keyed by this model's names
            keyed = {own.get(canonical(k), k) if isinstance(k, str) else k: v for k, v in keyed.items()}
        masters = _check_masters(keyed, expected)
    elif saved["master_copies"]:
        _fail("master_copies are given but solver_state is None; accepted: both or neither (before a visit's first step).")
    elif schedule.step_in_block:
        _fail(f"solver_state is None at step {schedule.step_in_block} of a visit; accepted: the solver state saved "
              "mid-visit (None only at a visit's first step, step_in_block 0). A DCP load into the template of an "
              "optimizer at another block drops it: load with bcd.sharded.load, or save on visit boundaries.")
    switches = saved.get("switches", 0)  # absent from dicts saved before it was counted
    if not is_int(switches, 0):
        _fail(f"switches is {switches!r}; accepted: an integer >= 0.")
    return Restore(schedule=schedule, partition=partition, group_hyperparameters=tuple(hyper),
                   solver_state=solver_state, master_copies=masters, switches=switches)
