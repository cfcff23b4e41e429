r"""Memory accounting: estimates before training, exact measurement during it.

Categories, in bytes:

- **weights**: the model's parameters, in their dtype;
- **gradients**: held at the moment the solver steps (for bcd: the active block's bf16
  gradients, a row block's rows only where :mod:`bcd.rowgrad` applies and the whole tensor
  elsewhere, and one reused fp32 gradient buffer, see :mod:`bcd.precision`);
- **solver state**: the inner solver's tensors (Adam: :math:`m`, :math:`v` and a step counter per
  tensor);
- **master copies**: fp32 copies of low-precision parameters.

For an M-parameter bf16 model split into D equal blocks, the paper counts BAdam at
:math:`2M + 16M/D` bytes (weights, then master + gradient + :math:`m` + :math:`v` for one block);
bcd streams the step through one 16 MB fp32 gradient buffer, so a block of ``m`` parameters
costs :math:`14m` bytes and the buffer instead of :math:`16m` (:mod:`bcd.precision`). The real peak is set by the **largest** block,
which the estimate names; by default no block is larger than a transformer layer. Mixed-precision Adam
holds :math:`2M` (weights) + :math:`2M` (gradients) + :math:`4M` (masters) + :math:`8M` (states).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import attrs
import torch
from torch import nn

from bcd import plugins, rowgrad
from bcd.checks import positive_int
from bcd.construction import resolve_partition
from bcd.lab.measure import Breakdown, LiveMemory, measure
from bcd.blocks import block_numel, entry_numel, parse_entry
from bcd.cost import SolverLayout, block_bytes, plan_buffers, solver_layout

__all__ = ["Breakdown", "LiveMemory", "MemoryEstimate", "estimate", "estimate_activations", "format_size", "measure",
           "parse_size"]
METHODS = ("adam", "badam", "badam-lean", "badam-lean8", "lora", "lomo")


@attrs.frozen(kw_only=True)
class BlockFigure:
    """What training one block costs on top of the weights."""

    name: str
    params: int
    bytes: Breakdown


@attrs.frozen(kw_only=True)
class MethodEstimate:
    """One method's memory at its peak, without activations.

    Attributes:
        method: ``adam``, ``badam``, ``lora`` or ``lomo``.
        breakdown: bytes by category at the peak.
        note: how the figure is made up.
        blocks: BAdam only: every block's figure.
        largest_block: BAdam only: the block that sets the peak.
        paper_formula: BAdam only: the paper's :math:`2M + 16M/D` bytes, for comparison.
    """

    method: str
    breakdown: Breakdown
    note: str
    blocks: tuple[BlockFigure, ...] = ()
    largest_block: str | None = None
    paper_formula: int | None = None


@attrs.frozen(kw_only=True)
class ActivationEstimate:
    """Activation memory, an *estimate* (Korthikanti et al. 2022, attention without flash kernels)."""

    batch: int
    seq: int
    checkpointing: bool
    bytes: int
    note: str = "estimate"


@attrs.frozen(kw_only=True)
class MemoryEstimate:
    """Estimates for every method asked for, on one model."""

    model: str
    params: int
    dtype: str
    methods: tuple[MethodEstimate, ...]
    activations: ActivationEstimate | None = None

    def method(self, name: str) -> MethodEstimate:
        for estimate in self.methods:
            if estimate.method == name:
                return estimate
        raise ValueError(f"No estimate for method {name!r}; this report has {[m.method for m in self.methods]}.")


# ---------------------------------------------------------------------------- estimates


def _shard(count: int, world_size: int) -> int:
    """One rank's share of ``count`` bytes sharded over ``world_size`` ranks (FSDP2: dim 0, rounded up)."""
    return -(-count // world_size)


def _block_cost(entries: Sequence[str], params: Mapping[str, torch.Tensor], layout: SolverLayout,
                fp32_gradient: int, world_size: int = 1, lean: bool | str = False,
                by_rows: Collection[str] = ()) -> Breakdown:
    """Bytes of training the block of ``entries`` (names or row entries), beside the weights (:mod:`bcd.cost`).

    A row block of a tensor in ``by_rows`` (:func:`bcd.rowgrad.owners`) holds its rows' gradient in
    the model's dtype, any other partly active tensor its whole gradient; low-precision entries have
    fp32 masters and share one fp32 gradient buffer of ``fp32_gradient`` bytes.
    """
    held: dict[str, list[str]] = {}
    for entry in entries:
        held.setdefault(parse_entry(entry)[0], []).append(entry)
    gradients = sum(params[name].element_size() * (entry_numel(found[0], params) if name in by_rows and len(found) == 1
                                                    else params[name].numel()) for name, found in held.items())
    need = block_bytes(entries, params, layout, lean)
    kind = lambda name: sum(count for (k, _), count in need.items() if k == name)  # noqa: E731 - over devices
    return Breakdown(
        gradients=_shard(gradients + fp32_gradient, world_size),
        # Per-tensor state (Adam's step counter) is a scalar that every rank keeps whole.
        solver_state=_shard(kind("moments") + kind("moments8") + kind("moments8 scratch"), world_size)
        + layout.bytes_per_tensor * len(entries),
        master_copies=_shard(kind("masters"), world_size),
    )


# The attention query and value projections by family, peft's defaults: Llama and most causal LMs,
# GPT-2 (fused c_attn), BERT/RoBERTa, T5.
DEFAULT_LORA_TARGETS = (("q_proj", "v_proj"), ("c_attn",), ("query", "value"), ("q", "v"))


def _linear_names(model: nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
            if (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D") and getattr(m, "weight", None) is not None}


def lora_targets_for(model: nn.Module) -> tuple[str, ...]:
    """The first of :data:`DEFAULT_LORA_TARGETS` that this model has, else every linear layer's name."""
    names = _linear_names(model)
    return next((t for t in DEFAULT_LORA_TARGETS if set(t) <= names), tuple(sorted(names)))


def _lora_params(model: nn.Module, rank: int, targets: Sequence[str]) -> list[int]:
    """Adapter sizes ``rank * (in + out)`` for every linear layer whose name ends in a target."""
    sizes, linear_names = [], set()
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        is_linear = isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
        if not is_linear or weight is None or weight.ndim != 2:
            continue
        short = name.rsplit(".", 1)[-1]
        linear_names.add(short)
        if short in targets:
            sizes.append(rank * (weight.shape[0] + weight.shape[1]))
    if not sizes:
        raise ValueError(
            f"Invalid LoRA targets: {list(targets)} match no linear layer; this model's linear layers are "
            f"named {', '.join(sorted(linear_names))}."
        )
    return sizes


def estimate(
    model: nn.Module,
    *,
    methods: Sequence[str] = METHODS,
    partitioner: str = "layer",
    partitioner_options: Mapping[str, Any] | None = None,
    max_block_params: int | None = None,
    solver: str = "adamw",
    solver_options: Mapping[str, Any] | None = None,
    lora_rank: int = 8,
    lora_targets: Sequence[str] | None = None,
    activations: ActivationEstimate | None = None,
    name: str | None = None,
    world_size: int = 1,
) -> MemoryEstimate:
    """Estimate each method's memory on ``model``, which may live on the ``meta`` device.

    Args:
        model: the model, in the dtype it will train in.
        methods: any of ``adam`` (mixed precision when the model is bf16/fp16), ``badam``,
            ``badam-lean`` (``lean=True``), ``badam-lean8`` (``lean="8bit"``), ``lora``, ``lomo``.
        partitioner: BAdam's partitioner; its options default to its own (``layer``: every
            parameter, embedding and head split into row blocks no larger than a layer).
        partitioner_options: options for it.
        max_block_params: split blocks larger than this by rows (default: the partitioner's limit).
        solver: the inner solver (also Adam's and LoRA's optimizer), ``adamw`` by default.
        solver_options: its options (they can change its state, e.g. ``amsgrad``).
        lora_rank: LoRA's rank r.
        lora_targets: names of the linear layers LoRA adapts; default :func:`lora_targets_for` the model.
        activations: an activation estimate to carry along (see :func:`estimate_activations`).
        name: a label for the model.
        world_size: N ranks sharding with FSDP2: figures are per rank, every per-element term
            divided by N (per rank about (2M + 16M/D)/N for BAdam).

    Raises:
        ValueError: an unknown method, or invalid partitioner, solver or LoRA options.
    """
    positive_int("world_size", world_size)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"Unknown method(s): {unknown or list(methods)}; accepted: {', '.join(METHODS)}.")
    params = dict(model.named_parameters())
    all_params = list(params.values())
    total = sum(p.numel() for p in all_params)
    weights = _shard(sum(p.numel() * p.element_size() for p in all_params), world_size)
    layout = solver_layout(lambda groups, **options: plugins.create("solver", solver, options, groups),
                           solver_options)
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in all_params})
    results = []
    for method in methods:
        if method == "adam":
            cost = _block_cost(list(params), params, layout, 0, world_size)
            # Full-parameter training keeps low-precision gradients in the model's dtype.
            gradients = _shard(sum(p.numel() * p.element_size() for p in all_params), world_size)
            results.append(MethodEstimate(
                method="adam",
                breakdown=attrs.evolve(cost, weights=weights, gradients=gradients),
                note=f"{solver} over all parameters; fp32 masters for low-precision ones",
            ))
        elif method in ("badam", "badam-lean", "badam-lean8"):
            lean = {"badam": False, "badam-lean": True, "badam-lean8": "8bit"}[method]
            partition = resolve_partition(model, partitioner, partitioner_options or {}, params, max_block_params)[2]
            buffer = sum(4 * n for (kind, _), n in plan_buffers([b.param_names for b in partition], params, layout,
                                                                 lean).items() if kind == "gradient")
            by_rows = rowgrad.owners(model, partition.row_spans)
            figures = tuple(
                BlockFigure(
                    name=block.name,
                    params=block_numel(block, params),
                    bytes=_block_cost(block.param_names, params, layout, buffer, world_size, lean, by_rows),
                )
                for block in partition
            )
            largest = max(figures, key=lambda f: f.bytes.total)
            # bcd's fp32 buffers are sized once for the largest need of each kind (bcd.buffers).
            peak = Breakdown(weights=weights, **{k: max(getattr(f.bytes, k) for f in figures)
                                                  for k in ("gradients", "solver_state", "master_copies")})
            results.append(MethodEstimate(
                method=method,
                breakdown=peak,
                note=f"{partitioner} partition, D={len(figures)}; peak set by block {largest.name!r}"
                     + {False: "", True: "; no fp32 masters (lean=True)",
                        "8bit": "; no fp32 masters, 8-bit moments (lean='8bit')"}[lean],
                blocks=figures,
                largest_block=largest.name,
                paper_formula=_shard(2 * total + 16 * total // len(figures), world_size),
            ))
        elif method == "lora":
            lora_targets = tuple(lora_targets) if lora_targets else lora_targets_for(model)
            adapters = _lora_params(model, lora_rank, lora_targets)
            numel = sum(adapters)
            results.append(MethodEstimate(
                method="lora",
                breakdown=Breakdown(
                    weights=weights + _shard(4 * numel, world_size),
                    gradients=_shard(4 * numel, world_size),
                    solver_state=_shard(layout.bytes_per_element * numel, world_size)
                    + layout.bytes_per_tensor * 2 * len(adapters),
                ),
                note=f"rank {lora_rank} on {', '.join(lora_targets)} ({len(adapters)} linear modules); fp32 adapters",
            ))
        else:
            largest_tensor = max(p.numel() * p.element_size() for p in all_params)
            results.append(MethodEstimate(
                method="lomo",
                breakdown=Breakdown(weights=weights, gradients=_shard(largest_tensor, world_size)),
                note="SGD fused into backward: one gradient tensor at a time, no solver state",
            ))
    return MemoryEstimate(
        model=name or type(model).__name__,
        params=total,
        dtype="/".join(dtypes),
        methods=tuple(results),
        activations=activations,
    )


def _config_value(config: Any, *names: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise ValueError(f"The config has none of {names}; cannot estimate activations for it.")


def estimate_activations(config: Any, *, batch: int, seq: int, checkpointing: bool = False) -> ActivationEstimate:
    r"""Activation memory of one forward/backward, an estimate.

    Per transformer layer, 16-bit, no recomputation: :math:`sbh(34 + 5as/h)` bytes (Korthikanti et
    al. 2022); with checkpointing each layer keeps only its input (:math:`2sbh`) and one layer is
    recomputed at a time. The logits add :math:`6sbV` (bf16, then fp32 for the loss).

    Raises:
        ValueError: batch or seq below 1.
    """
    for label, value in (("batch", batch), ("seq", seq)):
        positive_int(label, value)
    h = _config_value(config, "hidden_size", "n_embd", "d_model")
    a = _config_value(config, "num_attention_heads", "n_head")
    layers = _config_value(config, "num_hidden_layers", "n_layer", "num_layers")
    vocab = _config_value(config, "vocab_size")
    per_layer = seq * batch * h * (34 + 5 * a * seq // h)
    stored = layers * 2 * seq * batch * h + per_layer if checkpointing else layers * per_layer
    return ActivationEstimate(batch=batch, seq=seq, checkpointing=checkpointing, bytes=stored + 6 * seq * batch * vocab)


# ---------------------------------------------------------------------------- sizes


_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
#: The largest size accepted: 1 PiB, past any machine's memory (and float's exact integers).
LARGEST_SIZE = 2**50


def parse_size(text: str) -> int:
    """``"24GiB"``, ``"80 GB"``, ``"512MiB"`` or ``"1024B"``, as bytes; the unit is required.

    A bare number is refused rather than read as bytes: ``--budget 24`` meant 24 GiB or GB, not 24 bytes.

    Raises:
        ValueError: not a positive number with a known unit, or above 1 PiB.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    value = float(match.group(1)) * _UNITS[match.group(2).upper()] if match and match.group(2).upper() in _UNITS else 0.0
    if not 0 < value <= LARGEST_SIZE:
        raise ValueError(
            f"Invalid size: {text!r:.60}; accepted: a positive number up to 1 PiB with a unit B, KB, MB, GB, TB "
            "(powers of 10) or KiB, MiB, GiB, TiB (powers of 2), e.g. 24GiB."
        )
    return int(value)


def format_size(count: int) -> str:
    """Bytes as decimal GB (the paper's unit), or MB below 1 GB."""
    return f"{count / 1e9:.2f} GB" if count >= 1e9 else f"{count / 1e6:.2f} MB"
