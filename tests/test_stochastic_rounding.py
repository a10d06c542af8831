"""Stochastic rounding to bf16/fp16: only the two neighbours, unbiased, exact values kept, deterministic per generator.

Neighbours and spacings are written down by hand from the formats: bf16 keeps 7 fraction bits (spacing 2**-7 in
[1, 2), 2**-13 in [2**-6, 2**-5)), fp16 keeps 10 (spacing 2**-10 in [1, 2), subnormal spacing 2**-24). For a value
at fraction ``p`` of the way from ``lo`` to ``hi``, one rounding is ``hi`` with probability ``p``: the mean of ``K``
roundings has standard deviation ``(hi - lo) * sqrt(p (1 - p) / K)`` and the count of ``hi`` is Binomial(K, p).
"""

from __future__ import annotations

import math

import pytest
import torch

from senseflow_algos.stochastic_rounding import copy_stochastic_, stochastic_round

K = 200_000

# (dtype, lo, hi, p): x = lo + p * (hi - lo), lo and hi adjacent in dtype.
CASES = [
    (torch.bfloat16, 1.0, 1.0 + 2**-7, 0.3),
    (torch.bfloat16, -1.0, -1.0 - 2**-7, 0.7),  # negative: moves away from zero with probability p
    (torch.bfloat16, 2.0 - 2**-7, 2.0, 0.75),  # the upper neighbour starts a new binade
    (torch.bfloat16, 0.015625 + 29 * 2**-13, 0.015625 + 30 * 2**-13, 0.082),  # a weight of ~0.02, an lr-1e-5-sized step
    (torch.float16, 1.0, 1.0 + 2**-10, 0.4),
    (torch.float16, -(2.0 - 2**-10), -2.0, 0.6),
    (torch.float16, 3 * 2**-24, 4 * 2**-24, 0.5),  # subnormal
    (torch.float16, 0.0, -(2**-24), 0.25),  # crossing to the smallest negative subnormal
]


@pytest.mark.parametrize('dtype,lo,hi,p', CASES)
def test_rounds_to_a_neighbour_with_probability_of_its_distance(dtype, lo, hi, p):
    assert float(torch.tensor(lo, dtype=dtype)) == lo and float(torch.tensor(hi, dtype=dtype)) == hi
    x = lo + p * (hi - lo)
    xs = torch.full((K,), x, dtype=torch.float64).float()
    x32 = float(xs[0])  # what the rounding sees
    p32 = (x32 - lo) / (hi - lo)
    out = stochastic_round(xs, dtype, torch.Generator().manual_seed(0))
    assert out.dtype == dtype
    values = set(out.double().unique().tolist())
    assert values <= {lo, hi}, values
    n_hi = int((out.double() == hi).sum())
    assert abs(n_hi - K * p32) < 5 * math.sqrt(K * p32 * (1 - p32))  # Binomial(K, p): 5 sigma
    mean = out.double().mean().item()
    assert abs(mean - x32) < 5 * abs(hi - lo) * math.sqrt(p32 * (1 - p32) / K)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_representable_and_non_finite_values_pass_unchanged(dtype):
    exact = torch.tensor([0.0, -0.0, 1.0, -0.5, 0.015625, 3.0, float('inf'), float('-inf')])
    out = stochastic_round(exact.repeat(1000), dtype, torch.Generator().manual_seed(1))
    assert torch.equal(out.float(), exact.repeat(1000))
    assert torch.isnan(stochastic_round(torch.full((100,), float('nan')), dtype)).all()


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_deterministic_given_the_generator(dtype):
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(2)) * 0.02
    a = stochastic_round(x, dtype, torch.Generator().manual_seed(5))
    b = stochastic_round(x, dtype, torch.Generator().manual_seed(5))
    c = stochastic_round(x, dtype, torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_copy_stochastic_writes_in_place():
    dst = torch.zeros(4, 3, dtype=torch.bfloat16)
    view = dst[1:3]
    src = torch.full((2, 3), 1.0 + 0.5 * 2**-7)
    copy_stochastic_(view, src, torch.Generator().manual_seed(0))
    assert set(dst[1:3].float().unique().tolist()) <= {1.0, 1.0 + 2**-7}
    assert torch.equal(dst[0], torch.zeros(3, dtype=torch.bfloat16)) and torch.equal(dst[3], dst[0])
    with pytest.raises(ValueError, match='bfloat16 or float16'):
        stochastic_round(src, torch.float32)
