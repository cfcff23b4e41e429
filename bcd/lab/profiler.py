r"""Backward cost by block: what training one block at a time saves, measured on your model.

With block :math:`i` alone active, autograd computes weight gradients for that block only and
stops below its lowest parameter. For each block the profiler measures forward and backward
time (warm-up, repeats, median with min and max; synchronised on CUDA) and counts their FLOPs
with ``torch.utils.flop_counter.FlopCounterMode`` (deterministic), beside "all blocks" (full
backward) and "no block" (forward only).

Block-epoch prediction over D uniform layers, relative to full backward:

- the paper's coarse count: :math:`D(D+1)/2` unit passes instead of :math:`D^2`, i.e. :math:`(D+1)/(2D)`;
- the refined count (docs/design.md): a layer's backward is an input-gradient half and a
  weight-gradient half; with layer :math:`i` active the layers above cost their input half, the
  active layer its weight half and about half its input half, so a block-epoch costs
  :math:`(D+2)/(4D)`, plus the head's share (its backward when it is the active block);
- the FLOP-based figure (mean of the layers' backward FLOP ratios) and the measured time ratio.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bcd import checkpointing
from bcd.blocks import block_numel
from bcd.construction import candidates_of, resolve_partition
from bcd.checks import positive_int

EDGE_BLOCKS = ("embedding", "head")


@attrs.frozen(kw_only=True)
class Timing:
    """Seconds: median, min and max over the repeats."""

    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> Timing:
        return cls(median=statistics.median(values), min=min(values), max=max(values))


@attrs.frozen(kw_only=True)
class BlockProfile:
    """Forward and backward cost with one block active (or all, or none).

    Attributes:
        name: the block's name, ``"all blocks"`` or ``"no block"``.
        depth: index in the partition (input to output); -1 for all, -2 for none.
        params: parameters trained.
        forward_flops, backward_flops: counted FLOPs (backward 0 for "no block").
        backward_flops_ratio: backward FLOPs relative to the full backward.
        forward_time: forward timing.
        backward_time: backward timing (None for "no block").
        backward_time_ratio: median backward time relative to the full backward's.
        memory_delta: peak memory of forward + backward above what was held before (CUDA only).
    """

    name: str
    depth: int
    params: int
    forward_flops: int
    backward_flops: int
    backward_flops_ratio: float
    forward_time: Timing
    backward_time: Timing | None
    backward_time_ratio: float | None
    memory_delta: int | None


@attrs.frozen(kw_only=True)
class EpochPrediction:
    """Backward cost of one block-epoch relative to full-parameter backward.

    Attributes:
        blocks: D, the blocks averaged over (the ``layer`` partition's embedding and head blocks
            are left out, as in bcd.BAdam).
        coarse: the paper's :math:`(D+1)/(2D)`.
        refined: :math:`(D+2)/(4D)` + ``head_share``.
        head_share: the head block's backward FLOP ratio (0 without a head block).
        flops: mean backward FLOP ratio over the blocks.
        time: mean backward time ratio over the blocks.
    """

    blocks: int
    coarse: float
    refined: float
    head_share: float
    flops: float
    time: float


@attrs.frozen(kw_only=True)
class Profile:
    """A whole profile; ``attrs.asdict`` of it is the JSON the CLI writes (docs/profile.schema.json)."""

    model: str
    batch: int
    seq: int
    dtype: str
    device: str
    checkpointing: bool
    repeats: int
    blocks: tuple[BlockProfile, ...]
    full: BlockProfile
    none: BlockProfile
    epoch: EpochPrediction


def check_device(device: str) -> torch.device:
    """``device`` as a torch device, if it is usable here.

    Raises:
        ValueError: unknown or unavailable device.
    """
    if device == "cpu":
        return torch.device("cpu")
    if device.split(":")[0] == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"Unavailable device: {device!r} (torch.cuda.is_available() is False here); accepted: cpu.")
        return torch.device(device)
    raise ValueError(f"Unknown device: {device!r}; accepted: cpu, cuda, cuda:N.")


def default_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The model's own loss on ``input_ids`` (labels = inputs, or class 0 for classifiers).

    A model without a loss (an encoder such as ``BertModel``, which takes no labels) gets the sum
    of every floating-point output, so that each part (the pooler too) reaches it.
    """
    if type(model).__name__.endswith("ForSequenceClassification"):
        labels = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    else:
        labels = input_ids
    try:
        output = model(input_ids=input_ids, labels=labels)
    except TypeError:  # forward() takes no labels
        output = model(input_ids=input_ids)
    loss = getattr(output, "loss", None)
    if loss is not None:
        return loss
    values = output.values() if isinstance(output, Mapping) else output if isinstance(output, (tuple, list)) else [output]
    return sum(t.float().sum() for t in values if isinstance(t, torch.Tensor) and t.is_floating_point())


def profile(
    model: nn.Module,
    *,
    batch: int = 8,
    seq: int = 512,
    vocab_size: int | None = None,
    partitioner: str = "layer",
    partitioner_options: Mapping[str, Any] | None = None,
    max_block_params: int | None = None,
    repeats: int = 5,
    warmup: int = 1,
    use_checkpointing: bool = False,
    loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] = default_loss,
    progress: Callable[[str], None] | None = None,
    name: str | None = None,
) -> Profile:
    """Profile forward and backward with each block of the partition active alone.

    Args:
        model: the model, on the device and in the dtype to profile.
        batch: batch size, at least 1.
        seq: sequence length, at least 1.
        vocab_size: token ids are drawn below it (default: ``model.config.vocab_size``).
        partitioner: the partitioner (default ``layer``, embedding and head included).
        partitioner_options: its options.
        max_block_params: split blocks larger than this by rows (default: the partitioner's limit).
        repeats: timed runs per block, at least 1.
        warmup: untimed runs first.
        use_checkpointing: enable non-reentrant activation checkpointing (savings kept).
        loss_fn: ``loss_fn(model, input_ids) -> scalar`` (default: the model's own loss).
        progress: called with a label before each configuration is measured.
        name: a label for the model.

    Raises:
        ValueError: batch, seq or repeats below 1, or an invalid partition.
    """
    for label, value in (("batch", batch), ("seq", seq), ("repeats", repeats)):
        positive_int(label, value)
    # An optimizer driving the model has frozen all but its active block: profile what it trains.
    params = candidates_of(model)
    partition = resolve_partition(model, partitioner, partitioner_options or {}, params, max_block_params)[2]
    if use_checkpointing:
        checkpointing.enable(model)
    model.train()
    first = next(iter(params.values()))
    device = first.device
    vocab = vocab_size or getattr(getattr(model, "config", None), "vocab_size", None) or 2
    input_ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def activate(active: set[str]) -> None:
        for n, p in params.items():
            p.requires_grad_(n in active)
            p.grad = None

    def count(active: set[str]) -> tuple[int, int]:
        activate(active)
        with FlopCounterMode(display=False) as counter:
            loss = loss_fn(model, input_ids)
        forward = counter.get_total_flops()
        if not active:
            return forward, 0
        if not loss.requires_grad:
            unreached = next(label for label, _, names in configs if names == active)
            raise ValueError(
                f"Block {unreached!r} does not reach the loss ({getattr(loss_fn, '__name__', 'loss_fn')}): its "
                "parameters get no gradient, so there is no backward to profile. Accepted: a loss that uses every "
                "block (loss_fn=...), or a partition that leaves that block out."
            )
        with FlopCounterMode(display=False) as counter:
            loss.backward()
        return forward, counter.get_total_flops()

    def timed(active: set[str]) -> tuple[float, float, int | None]:
        activate(active)
        if device.type == "cuda":
            sync()
            baseline = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        sync()
        start = time.perf_counter()
        loss = loss_fn(model, input_ids)
        sync()
        middle = time.perf_counter()
        if active:
            loss.backward()
        sync()
        end = time.perf_counter()
        memory = torch.cuda.max_memory_allocated(device) - baseline if device.type == "cuda" else None
        return middle - start, end - middle, memory

    configs = [("all blocks", -1, set(partition.tensor_names))]
    # A row block is timed with its whole tensor trainable: an upper bound where training computes
    # the rows' gradient only (bcd.rowgrad), the cost where it cannot (several ranks, tied weights).
    configs += [(block.name, i, set(block.tensor_names)) for i, block in enumerate(partition)]
    configs.append(("no block", -2, set()))
    try:
        flops = []
        for label, _, active in configs:
            if progress:
                progress(f"counting FLOPs: {label}")
            flops.append(count(active))
        # Round-robin over the configurations, so that drift in machine speed hits all alike.
        samples: list[list[tuple[float, float, int | None]]] = [[] for _ in configs]
        for round_index in range(warmup + repeats):
            if progress:
                progress(f"timing: round {round_index + 1} of {warmup + repeats}")
            for index, (_, _, active) in enumerate(configs):
                sample = timed(active)
                if round_index >= warmup:
                    samples[index].append(sample)
    finally:
        activate(set(params))

    full_backward = Timing.of([s[1] for s in samples[0]])
    profiles = []
    for (label, depth, active), (forward_flops, backward_flops), runs in zip(configs, flops, samples):
        backward = Timing.of([s[1] for s in runs]) if active else None
        memories = [s[2] for s in runs if s[2] is not None]
        profiles.append(BlockProfile(
            name=label,
            depth=depth,
            params=block_numel(partition[depth], params) if depth >= 0 else sum(params[n].numel() for n in active),
            forward_flops=forward_flops,
            backward_flops=backward_flops,
            backward_flops_ratio=backward_flops / flops[0][1] if flops[0][1] else 0.0,
            forward_time=Timing.of([s[0] for s in runs]),
            backward_time=backward,
            backward_time_ratio=backward.median / full_backward.median if backward else None,
            memory_delta=max(memories) if memories else None,
        ))
    full, *blocks, none = profiles
    blocks = tuple(blocks)
    return Profile(
        model=name or type(model).__name__,
        batch=batch,
        seq=seq,
        dtype=str(first.dtype).removeprefix("torch."),
        device=str(device),
        checkpointing=use_checkpointing,
        repeats=repeats,
        blocks=blocks,
        full=full,
        none=none,
        epoch=predict_epoch(blocks, partitioner),
    )


def edge_of(block_name: str, edges: tuple[str, ...] = EDGE_BLOCKS) -> str | None:
    """The edge (``embedding`` or ``head``) a block is, or is a row block of (``head/3``), else None."""
    return next((edge for edge in edges if block_name == edge or block_name.startswith(f"{edge}/")), None)


def predict_epoch(blocks: tuple[BlockProfile, ...], partitioner: str = "layer") -> EpochPrediction:
    """The block-epoch figures from per-block profiles (see the module docstring)."""
    edges = EDGE_BLOCKS if partitioner == "layer" else ()
    inner = [b for b in blocks if edge_of(b.name, edges) is None] or list(blocks)
    # A head split into row blocks: each row block is profiled with the whole head trainable (see
    # profile()), so the head's share is their mean.
    head = [b.backward_flops_ratio for b in blocks if edge_of(b.name, edges) == "head"]
    d = len(inner)
    head_share = sum(head) / len(head) if head else 0.0
    times = [b.backward_time_ratio for b in inner if b.backward_time_ratio is not None]
    return EpochPrediction(
        blocks=d,
        coarse=(d + 1) / (2 * d),
        refined=(d + 2) / (4 * d) + head_share,
        head_share=head_share,
        flops=sum(b.backward_flops_ratio for b in inner) / d,
        time=sum(times) / len(times) if times else float("nan"),
    )
