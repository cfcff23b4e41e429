"""Multi-process training: FSDP2, DDP and bcd's own data parallelism, on PyTorch's engines only.

- **FSDP2** (``torch.distributed.fsdp.fully_shard``): parameters are DTensors sharded on dim 0.
  bcd's master copies and solver state are made from them, so they are sharded alike: per rank
  about (2M + 16M/D)/N bytes. Switching blocks only toggles ``requires_grad``; no re-wrapping.
- **DDP**: wrap the model with ``DistributedDataParallel(model, find_unused_parameters=True)``
  *before* building the optimizer, and give the optimizer the wrapper. Frozen parameters get no
  gradient and are reported unused, so the trainable set may change every K steps; DDP still
  all-reduces whole buckets, i.e. communication per step ~ the model.
- **bcd data parallel** (``data_parallel=True``): no wrapper; each active parameter's gradient is
  all-reduced (averaged) as soon as backward has accumulated it, so communication per step ~
  the active block. Replicas start equal (same seed, or broadcast) and stay equal.

Saving: the optimizer's state holds one block, so :func:`full_state_dict` gathers it into plain
tensors on every rank (cheap: 16M/D bytes at most), and ``load_state_dict`` re-shards it into
whatever the current parameters are. A checkpoint saved on N ranks loads on any number.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle


def check_supported(model: nn.Module) -> None:
    """Refuse wrappers bcd cannot drive, with what to use instead.

    Raises:
        ValueError: FSDP1 without ``use_orig_params=True``, a DeepSpeed engine or ZeRO-3
            parameters, or DDP without ``find_unused_parameters=True``.
    """
    if type(model).__name__ == "DeepSpeedEngine" or any(hasattr(p, "ds_id") for p in model.parameters()):
        raise ValueError(
            "Unsupported model: a DeepSpeed engine or ZeRO-3 partitioned parameters; bcd runs on PyTorch's own "
            "engines. Accepted: FSDP2 (torch.distributed.fsdp.fully_shard), DDP(find_unused_parameters=True), or "
            "BlockCoordinateOptimizer(..., data_parallel=True)."
        )
    from torch.distributed.fsdp import FullyShardedDataParallel

    for module in model.modules():
        if isinstance(module, FullyShardedDataParallel) and not getattr(module, "_use_orig_params", False):
            raise ValueError(
                "Unsupported model: FSDP1 (FullyShardedDataParallel) with use_orig_params=False flattens parameters, "
                "so single parameters cannot be frozen. Accepted: FSDP2 (fully_shard), or FSDP1 with "
                "use_orig_params=True."
            )
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) and not model.find_unused_parameters:
        raise ValueError(
            "Unsupported model: DistributedDataParallel with find_unused_parameters=False; the frozen blocks get no "
            "gradient and DDP would wait for them ('Expected to have finished reduction'). Accepted: "
            "DistributedDataParallel(model, find_unused_parameters=True), built before the optimizer, or no wrapper "
            "and data_parallel=True."
        )


def check_gradient_sync(model: nn.Module, data_parallel: bool) -> None:
    """On more than one rank, refuse a setup in which nothing would average the gradients.

    Raises:
        ValueError: ``data_parallel=True`` without an initialized process group; or several
            ranks, and neither FSDP2 parameters, a DDP wrapper nor ``data_parallel=True``. (A DDP
            wrapper added after the optimizer is built would sync only the block active then,
            silently: wrap first.)
    """
    initialized = dist.is_available() and dist.is_initialized()
    if data_parallel and not initialized:
        raise ValueError(
            "Invalid data_parallel=True: torch.distributed is not initialized; call "
            "torch.distributed.init_process_group first (torchrun does the rest), or leave data_parallel=False."
        )
    if not initialized or dist.get_world_size() == 1 or data_parallel:
        return
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) or any(hasattr(p, "device_mesh") for p in model.parameters()):
        return
    raise ValueError(
        f"Unsupported setup: {dist.get_world_size()} ranks, but nothing averages the gradients of this plain model. "
        "Accepted: data_parallel=True; or build the optimizer over DistributedDataParallel(model, "
        "find_unused_parameters=True) or over an FSDP2 (fully_shard) model, wrapped before the optimizer."
    )


def gradient_sync_hooks(params: Iterable[nn.Parameter], group: Any = None) -> list[RemovableHandle]:
    """All-reduce (average) each parameter's gradient as soon as backward has accumulated it.

    With gradient accumulation every micro-batch is reduced; the mean of sums equals the sum of
    means, so the result is the same as reducing once.
    """
    world = dist.get_world_size(group)

    def hook(param: torch.Tensor) -> None:
        dist.all_reduce(param.grad, op=dist.ReduceOp.SUM, group=group)
        param.grad.div_(world)

    return [p.register_post_accumulate_grad_hook(hook) for p in params]


def _full(value: Any) -> Any:
    if hasattr(value, "full_tensor"):
        return value.full_tensor()
    if isinstance(value, Mapping):
        return {k: _full(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_full(v) for v in value]
    return value


def full_state_dict(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every DTensor gathered to a plain tensor (a collective: call on all ranks)."""
    return _full(optimizer.state_dict())


def like(saved: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``saved`` laid out like ``target``: sharded the same way when ``target`` is a DTensor.

    A plain tensor whose shape is the DTensor's global shape is distributed over the target's
    mesh; anything else is returned as is.
    """
    if hasattr(target, "device_mesh") and not hasattr(saved, "device_mesh") and tuple(saved.shape) == tuple(target.shape):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(saved.to(target.dtype), target.device_mesh, target.placements)
    return saved
