"""Activation (gradient) checkpointing that keeps the backward savings of block-coordinate training.

transformers' ``gradient_checkpointing_enable()`` / ``activation_checkpointing_enable()`` also
calls ``enable_input_require_grads()`` on models fed ``input_ids``: a forward hook makes the
embedding output require grad, so backward runs through every frozen layer down to the input and
the saving of training one block is silently lost. Non-reentrant checkpointing (the default
there) does not need that hook, so bcd removes it. Reentrant checkpointing cannot work with a
frozen input — the lowest active layer would get no gradient (the reference's "element 0 of
tensors does not require grad") — so it is refused with an error that says how to fix it.
"""

from __future__ import annotations

import logging

from torch import nn
from torch.utils.hooks import RemovableHandle

logger = logging.getLogger("bcd")


def _relevant(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules that can carry checkpointing flags or transformers' input-require-grads hooks."""
    return [
        (name, module) for name, module in model.named_modules()
        if hasattr(module, "gradient_checkpointing") or hasattr(module, "disable_input_require_grads")
    ]


def check(model: nn.Module, modules: list[tuple[str, nn.Module]] | None = None) -> None:
    """Refuse reentrant checkpointing, changing nothing.

    Raises:
        ValueError: checkpointing is enabled with ``use_reentrant=True``.
    """
    for name, module in _relevant(model) if modules is None else modules:
        func = getattr(module, "_gradient_checkpointing_func", None)
        if getattr(module, "gradient_checkpointing", False) and getattr(func, "keywords", {}).get("use_reentrant"):
            raise ValueError(
                f"Reentrant activation checkpointing is enabled (on {name or type(module).__name__}): with frozen "
                "blocks below the active one its input does not require grad and the active layer would get no "
                "gradient. Accepted: non-reentrant checkpointing, e.g. bcd.checkpointing.enable(model), or "
                "model.activation_checkpointing_enable(activation_checkpointing_kwargs={'use_reentrant': False})."
            )


def make_compatible(model: nn.Module, modules: list[tuple[str, nn.Module]] | None = None, quiet: bool = False) -> bool:
    """Remove transformers' input-require-grads hooks; refuse reentrant checkpointing.

    Args:
        model: the model.
        modules: the result of a previous ``_relevant(model)``, to skip walking the model again.
        quiet: no warning (bcd's own :func:`enable` removes the hook it knows transformers adds).

    Returns:
        True if hooks were removed.

    Raises:
        ValueError: checkpointing is enabled with ``use_reentrant=True``.
    """
    modules = _relevant(model) if modules is None else modules
    check(model, modules)
    removed = False
    for name, module in modules:
        if getattr(module, "_require_grads_hooks", None) and hasattr(module, "disable_input_require_grads"):
            module.disable_input_require_grads()
            removed = True
    if removed and not quiet:
        logger.warning(
            "bcd: removed the input-require-grads hook that transformers installs with gradient checkpointing; "
            "non-reentrant checkpointing does not need it, and it would run backward through every frozen layer."
        )
    return removed


def enable(model: nn.Module) -> None:
    """Turn on non-reentrant activation checkpointing for a transformers model, savings kept."""
    enable_fn = getattr(model, "activation_checkpointing_enable", None) or getattr(model, "gradient_checkpointing_enable", None)
    if enable_fn is None:
        raise ValueError(f"Invalid model for checkpointing: {type(model).__name__} is not a transformers model.")
    if enable_fn.__name__ == "activation_checkpointing_enable":
        enable_fn(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        enable_fn(gradient_checkpointing_kwargs={"use_reentrant": False})
    make_compatible(model, quiet=True)


def guard(model: nn.Module) -> RemovableHandle:
    """Check before every forward that checkpointing, if enabled since, keeps the savings.

    Checkpointing is often switched on after the optimizer is built (the Trainer does so), so a
    construction-time check is not enough. The modules to look at are found once, here; each
    forward then costs a few attribute reads on them.
    """
    modules = _relevant(model)

    def pre_forward(module: nn.Module, args) -> None:
        make_compatible(module, modules)

    return model.register_forward_pre_hook(pre_forward)
