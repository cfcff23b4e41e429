r"""What the optimizer observed at the block visits, for orderings that adapt to it.

An ordering whose class sets ``observes = True`` is called as ``order(num_blocks, epoch,
observed)``, with ``observed`` an :class:`Observations`: for every block :math:`b` the mean
gradient norm over the steps of its latest visit,

.. math::

    \bar g_b = \frac{1}{K} \sum_{k=0}^{K-1} \lVert \nabla_b f(\theta^{k}) \rVert_2,

and how often it was visited. The optimizer measures the active block's gradient norm at each
step only when its ordering observes (one reduction over the block's gradients and one host
sync per step); otherwise nothing is measured. The values live in the block schedule and its
state dict, so a resumed run orders every later block-epoch exactly as the uninterrupted one:
an observing ordering is still a pure function, of its options, its arguments and ``observed``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import torch

from bcd.checks import is_int, is_number
from bcd.distributed import sharded

OBSERVED_KEYS = ("grad_norm", "visits", "running", "running_steps")


def observes(ordering: object) -> bool:
    """Whether ``ordering`` asks for the observations (its ``observes`` attribute is True)."""
    return getattr(ordering, "observes", False) is True


def gradient_norm(params: Iterable[torch.Tensor]) -> float | None:
    """The 2-norm of the gradients of ``params`` together (None when none has a gradient).

    Each tensor's norm is taken in its own dtype (no fp32 copy of a large gradient), but fp16's in
    fp32: fp16 overflows at 65504, so a block of finite fp16 gradients can have an infinite fp16
    norm. A sharded (DTensor) gradient's norm is reduced over the ranks, so every rank sees the
    same value.
    """
    norms = []
    for param in params:
        if param.grad is None:
            continue
        norm = torch.linalg.vector_norm(param.grad, dtype=torch.float32 if param.grad.dtype == torch.float16 else None)
        if sharded(norm):
            norm = norm.full_tensor()
        norms.append(norm.float())
    if not norms:
        return None
    # One host sync for the block, not one per tensor.
    return float(torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms])))


def observed_norm(ordering: object, params: Iterable[torch.Tensor], block: str) -> float | None:
    """The gradient norm of ``params`` for an ordering that observes (None for one that does not:
    measuring costs a reduction and a host sync per step).

    Raises:
        ValueError: the norm is not finite, naming ``block``: nothing may be updated from it.
    """
    norm = gradient_norm(params) if observes(ordering) else None
    if norm is not None and not math.isfinite(norm):
        raise ValueError(
            f"The gradient of block {block!r} has a non-finite norm ({norm}); nothing was updated. Accepted: finite "
            "gradients (with fp16, a GradScaler skips such steps; or lower the rate)."
        )
    return norm


def _fail(message: str) -> None:
    raise ValueError(f"Invalid state dict: schedule.observed.{message}")


@attrs.frozen(kw_only=True)
class Observations:
    """Per-block gradient norms at the latest visits, and the running sum of the current visit.

    Attributes:
        grad_norm: per block, :math:`\bar g_b` of its latest visit, or None before its first.
        visits: per block, the visits observed so far.
        running: the sum of the current visit's gradient norms so far.
        running_steps: the steps of the current visit that were observed.
    """

    grad_norm: tuple[float | None, ...] = attrs.field(converter=tuple)
    visits: tuple[int, ...] = attrs.field(converter=tuple)
    running: float = 0.0
    running_steps: int = 0

    @classmethod
    def empty(cls, num_blocks: int) -> Observations:
        """Nothing observed yet, for ``num_blocks`` blocks."""
        return cls(grad_norm=(None,) * num_blocks, visits=(0,) * num_blocks)

    def add(self, grad_norm: float) -> Observations:
        """One more step of the current visit, with the active block's gradient norm."""
        return attrs.evolve(self, running=self.running + grad_norm, running_steps=self.running_steps + 1)

    def close(self, block: int) -> Observations:
        """The current visit of ``block`` has ended: its mean becomes the block's :math:`\bar g_b`."""
        if not self.running_steps:
            return self
        grad_norm, visits = list(self.grad_norm), list(self.visits)
        grad_norm[block] = self.running / self.running_steps
        visits[block] += 1
        return Observations(grad_norm=grad_norm, visits=visits)

    def state_dict(self) -> dict[str, Any]:
        """Plain data (Python floats round-trip exactly, so a resumed order is the same)."""
        return {"grad_norm": list(self.grad_norm), "visits": list(self.visits), "running": self.running,
                "running_steps": self.running_steps}

    @classmethod
    def load(cls, state: Any, num_blocks: int, switch_every: int) -> Observations:
        """Observations from :meth:`state_dict`, checked for ``num_blocks`` blocks and K = ``switch_every``.

        Raises:
            ValueError: naming the key, the value received and what is accepted.
        """
        if not isinstance(state, Mapping) or any(k not in state for k in OBSERVED_KEYS):
            raise ValueError(f"Invalid state dict: schedule.observed is {state!r:.80}; accepted: a dict with {list(OBSERVED_KEYS)}.")
        grad_norm, visits = state["grad_norm"], state["visits"]

        def finite(value: Any) -> bool:
            return is_number(value) and value >= 0

        if not isinstance(grad_norm, (list, tuple)) or len(grad_norm) != num_blocks or not all(
                v is None or finite(v) for v in grad_norm):
            _fail(f"grad_norm is {grad_norm!r:.80}; accepted: {num_blocks} values, each None or a finite number >= 0.")
        if not isinstance(visits, (list, tuple)) or len(visits) != num_blocks or not all(
                is_int(v, 0) for v in visits):
            _fail(f"visits is {visits!r:.80}; accepted: {num_blocks} integers >= 0.")
        if any((g is None) != (v == 0) for g, v in zip(grad_norm, visits)):
            _fail(f"grad_norm {grad_norm!r:.80} and visits {visits!r:.80} disagree; accepted: None exactly where visits is 0.")
        if not finite(state["running"]):
            _fail(f"running is {state['running']!r}; accepted: a finite number >= 0.")
        steps = state["running_steps"]
        if not is_int(steps, 0, switch_every - 1):
            _fail(f"running_steps is {steps!r}; accepted: 0 ... {switch_every - 1} (switch_every={switch_every}).")
        return cls(grad_norm=[None if g is None else float(g) for g in grad_norm], visits=visits,
                   running=float(state["running"]), running_steps=steps)
