"""Multi-process training: FSDP2, DDP and bcd's own data parallelism, on PyTorch's engines only.

- **FSDP2** (``torch.distributed.fsdp.fully_shard``): parameters are DTensors sharded on dim 0.
  bcd's master copies and solver state are made from them, so they are sharded alike: per rank
  about (2M + 16M/D)/N GB for M billion parameters. Switching blocks only toggles ``requires_grad``; no re-wrapping.
- **DDP**: ``DistributedDataParallel(model, find_unused_parameters=True)``. Frozen parameters
  get no gradient and are reported unused, so the trainable set may change every K steps; DDP
  still all-reduces whole buckets, i.e. communication per step ~ the model.
- **bcd data parallel** (``data_parallel=True``): no wrapper; the active block's gradients are
  averaged in buckets launched during backward (:mod:`bcd.averaging`), so communication per step
  ~ the active block. Replicas start equal (same seed, or broadcast) and stay equal.

Wrapper before or after the optimizer: both work. Built over a wrapped model, the optimizer
freezes all blocks but one at once. Built over a plain model on several ranks (the Trainer and
``accelerate``'s ``prepare()`` wrap the model after the optimizer exists), it leaves every
candidate trainable until the model's first forward with autograd, so that DDP registers every
parameter; then it adopts the parameters FSDP2 swapped in (same names), freezes, and checks at
the first step of every visit that the ranks' gradients agree (:func:`check_gradients_agree`):
nothing averaging them is an error, not a silent drift.

Saving: the optimizer's state holds one block, so :func:`full_state_dict` gathers it into plain
tensors on every rank (cheap: 16M/D GB at most, for M billion parameters), and ``load_state_dict`` re-shards it into
whatever the current parameters are. A checkpoint saved on N ranks loads on any number.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle


def check_supported(model: nn.Module) -> None:
    """Refuse wrappers bcd cannot drive, with what to use instead.

    Raises:
        ValueError: FSDP1, a DeepSpeed engine or ZeRO-3
            parameters, or DDP without ``find_unused_parameters=True``.
    """
    if type(model).__name__ == "DeepSpeedEngine" or any(hasattr(p, "ds_id") for p in model.parameters()):
        raise ValueError(
            "Unsupported model: a DeepSpeed engine or ZeRO-3 partitioned parameters; bcd runs on PyTorch's own "
            "engines. Accepted: FSDP2 (torch.distributed.fsdp.fully_shard, launched with torchrun --nproc-per-node N, "
            "as examples/distributed_loop.py --mode fsdp2), DDP(find_unused_parameters=True), or "
            "BlockCoordinateOptimizer(..., data_parallel=True); docs/migrating.md maps a ZeRO-3 setup onto them."
        )
    from torch.distributed.fsdp import FullyShardedDataParallel

    # Also the layers FSDP1 wrapped inside a model the optimizer already held (the Trainer's FSDP1
    # wraps after the optimizer exists): checked again at the first forward.
    wrapped = [m for m in model.modules() if isinstance(m, FullyShardedDataParallel)]
    if wrapped:
        raise ValueError(
            f"Unsupported model: FSDP1 (FullyShardedDataParallel, {len(wrapped)} module(s) wrapped); "
            "it checkpoints optimizers with FSDP.optim_state_dict, which needs torch's per-parameter state, and "
            "without use_orig_params flattens parameters so that single ones cannot be frozen. Accepted: FSDP2 "
            "(fully_shard; the Trainer's fsdp_config={'version': 2}), DDP(find_unused_parameters=True), or "
            "BlockCoordinateOptimizer(..., data_parallel=True)."
        )
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) and not model.find_unused_parameters:
        raise ValueError(
            "Unsupported model: DistributedDataParallel with find_unused_parameters=False; the frozen blocks get no "
            "gradient and DDP would wait for them ('Expected to have finished reduction'). Accepted: "
            "DistributedDataParallel(model, find_unused_parameters=True), or no wrapper and data_parallel=True."
        )


def world_size() -> int:
    """Ranks in this job: the default process group's size, else torchrun's ``WORLD_SIZE``.

    The environment counts too because the Trainer and accelerate create the process group
    lazily, often after the optimizer is built; torchrun and ``accelerate launch`` set
    ``WORLD_SIZE`` before the script starts.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    value = os.environ.get("WORLD_SIZE", "1")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def sharded(tensor: Any) -> bool:
    """Whether ``tensor`` is a DTensor (FSDP2's sharded parameters, their gradients and states)."""
    return hasattr(tensor, "device_mesh")


def _is_fsdp2(model: nn.Module) -> bool:
    return any(sharded(p) for p in model.parameters())


def expects_wrapper(model: nn.Module, data_parallel: bool) -> bool:
    """Whether gradient averaging is expected from a wrapper that is not there yet.

    True on several ranks for a plain model (no DDP, no FSDP2) without ``data_parallel``: the
    Trainer and accelerate wrap the model in DDP or FSDP2 *after* the optimizer is built. The
    optimizer then defers freezing to the model's first forward, so that the wrapper sees every
    candidate as trainable, and checks with :func:`check_gradients_agree` at the first step of
    every visit that something did average the gradients.

    Raises:
        ValueError: ``data_parallel=True`` without an initialized process group.
    """
    initialized = dist.is_available() and dist.is_initialized()
    if data_parallel and not initialized:
        raise ValueError(
            "Invalid data_parallel=True: torch.distributed is not initialized; call "
            "torch.distributed.init_process_group first (torchrun does the rest), or leave data_parallel=False."
        )
    if data_parallel or world_size() == 1:
        return False
    from torch.nn.parallel import DistributedDataParallel

    return not (isinstance(model, DistributedDataParallel) or _is_fsdp2(model))


class WrapperWait:
    """Defer freezing to the model's first forward with autograd, when a wrapper is expected.

    A global forward pre-hook, because it runs before every module's own hooks: a wrapper's
    pre-forward (FSDP2 unsharding the root's parameters) must not have run yet when
    :meth:`start` looks. Forwards without autograd (an evaluation before training) do not count.
    The hook holds this object weakly, and :meth:`close` removes it.

    Args:
        model: the plain model the optimizer was built over.
        on_start: called once with the model's parameters by name as they are then (FSDP2 swaps
            in new objects under the same names).
    """

    def __init__(self, model: nn.Module, on_start: Callable[[dict[str, nn.Parameter]], None]) -> None:
        self.model = model
        self.on_start = on_start
        ref = weakref.ref(self)

        def hook(module: nn.Module, args: Any) -> None:
            live = ref()
            if live is not None and module is live.model and torch.is_grad_enabled():
                live.start()

        self._handle: RemovableHandle | None = nn.modules.module.register_module_forward_pre_hook(hook)

    @property
    def pending(self) -> bool:
        """Whether the first forward has not happened yet."""
        return self._handle is not None

    @property
    def handle(self) -> RemovableHandle | None:
        """The global forward pre-hook's handle while pending (for an owner that removes every hook it put in place)."""
        return self._handle

    def start(self) -> None:
        """Adopt the wrapped model's parameters (idempotent); also called at the first step or state load."""
        if self._handle is None:
            return
        check_wrapper_at_first_forward()
        check_supported(self.model)
        self.close()
        self.on_start(dict(self.model.named_parameters(remove_duplicate=False)))

    def close(self) -> None:
        """Remove the global hook."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def adopt(candidates: Mapping[str, nn.Parameter], current: Mapping[str, nn.Parameter]) -> dict[str, nn.Parameter]:
    """The candidates re-read by name from ``current`` (a wrapper may replace parameter objects, not names).

    Raises:
        ValueError: a candidate's name is gone.
    """
    missing = [n for n in candidates if n not in current]
    if missing:
        raise ValueError(
            f"The model lost parameters after the optimizer was built (e.g. {missing[0]!r}); a wrapper may only "
            "replace parameters under the same names (FSDP2 does)."
        )
    return {n: current[n] for n in candidates}


def check_wrapper_at_first_forward() -> None:
    """Refuse a DDP wrapper, seen from inside its forward, that cannot let the blocks change.

    Raises:
        ValueError: the model runs inside ``DistributedDataParallel(find_unused_parameters=False)``.
    """
    from torch.nn.parallel import DistributedDataParallel

    # DDP names the wrapper whose forward is running here (a private attribute: absent, nothing
    # is checked here, and DDP itself fails at the next forward with 'Expected to have finished
    # reduction').
    ddp = getattr(DistributedDataParallel, "_active_ddp_module", None)
    if ddp is not None and not ddp.find_unused_parameters:
        raise ValueError(
            "Unsupported model: it was wrapped in DistributedDataParallel with find_unused_parameters=False "
            "(accelerate's default, and the Trainer's when gradient checkpointing is on); the frozen blocks get no "
            "gradient and DDP would wait for them. Accepted: find_unused_parameters=True (Trainer: "
            "TrainingArguments(ddp_find_unused_parameters=True); accelerate: Accelerator(kwargs_handlers="
            "[DistributedDataParallelKwargs(find_unused_parameters=True)])), or no wrapper and data_parallel=True."
        )


def check_gradients_agree(params: Iterable[torch.Tensor], block: str) -> None:
    """Refuse to step when the ranks hold different gradients: nothing averaged them.

    A collective (call on every rank): each rank contributes the sum and the sum of squares of
    its gradients, so every rank reaches the same verdict and none is left waiting. Sharded
    (FSDP2) gradients differ by design and are skipped.

    Raises:
        ValueError: the gradients differ between ranks, or there is no process group to ask.
    """
    world = world_size()
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"Unsupported setup: WORLD_SIZE={world}, but torch.distributed was never initialized, so nothing averages "
            "the gradients. Accepted: torch.distributed.init_process_group and a DDP or FSDP2 wrapper, data_parallel="
            "True, or the Trainer / accelerate, which do both."
        )
    grads = [p.grad for p in params if p.grad is not None and not sharded(p)]
    device = grads[0].device if grads else torch.device("cuda" if dist.get_backend() == "nccl" else "cpu")
    local = torch.zeros(2, dtype=torch.float64, device=device)
    for grad in grads:
        local += torch.stack([grad.double().sum(), grad.double().square().sum()])
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise ValueError(
            f"Unsupported setup: {world} ranks hold different gradients for block {block!r}: nothing averaged them, "
            "and the replicas would drift apart. Nothing was updated. Accepted: wrap the model in "
            "DistributedDataParallel(model, find_unused_parameters=True) or FSDP2 (fully_shard) before its first "
            "forward, pass data_parallel=True, or train with the Trainer / accelerate, which wrap it (but the "
            "Trainer trains without DDP after a trainer.evaluate() before trainer.train())."
        )


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
    if sharded(target) and not sharded(saved) and tuple(saved.shape) == tuple(target.shape):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(saved.to(target.dtype), target.device_mesh, target.placements)
    return saved


def reshard_solver_state(solver_state: Mapping[str, Any], solver: torch.optim.Optimizer) -> dict[str, Any]:
    """Solver state saved as full tensors (:func:`full_state_dict`), laid out like ``solver``'s parameters."""
    params = [p for group in solver.param_groups for p in group["params"]]
    return {**solver_state, "state": {
        index: {k: like(v, params[int(index)]) if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
        for index, entry in solver_state["state"].items()
    }}
