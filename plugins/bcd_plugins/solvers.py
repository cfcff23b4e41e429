"""Built-in inner solvers: ``adam``, ``adamw`` and ``sgd``, the ``torch.optim`` classes themselves.

A ``torch.optim`` optimizer class is already the factory bcd needs, ``factory(params,
**hyperparameters)``: every hyperparameter (``foreach``, ``fused``, ``nesterov``, ...) passes
straight through, and torch validates them. bcd adds no defaults of its own, so weight decay is
exactly what the user set (torch's AdamW default of 0.01 applies only if none is given).
"""

from __future__ import annotations

import torch

from bcd.hookspecs import hookimpl


@hookimpl
def register_solvers(register) -> None:
    register("adam", torch.optim.Adam)
    register("adamw", torch.optim.AdamW)
    register("sgd", torch.optim.SGD)
