r"""Stochastic rounding: an update below half a bf16 (or fp16) spacing that survives in expectation.

Rounding to nearest drops every change smaller than half the spacing :math:`u` between two
neighbouring low-precision numbers around a weight, so a small step on a bf16 weight (a sign step
of ``1e-5`` on a weight near 1, whose bf16 spacing is ``2^{-7}``) is lost every time. Stochastic
rounding keeps it on average: a value :math:`x` between neighbours :math:`a \le x < b` becomes

.. math::

    \operatorname{SR}(x) = \begin{cases} b & \text{with probability } (x - a) / (b - a), \\
                                          a & \text{otherwise,} \end{cases}
    \qquad \mathbb{E}[\operatorname{SR}(x)] = x,

which needs no state. The draws come from a generator seeded by :func:`generator`, from a seed,
the optimizer step and the tensor's index, so a resumed run draws exactly what the uninterrupted
one drew, with nothing to save.
"""

from __future__ import annotations

import torch

#: Distinct seeds per (seed, step, tensor, draw): large odd multipliers keep the tuples apart.
_MIX = (1_000_003, 998_244_353, 7_919)
#: Elements rounded at a time on a CPU: a 4 MB fp32 piece whose temporaries stay in cache, about
#: 0.7x the time of a 64 MB one; the draws are the same (one generator, drawn piece after piece).
CPU_CHUNK = 2**20
_BF16_MAX = torch.finfo(torch.bfloat16).max


def generator(seed: int, step: int, index: int, draw: int = 0, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of one rounding: a function of the seed, the optimizer step, the tensor's index and the draw.

    Args:
        seed: the run's seed.
        step: the optimizer step the rounding belongs to.
        index: the tensor's fixed position (e.g. among the optimizer's candidates).
        draw: which rounding of that tensor within the step (accumulation micro-batches), 0 first.
        device: where the draws are made (the tensor's device).
    """
    value = ((seed * _MIX[0] + step) * _MIX[1] + index) * _MIX[2] + draw
    return torch.Generator(device=device).manual_seed(value % (2**63 - 1))


def stochastic_round(value: torch.Tensor, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """``value`` rounded to ``dtype``, up or down with the probabilities that make the result unbiased.

    Works for any target floating dtype with neighbours found by ``torch.nextafter`` (bf16, fp16,
    their subnormals included). A value already representable, or not finite, is rounded to
    nearest (exactly itself); a neighbour past the largest finite number is never drawn.

    Args:
        value: the exact values, in a wider dtype (fp32).
        dtype: the target dtype.
        generator: the source of the uniform draws (one per element), on ``value``'s device.

    Returns:
        A new tensor of ``dtype`` and ``value``'s shape.
    """
    if value.dtype == torch.float32 and dtype == torch.bfloat16:
        return _fp32_to_bf16(value, generator)
    nearest = value.to(dtype)
    back = nearest.to(value.dtype)
    # The other neighbour of value: one spacing from nearest, on value's side of it.
    toward = torch.where(value > back, float("inf"), float("-inf")).to(dtype)
    other = torch.nextafter(nearest, toward)
    gap = other.to(value.dtype) - back
    share = torch.where(torch.isfinite(gap) & (gap != 0), (value - back) / gap, torch.zeros_like(value))
    draws = torch.rand(value.shape, generator=generator, device=value.device, dtype=value.dtype)
    return torch.where(draws < share.nan_to_num(0.0), other, nearest)


def _fp32_to_bf16(value: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """fp32 to bf16 by its bits: bf16 is fp32's upper 16 bits, so adding a uniform 16-bit integer to
    the magnitude's lower 16 and cutting them rounds up with probability (x - a) / (b - a), in a few
    passes instead of the general path's dozen (same law; binade edges and subnormals included)."""
    noise = torch.randint(0, 1 << 16, value.shape, generator=generator, dtype=torch.int32, device=value.device)
    bits = value.contiguous().view(torch.int32)
    drawn = noise.add_(bits).bitwise_and_(-(1 << 16)).view(torch.float32).to(torch.bfloat16)  # exact: low bits zero
    # On a CPU the passes are the cost, so the fix-up below runs only when a value needs it (one
    # reduction: every value finite and at most bf16's largest, so no draw can round past it); on an
    # accelerator the passes are cheap and a data-dependent branch would wait for the device.
    if value.device.type == "cpu" and value.numel():
        low, high = torch.aminmax(value)  # nan propagates into both
        if bool(torch.isfinite(low) & torch.isfinite(high)) and max(-float(low), float(high)) <= _BF16_MAX:
            return drawn
    # Past the largest finite bf16 a draw would overflow: keep the finite neighbour. inf and nan stay
    # themselves (a nan's bits plus a draw can wrap past the sign bit to a finite zero).
    truncated = bits.bitwise_and(-(1 << 16)).view(torch.float32).to(torch.bfloat16)
    finite = torch.where(torch.isfinite(drawn), drawn, truncated)
    return torch.where(torch.isfinite(value), finite, value.to(torch.bfloat16))


def round_into_(target: torch.Tensor, value: torch.Tensor, generator: torch.Generator) -> None:
    """``target.copy_(stochastic_round(value, target.dtype, generator))``, :data:`CPU_CHUNK` elements at
    a time on a CPU (the same draws as at once: one generator, drawn piece after piece)."""
    with torch.no_grad():
        if value.device.type != "cpu" or not (target.is_contiguous() and value.is_contiguous()):
            target.copy_(stochastic_round(value, target.dtype, generator))
            return
        flat, exact = target.view(-1), value.view(-1)
        for start in range(0, exact.numel(), CPU_CHUNK):
            flat[start:start + CPU_CHUNK].copy_(stochastic_round(exact[start:start + CPU_CHUNK], target.dtype, generator))


def add_rounded_(param: torch.Tensor, update: torch.Tensor, alpha: float, generator: torch.Generator) -> None:
    """``param += alpha * update`` in place; for a bf16/fp16 ``param`` computed in fp32 and stochastically rounded back.

    A wider ``param`` (fp32, fp64) is updated as ``torch.add_`` does: its rounding is already far
    below any step worth taking.
    """
    with torch.no_grad():
        if param.dtype not in (torch.bfloat16, torch.float16):
            param.add_(update, alpha=alpha)
            return
        exact = param.float().add_(update, alpha=alpha)  # fp32 arithmetic: update is promoted, not copied
        param.copy_(stochastic_round(exact, param.dtype, generator))
