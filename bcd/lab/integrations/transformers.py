"""bcd with the transformers Trainer.

The optimizer needs no adapter: ``Trainer(..., optimizers=(bcd.BAdam(model, ...), None))`` works
with the Trainer's LR scheduler, gradient accumulation, ``max_grad_norm`` clipping, bf16,
periodic checkpoints and ``resume_from_checkpoint`` (bcd's state dict carries the whole block
schedule), and on several processes with the DDP wrapper the Trainer adds (see
:mod:`bcd.distributed`). The Trainer's FSDP mode is refused: it checkpoints optimizers through
``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict``, which assumes one state
entry per parameter. This module adds the two conveniences:

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

from bcd.badam import BAdam
from bcd.lab.memory import measure
from bcd.optimizer import BlockCoordinateOptimizer

MB = 1e6


def _refuse_fsdp(fsdp: bool) -> None:
    if fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise ValueError(
            "Unsupported: bcd with the Trainer's FSDP mode (TrainingArguments(fsdp=...) or an accelerate FSDP config): "
            "the Trainer saves FSDP optimizer checkpoints with torch.distributed.checkpoint's get_optimizer_state_dict, "
            "which assumes one optimizer state entry per parameter and would take a step to create it. Accepted: the "
            "Trainer without fsdp (DDP on several processes), or FSDP2 in your own loop with "
            "bcd.distributed.full_state_dict for checkpoints (docs/distributed.md)."
        )


def badam_from_training_args(model: nn.Module, args: TrainingArguments, **kwargs: Any) -> BAdam:
    """``bcd.BAdam`` with the Trainer's optimizer settings.

    ``learning_rate``, ``weight_decay`` (biases and norm weights exempt, as the Trainer does),
    ``adam_beta1``/``adam_beta2`` and ``adam_epsilon`` come from ``args``; ``kwargs`` go to
    :class:`bcd.BAdam` (``switch_every``, ``order``, ``seed``, ...) and win over ``args``. Without
    a ``switch_every``, a run with ``max_steps`` gets ``switch_every="auto"`` over those steps
    (about three block-epochs); a run by epochs keeps BAdam's default K.

    Raises:
        ValueError: ``args`` asks for FSDP (see the module docstring).
    """
    _refuse_fsdp(bool(args.fsdp))
    settings: dict[str, Any] = {
        "lr": args.learning_rate,
        "weight_decay": args.weight_decay,
        "betas": (args.adam_beta1, args.adam_beta2),
        "eps": args.adam_epsilon,
        "no_decay": True,
    }
    if "switch_every" not in kwargs and args.max_steps > 0:
        # The run's length is known: K for about three block-epochs over it (bcd.BAdam's "auto").
        settings.update(switch_every="auto", total_steps=args.max_steps)
    settings.update(kwargs)
    return BAdam(model, **settings)


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
        ValueError: the Trainer runs in FSDP mode (see the module docstring).
    """
    _refuse_fsdp(bool(getattr(trainer, "is_fsdp_enabled", False)))
    callback = BlockCoordinateCallback(memory=memory)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
