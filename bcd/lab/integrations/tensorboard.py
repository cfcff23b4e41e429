"""Log live memory by category to TensorBoard, every optimizer step."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from bcd.lab.memory import measure

MB = 1e6


def log_memory(writer, model: nn.Module, optimizer: torch.optim.Optimizer | None, step: int) -> None:
    """Write ``memory/<category>_MB`` scalars (and the CUDA peak when there is one) at ``step``."""
    live = measure(model, optimizer)
    for dtype, held in live.parameters.items():
        writer.add_scalar(f"memory/weights_{dtype}_MB", held / MB, step)
    writer.add_scalar("memory/gradients_MB", live.gradients / MB, step)
    writer.add_scalar("memory/solver_state_MB", live.solver_state / MB, step)
    writer.add_scalar("memory/master_copies_MB", live.master_copies / MB, step)
    if live.cuda_peak is not None:
        writer.add_scalar("memory/cuda_peak_MB", live.cuda_peak / MB, step)


def attach_memory_logger(writer, model: nn.Module, optimizer: torch.optim.Optimizer) -> RemovableHandle:
    """Log memory before every ``optimizer.step()``, when the gradients of the step are held.

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (anything with ``add_scalar``).
        model: the model trained.
        optimizer: its optimizer, bcd's or any torch one.

    Returns:
        A handle; ``handle.remove()`` stops the logging.
    """
    calls = {"step": 0}

    def hook(opt, args, kwargs) -> None:
        step = getattr(opt, "global_step", calls["step"])
        log_memory(writer, model, opt, step)
        calls["step"] += 1

    return optimizer.register_step_pre_hook(hook)
