"""Weights that train: at lr 1e-5 the optimizer's updates land, checked against an fp64 AdamW written from the formula.

Setting (issue 12): 102,400 weights drawn from N(0, 0.02) (a transformer linear layer's scale), 20 AdamW steps at
lr 1e-5 with random N(0, 1) gradients. The reference is AdamW as Loshchilov & Hutter / the torch docs state it, in
fp64, started from the same stored weights and fed the same gradients:

    theta <- theta - lr * wd * theta;  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
    theta <- theta - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

Measures, with ``d = theta_ref - theta_0`` (the reference update) and ``e = theta - theta_ref``:
  * moved: fraction of weights whose stored value changed;
  * error: ``|e| / |d|`` (per weight, relative to the distance moved);
  * taken: ``<theta - theta_0, d> / <d, d>``, the share of the reference update the weights took (1 = all of it).

fp32 master weights (the default) move all weights and stay within 2% of the reference. bf16 weights cannot meet the
per-weight criterion in any form: the bf16 grid at 0.02 is 1.2e-4 wide, wider than 20 steps of 1e-5, so even the fp64
result rounded to the nearest bf16 value leaves half of the weights where they were. With stochastic rounding they
take the full update in expectation: ``taken`` is 1 within 3% (the rounding noise is zero-mean; its projection on
``d`` has a standard deviation of about |e| / |d| / sqrt(N), 0.5% here), and the per-weight error stays within the
noise bound derived below. Plain bf16 AdamW (round to nearest) takes about a tenth of the update: the bug.
"""

from __future__ import annotations

import math

import pytest
import torch
from optim_controller import Controller

from senseflow_algos.optim import Phase, PhasedAdamW

GEN = Phase('generator', ('generator',))
N, STEPS, LR, BETAS, EPS, WD = 102_400, 20, 1e-5, (0.9, 0.999), 1e-8, 0.01


def reference_adamw(theta0: torch.Tensor, grads: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """fp64 AdamW from the formula above; also returns each step's displacement."""
    theta = theta0.double().clone()
    m, v, steps = torch.zeros_like(theta), torch.zeros_like(theta), []
    b1, b2 = BETAS
    for t, g in enumerate(grads, start=1):
        g = g.double()
        before = theta.clone()
        theta = theta - LR * WD * theta
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        theta = theta - LR * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + EPS)
        steps.append(theta - before)
    return theta, steps


@pytest.fixture(scope='module')
def problem():
    rng = torch.Generator().manual_seed(0)
    theta0 = torch.randn(N, generator=rng) * 0.02
    grads = [torch.randn(N, generator=rng) for _ in range(STEPS)]
    return theta0, grads


def _train(param: torch.nn.Parameter, opt, grads, phased: bool) -> torch.Tensor:
    for g in grads:

        def closure(g=g):
            param.grad = g.to(param.dtype)
            return 0.0

        if phased:
            opt.step(closure)
        else:
            closure()
            opt.step()
    return param.detach()


def _measure(theta0, theta, grads):
    """``moved``, ``error``, ``taken`` (module docstring) and the reference's per-step displacements."""
    ref, steps = reference_adamw(theta0, [g.to(theta.dtype) for g in grads])  # the gradients the optimizer saw
    d, e = ref - theta0.double(), theta.double() - ref
    return {'moved': (theta != theta0).float().mean().item(), 'error': (e.norm() / d.norm()).item(),
            'taken': ((theta.double() - theta0.double()) @ d / (d @ d)).item()}, e, steps


def _phased(theta0, **kw):
    param = torch.nn.Parameter(theta0.clone())
    return param, PhasedAdamW([{'params': [param], 'role': 'generator'}], controller=Controller([GEN]), lr=LR,
                              betas=BETAS, eps=EPS, weight_decay=WD, **kw)


def test_fp32_master_weights_move_and_match_fp64_adamw(problem):
    theta0, grads = problem
    param, opt = _phased(theta0)
    theta = _train(param, opt, grads, phased=True)
    m, _, _ = _measure(theta0, theta, grads)
    assert m['moved'] >= 0.99
    assert m['error'] < 0.02
    assert abs(m['taken'] - 1) < 0.02


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of bf16 values around |x| (7 fraction bits): 2**(floor(log2|x|) - 7)."""
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(2.0**-126))) - 7)


def test_bf16_with_stochastic_rounding_takes_the_full_update_in_expectation(problem):
    theta0, grads = problem
    param, opt = _phased(theta0.to(torch.bfloat16), stochastic_rounding=True)
    start = param.detach().clone()
    theta = _train(param, opt, grads, phased=True)
    assert theta.dtype == torch.bfloat16
    state = opt.state[param]
    assert state['exp_avg'].dtype == state['exp_avg_sq'].dtype == torch.float32
    m, e, steps = _measure(start, theta, grads)
    assert abs(m['taken'] - 1) < 0.03
    # Noise bound: a rounding from x to its neighbours lo < x < hi errs by (hi - x) or (lo - x) with mean zero and
    # variance (x - lo)(hi - x) <= |step| * spacing, where |step| >= the distance to the old grid value; the errors of
    # successive steps are uncorrelated, so E[e_i^2] <= spacing_i * sum_t |step_t,i|. (Spacing taken at the larger of
    # start and end, as a weight may cross into the next binade.)
    spacing = torch.maximum(_bf16_ulp(start.double()), _bf16_ulp(start.double() + sum(steps)))
    bound = (spacing * sum(s.abs() for s in steps)).mean().item()
    assert (e**2).mean().item() < bound
    # How many weights move is bounded by the bf16 grid, not by the rounding (see the module docstring).
    assert m['moved'] > 0.5


def test_plain_bf16_adamw_loses_the_update(problem):
    """The bug: torch AdamW on bf16 weights (round to nearest) misses both criteria above."""
    theta0, grads = problem
    param = torch.nn.Parameter(theta0.to(torch.bfloat16))
    start = param.detach().clone()
    opt = torch.optim.AdamW([param], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    m, _, _ = _measure(start, _train(param, opt, grads, phased=False), grads)
    assert m['moved'] < 0.5
    assert m['taken'] < 0.5


def test_phased_adamw_refuses_bf16_weights_without_stochastic_rounding():
    param = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match='stochastic_rounding.*half-ulp'):
        PhasedAdamW([{'params': [param], 'role': 'generator'}], controller=Controller([GEN]), lr=LR)
    # A group added later (the discriminator heads) is checked too.
    opt = PhasedAdamW([{'params': [torch.nn.Parameter(torch.zeros(2))], 'role': 'generator'}],
                      controller=Controller([GEN]), lr=LR)
    with pytest.raises(ValueError, match='bfloat16'):
        opt.add_param_group({'params': [param], 'role': 'discriminator'})


def test_low_precision_update_matches_fp64_adamw_before_rounding():
    """One step with each option (weight decay, amsgrad, maximize): every weight lands on one of the two bf16
    neighbours of the fp64 AdamW result, i.e. within one spacing of it."""
    rng = torch.Generator().manual_seed(3)
    theta0 = (torch.randn(1000, generator=rng) * 0.5).to(torch.bfloat16)
    g = torch.randn(1000, generator=rng)
    for kw in ({}, {'amsgrad': True}, {'maximize': True}):
        param, opt = _phased(theta0, stochastic_rounding=True, **kw)
        opt.param_groups[0]['lr'] = 0.01
        got = _train(param, opt, [g], phased=True).double()
        sign = -1.0 if kw.get('maximize') else 1.0
        gd = g.to(torch.bfloat16).double()
        # t = 1: m_hat = g and v_hat = g^2, so the Adam step is lr * g / (|g| + eps).
        expected = theta0.double() * (1 - 0.01 * WD) - 0.01 * sign * gd / (gd.abs() + EPS)
        assert ((got - expected).abs() <= _bf16_ulp(expected) * 1.0001).all(), kw
        assert (got != theta0.double()).float().mean() > 0.9, kw


def test_resumed_optimizer_continues_bit_identically_with_fp32_moments():
    """10 steps in one go equal 5 steps, a state_dict round trip into a fresh optimizer, and 5 more."""
    rng = torch.Generator().manual_seed(4)
    theta0 = (torch.randn(5000, generator=rng) * 0.02).to(torch.bfloat16)
    grads = [torch.randn(5000, generator=rng) for _ in range(10)]
    param, opt = _phased(theta0, stochastic_rounding=True)
    straight = _train(param, opt, grads, phased=True).clone()
    param, opt = _phased(theta0, stochastic_rounding=True)
    _train(param, opt, grads[:5], phased=True)
    saved_weights, saved_state = param.detach().clone(), opt.state_dict()
    resumed, opt = _phased(saved_weights, stochastic_rounding=True)
    opt.load_state_dict(saved_state)
    state = opt.state[resumed]
    assert state['exp_avg'].dtype == torch.float32, 'torch casts loaded moments to the parameter dtype; undone'
    assert torch.equal(state['exp_avg'], saved_state['state'][0]['exp_avg'])
    assert torch.equal(_train(resumed, opt, grads[5:], phased=True), straight)
    other, opt = _phased(theta0, stochastic_rounding=True, rounding_seed=1)
    assert not torch.equal(_train(other, opt, grads, phased=True), straight)  # the seed matters


def test_adamw_8bit_refuses_low_precision_and_stochastic_rounding():
    pytest.importorskip('bitsandbytes')
    from senseflow_algos.optim_8bit import PhasedAdamW8bit

    param = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match='model.dtype: fp32'):
        PhasedAdamW8bit([{'params': [param], 'role': 'generator'}], controller=Controller([GEN]), lr=LR)
    with pytest.raises(ValueError, match='optimizer.kind=adamw only'):
        PhasedAdamW8bit([{'params': [torch.nn.Parameter(torch.zeros(4))], 'role': 'generator'}],
                        controller=Controller([GEN]), lr=LR, stochastic_rounding=True)


def test_ida_lerp_moves_bf16_weights_by_the_right_amount_in_expectation():
    """phi <- lam phi + (1 - lam) theta with (1 - lam) |theta - phi| far below half a bf16 spacing: round to nearest
    would leave phi unchanged; the stochastic lerp moves it by the fp64 amount on average over many weights."""
    from senseflow_algos.functional import align_fake_score

    lam, n = 0.97, 200_000
    phi = torch.full((n,), 0.02).to(torch.bfloat16)
    theta = phi.double() + 2**-13  # the next bf16 value up: the move is 0.03 * 1.22e-4 = 3.7e-6
    fake, gen_net = torch.nn.Linear(1, n, bias=False), torch.nn.Linear(1, n, bias=False)
    fake.weight.data = phi.view(n, 1).clone()
    gen_net.weight.data = theta.to(torch.bfloat16).view(n, 1)  # theta is a bf16 value too (exactly representable)
    assert torch.equal(gen_net.weight.data.double().view(-1), theta)
    assert torch.equal(torch.lerp(phi, gen_net.weight.data.view(-1), 1 - lam), phi)  # round to nearest: no move
    align_fake_score(fake, gen_net, lam, rounding=torch.Generator().manual_seed(0))
    moved = fake.weight.data.double().view(-1) - phi.double()
    expected = (1 - lam) * (theta - phi.double())  # 3.7e-6 per weight, vs a spacing of 1.22e-4
    # Each weight moves by 0 or one spacing s with P = expected / s: the mean's std is s sqrt(p (1 - p) / n).
    s = 2.0**-13
    p = expected[0].item() / s
    assert set(moved.unique().tolist()) <= {0.0, s}
    assert abs(moved.mean().item() - expected[0].item()) < 5 * s * math.sqrt(p * (1 - p) / n)
    assert fake.weight.dtype == torch.bfloat16
