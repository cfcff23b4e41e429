"""bcd with the transformers Trainer.

The optimizer needs no adapter: ``Trainer(..., optimizers=(bcd.BAdam(model, ...), None))`` works
with the Trainer's LR scheduler, gradient accumulation, ``max_grad_norm`` clipping, bf16,
periodic checkpoints and ``resume_from_checkpoint`` (bcd's state dict carries the whole block
schedule), and on several processes with the DDP wrapper the Trainer adds (see
:mod:`bcd.distributed`) or with FSDP2 (``fsdp=True``, transformers' default version). FSDP2
checkpoints go through accelerate, which loads the optimizer into a fresh optimizer's template
(:mod:`bcd.sharded`): only the block position arrives, so every save must fall on a visit
boundary (``save_steps`` a multiple of ``switch_every``; checked here). FSDP1 is refused (its
``FSDP.optim_state_dict`` needs torch's per-parameter state). This module adds two conveniences:

- :func:`badam_from_training_args` builds ``bcd.BAdam`` from ``TrainingArguments`` (lr, weight
  decay with the usual no-decay group, betas, eps), so there is one source of truth;
- :class:`BlockCoordinateCallback` (via :func:`attach`) adds the active block, block-epoch,
  switches and memory by category to every log the Trainer writes, TensorBoard included.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from bcd.badam import EXPANSION_SCALE, BAdam
from bcd.lab.memory import measure
from bcd.optimizer import BlockCoordinateOptimizer

MB = 1e6


def _fsdp_version(args: TrainingArguments | None) -> int | None:
    """The FSDP version the Trainer will run with (``fsdp=...`` or ``accelerate launch``'s environment), else None."""
    if args is not None and args.fsdp:
        return int((args.fsdp_config or {}).get("version", 2))  # transformers' default: FSDP2
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return int(os.environ.get("FSDP_VERSION", "1"))  # accelerate's default: FSDP1
    return None


def check_fsdp(args: TrainingArguments | None, switch_every: int | None = None, save_steps: Any = None) -> None:
    """Refuse FSDP1, and FSDP2 runs whose step-wise saves fall inside a visit (see the module docstring).

    Raises:
        ValueError: naming the version or the steps received and what is accepted.
    """
    version = _fsdp_version(args)
    if version is None:
        return
    if version != 2:
        raise ValueError(
            f"Unsupported: bcd with the Trainer's FSDP version {version} (TrainingArguments(fsdp=...) or an accelerate "
            "FSDP config): FSDP1 checkpoints optimizers with FSDP.optim_state_dict, which needs torch's per-parameter "
            "state. Accepted: FSDP2 (fsdp_config={'version': 2}, or fsdp_version: 2 in the accelerate config), or "
            "the Trainer without fsdp (DDP on several processes)."
        )
    steps = save_steps if save_steps is not None else getattr(args, "save_steps", None)
    strategy = str(getattr(args, "save_strategy", "no")).rsplit(".", 1)[-1].lower()
    if strategy == "steps" and switch_every and isinstance(steps, (int, float)) and steps >= 1 and steps % switch_every:
        raise ValueError(
            f"Unsupported: save_steps={steps} with switch_every={switch_every} under the Trainer's FSDP2: accelerate "
            "loads an FSDP optimizer checkpoint into a fresh optimizer's template, which carries the block position "
            "but not a visit's solver state. Accepted: save_steps a multiple of switch_every (e.g. "
            f"{max(switch_every, round(steps / switch_every) * switch_every)}), so every save falls on a visit boundary."
        )


def badam_from_training_args(model: nn.Module, args: TrainingArguments, **kwargs: Any) -> BAdam:
    """``bcd.BAdam`` with the Trainer's optimizer settings.

    ``learning_rate``, ``weight_decay`` (biases and norm weights exempt, as the Trainer does),
    ``adam_beta1``/``adam_beta2`` and ``adam_epsilon`` come from ``args``; ``kwargs`` go to
    :class:`bcd.BAdam` (``switch_every``, ``order``, ``seed``, ``expansion``...) and win over
    ``args``. A run with ``max_steps`` passes it as ``total_steps``, so BAdam's defaults are its
    recipe: K for about three block-epochs over those steps and the expansion over every block; a
    run by epochs gets Algorithm 1's defaults (K = 100, no expansion). On one process with
    ``gradient_accumulation_steps`` N > 1 the expansion's scale is divided by N: it steps at every
    micro-batch, so the N steps of one optimizer step add up to one step of the mean sign. Several
    ranks keep the expanded gradients until the step, summed over the micro-batches and clipped
    like the active block's, at the full scale. Under the Trainer's FSDP2 there is no expansion (it
    wraps the model after this, and sharded weights are not expanded).

    Raises:
        ValueError: ``args`` asks for FSDP1, or FSDP2 with saves inside a visit (:func:`check_fsdp`).
    """
    check_fsdp(args)
    settings: dict[str, Any] = {
        "lr": args.learning_rate,
        "weight_decay": args.weight_decay,
        "betas": (args.adam_beta1, args.adam_beta2),
        "eps": args.adam_epsilon,
        "no_decay": True,
    }
    if args.max_steps > 0:
        # The run's length is known: bcd.BAdam's recipe for it (K for about three block-epochs, the expansion).
        settings.update(total_steps=args.max_steps)
    if _fsdp_version(args) == 2:
        # FSDP2 shards the weights after the optimizer is built here, and sharded weights are not expanded.
        settings.update(expansion=None)
    elif args.gradient_accumulation_steps > 1 and args.world_size == 1:
        # One process steps the expansion at every micro-batch (its gradients are not kept): N sign steps
        # at 1/N of the scale each make one step of the mean sign over the accumulated batch.
        settings.update(expansion_scale=EXPANSION_SCALE / args.gradient_accumulation_steps)
    settings.update(kwargs)
    optimizer = BAdam(model, **settings)
    try:
        check_fsdp(args, optimizer.switch_every)
    except ValueError:
        optimizer.close()  # a refused call leaves the model as it was
        raise
    return optimizer


class ShortRunWarning(UserWarning):
    """A run too short to visit every block once: some blocks are never trained."""


def warn_if_short(max_steps: int, optimizer: BlockCoordinateOptimizer) -> bool:
    """Warn (:class:`ShortRunWarning`) when ``max_steps`` is fewer than one block-epoch, K x D steps; returns whether it did."""
    blocks, switch_every = len(optimizer.blocks), optimizer.switch_every
    if max_steps is None or max_steps <= 0 or max_steps >= blocks * switch_every:
        return False
    untrained = blocks - -(-max_steps // switch_every)
    warnings.warn(
        f"bcd: {max_steps} steps are fewer than one block-epoch (K x D = {switch_every} x {blocks} = "
        f"{switch_every * blocks}): {untrained} of the {blocks} blocks will never be trained. Accepted: "
        f"switch_every <= {max(1, max_steps // blocks)} for this run, or more steps.",
        ShortRunWarning, stacklevel=2,
    )
    return True


def _unwrap(optimizer: Any) -> BlockCoordinateOptimizer | None:
    """bcd's optimizer inside accelerate's wrapper, or None."""
    while optimizer is not None and not isinstance(optimizer, BlockCoordinateOptimizer):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


class BlockCoordinateCallback(TrainerCallback):
    """Adds ``bcd/*`` entries to the Trainer's logs: active block, block-epoch, switches, memory.

    The first log also carries ``bcd/switch_every`` (K) and ``bcd/blocks`` (D).

    Register it with :func:`attach`, which puts it first among the Trainer's callbacks: a
    callback can only add to a log before the reporting callbacks (TensorBoard, ...) write it.

    Args:
        memory: also log memory by category (MB), measured at each log.
    """

    def __init__(self, memory: bool = True) -> None:
        self.memory = memory
        self._settings_logged = False

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        bcd_optimizer = _unwrap(optimizer)
        if bcd_optimizer is not None:
            check_fsdp(args, bcd_optimizer.switch_every, state.save_steps or None)  # resolved: a fraction is steps now
            warn_if_short(args.max_steps, bcd_optimizer)

    def on_log(self, args, state, control, logs=None, model=None, optimizer=None, **kwargs):
        bcd_optimizer = _unwrap(optimizer)
        # An evaluation's log is the dict evaluate() returns: its metrics stay the model's own.
        if bcd_optimizer is None or logs is None or any(key.startswith("eval_") for key in logs):
            return
        if not self._settings_logged:
            # The run's bcd hyperparameters, once (the Trainer logs its own arguments itself).
            logs["bcd/switch_every"] = bcd_optimizer.switch_every
            logs["bcd/blocks"] = len(bcd_optimizer.blocks)
            self._settings_logged = True
        logs["bcd/active_block"] = bcd_optimizer.active_block_index
        logs["bcd/block_epoch"] = bcd_optimizer.block_epoch
        logs["bcd/step_in_block"] = bcd_optimizer.step_in_block
        # The optimizer's own count, saved in its state dict: it goes on after resume_from_checkpoint.
        logs["bcd/switches"] = bcd_optimizer.switches
        if self.memory and model is not None:
            live = measure(model, bcd_optimizer)
            logs["bcd/memory_weights_MB"] = sum(live.parameters.values()) / MB
            logs["bcd/memory_solver_state_MB"] = live.solver_state / MB
            logs["bcd/memory_master_copies_MB"] = live.master_copies / MB
            if live.cuda_peak is not None:
                logs["bcd/memory_cuda_peak_MB"] = live.cuda_peak / MB


def attach(trainer: Trainer, memory: bool = True) -> BlockCoordinateCallback:
    """Put a :class:`BlockCoordinateCallback` first among ``trainer``'s callbacks and return it.

    Raises:
        ValueError: the Trainer runs FSDP1, or FSDP2 with saves inside a visit (:func:`check_fsdp`).
    """
    check_fsdp(trainer.args, getattr(_unwrap(trainer.optimizer), "switch_every", None))
    callback = BlockCoordinateCallback(memory=memory)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
