"""Stochastic rounding: unbiased, exact where it can be, reproducible from its seed."""

from __future__ import annotations

import pytest
import torch

from bcd import rounding


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("share", [0.1, 0.5, 0.93])
def test_the_mean_over_many_draws_is_the_value(dtype, share):
    """A value ``share`` of a spacing above a representable a: b with probability share, a otherwise."""
    a = torch.tensor(1.0, dtype=dtype)
    b = torch.nextafter(a, torch.tensor(float("inf"), dtype=dtype))
    gap = (b.float() - a.float()).item()
    n = 200_000
    value = torch.full((n,), a.float().item() + share * gap)
    drawn = rounding.stochastic_round(value, dtype, rounding.generator(0, 0, 0))
    assert set(drawn.unique().tolist()) <= {a.item(), b.item()}
    # The mean of n Bernoulli(share) draws scaled by gap: standard error gap * sqrt(share (1 - share) / n).
    tolerance = 5 * gap * (share * (1 - share) / n) ** 0.5
    assert abs(drawn.float().mean().item() - value[0].item()) < tolerance
    negative = rounding.stochastic_round(-value, dtype, rounding.generator(0, 0, 1))
    assert abs(negative.float().mean().item() + value[0].item()) < tolerance


def test_representable_and_non_finite_values_round_to_themselves():
    value = torch.tensor([1.0, -2.5, 0.0, float("inf"), float("-inf"), 3.0e38])
    drawn = rounding.stochastic_round(value, torch.bfloat16, rounding.generator(0, 0, 0))
    assert torch.equal(drawn[:5], value[:5].to(torch.bfloat16))
    assert torch.isfinite(drawn[5])  # next to bf16's largest finite number: never rounded past it
    assert torch.isnan(rounding.stochastic_round(torch.tensor([float("nan")]), torch.bfloat16,
                                                 rounding.generator(0, 0, 0))).all()
    # A nan whose payload is all ones: its bits plus a draw would wrap past the sign to a finite zero.
    payloads = torch.tensor([0x7FFFFFFF, -1] * 500, dtype=torch.int32).view(torch.float32)
    assert torch.isnan(rounding.stochastic_round(payloads, torch.bfloat16, rounding.generator(0, 0, 0))).all()


def test_draws_are_a_function_of_seed_step_tensor_and_draw():
    value = torch.rand(1000) * 1e-2 + 1
    first = rounding.stochastic_round(value, torch.bfloat16, rounding.generator(1, 5, 2, 0))
    assert torch.equal(first, rounding.stochastic_round(value, torch.bfloat16, rounding.generator(1, 5, 2, 0)))
    for other in [(2, 5, 2, 0), (1, 6, 2, 0), (1, 5, 3, 0), (1, 5, 2, 1)]:
        assert not torch.equal(first, rounding.stochastic_round(value, torch.bfloat16, rounding.generator(*other)))


def test_add_rounded_leaves_wide_dtypes_to_torch():
    param = torch.ones(4, dtype=torch.float64)
    rounding.add_rounded_(param, torch.full((4,), 1e-12, dtype=torch.float64), -2.0, rounding.generator(0, 0, 0))
    assert torch.equal(param, torch.full((4,), 1 - 2e-12, dtype=torch.float64))


@pytest.mark.parametrize("base", [2.0 ** -133, 1.0 - 2.0 ** -8, 3.3e38])  # a bf16 subnormal, a binade edge, near the top
def test_bf16_by_its_bits_is_unbiased_at_subnormals_binade_edges_and_stays_finite_at_the_top(base):
    a = torch.tensor(base, dtype=torch.bfloat16)
    b = torch.nextafter(a, torch.tensor(float("inf"), dtype=torch.bfloat16))
    gap = b.float().item() - a.float().item()
    n = 200_000
    value = torch.full((n,), a.float().item() + 0.3 * gap)
    drawn = rounding.stochastic_round(value, torch.bfloat16, rounding.generator(0, 0, 0))
    assert set(drawn.unique().tolist()) <= {a.item(), b.item()}
    tolerance = 5 * gap * (0.3 * 0.7 / n) ** 0.5  # five standard errors of the mean of n draws
    assert abs(drawn.double().mean().item() - value.double()[0].item()) < tolerance
    largest = torch.finfo(torch.bfloat16).max
    above = torch.full((1000,), largest * (1 + 2.0 ** -10))  # between bf16's largest and fp32's
    assert torch.isfinite(rounding.stochastic_round(above, torch.bfloat16, rounding.generator(0, 0, 0))).all()
