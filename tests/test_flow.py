"""Flow-matching math (``senseflow_algos.flow``) and the families' schedules, against hand-computed values."""

import math

import pytest
import torch

from senseflow_algos import flow
from senseflow_algos.algorithms.isg import mid_sigma
from senseflow_algos.models.families import FluxFamily, SD35Family

FAMILIES = {'flux': FluxFamily, 'sd35': SD35Family}


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------------------
# Anchors


def test_sd3_anchors_are_shift3_of_uniform():
    anchors = SD35Family().anchors((128, 128))
    assert anchors.dtype == torch.float64
    torch.testing.assert_close(anchors, torch.tensor([1.0, 0.9, 0.75, 0.5], dtype=torch.float64), atol=1e-12, rtol=0)
    # shift3(s) = 3s / (1 + 2s), by hand
    by_hand = torch.tensor([3 * s / (1 + 2 * s) for s in (1.0, 0.75, 0.5, 0.25)], dtype=torch.float64)
    torch.testing.assert_close(anchors, by_hand, atol=1e-12, rtol=0)
    # ... and the reference's index list [999, 749, 499, 249] through SD3's index -> sigma map.
    torch.testing.assert_close(anchors, flow.sd3_index_to_sigma(torch.tensor([999, 749, 499, 249])), atol=1e-12,
                               rtol=0)
    # SD3's anchors do not depend on resolution.
    torch.testing.assert_close(SD35Family().anchors((16, 16)), anchors, atol=0, rtol=0)


def test_flux_mu():
    assert flow.flux_mu(4096) == pytest.approx(1.15, abs=1e-12)
    assert flow.flux_mu(256) == pytest.approx(0.5, abs=1e-12)
    assert flow.flux_mu((256 + 4096) // 2) == pytest.approx((0.5 + 1.15) / 2, abs=1e-12)


def test_flux_anchors_at_1024():
    # 1024x1024 image -> 128x128 latent -> 64x64 = 4096 packed tokens -> mu = 1.15.
    anchors = FluxFamily().anchors((128, 128))
    assert anchors.dtype == torch.float64
    torch.testing.assert_close(anchors, torch.tensor([1.0, 0.9045, 0.7595, 0.5128], dtype=torch.float64), atol=1e-4,
                               rtol=0)
    e = math.exp(1.15)
    by_hand = torch.tensor([e / (e + 1 / s - 1) for s in (1.0, 0.75, 0.5, 0.25)], dtype=torch.float64)
    torch.testing.assert_close(anchors, by_hand, atol=1e-12, rtol=0)
    # Resolution matters for FLUX: fewer tokens -> smaller shift.
    small = FluxFamily().anchors((32, 32))
    assert small[0] == 1.0 and (small[1:] < anchors[1:]).all()


def test_flux_time_shift_endpoints():
    assert float(flow.flux_time_shift(0.0, 1.15)) == 0.0
    assert float(flow.flux_time_shift(1.0, 1.15)) == pytest.approx(1.0, abs=1e-12)


def test_append_zero():
    sig = flow.append_zero([1.0, 0.5])
    assert sig.tolist() == [1.0, 0.5, 0.0] and sig.dtype == torch.float64


# ---------------------------------------------------------------------------------------------------------------------
# Forward process and steps


def test_x0_velocity_round_trip_scalar_sigma():
    x0, eps = _randn(2, 4, 6, 6, seed=1), _randn(2, 4, 6, 6, seed=2)
    s = 0.37
    x_t = flow.add_noise(x0, eps, s)
    torch.testing.assert_close(x_t, (1 - s) * x0 + s * eps, atol=1e-12, rtol=0)
    v = eps - x0
    torch.testing.assert_close(flow.x0_from_velocity(x_t, v, s), x0, atol=1e-12, rtol=0)
    torch.testing.assert_close(flow.velocity_from_x0(x_t, x0, s), v, atol=1e-10, rtol=0)


def test_per_sample_sigma_broadcasting():
    x0, eps = _randn(3, 2, 4, 4, seed=3), _randn(3, 2, 4, 4, seed=4)
    sigma = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    x_t = flow.add_noise(x0, eps, sigma)
    v = eps - x0
    for i, s in enumerate(sigma.tolist()):
        torch.testing.assert_close(x_t[i], (1 - s) * x0[i] + s * eps[i], atol=1e-12, rtol=0)
    torch.testing.assert_close(flow.x0_from_velocity(x_t, v, sigma), x0, atol=1e-12, rtol=0)
    torch.testing.assert_close(flow.velocity_from_x0(x_t, x0, sigma), v, atol=1e-10, rtol=0)
    # A per-sample sigma is not the same as broadcasting along another axis.
    assert not torch.allclose(x_t, flow.add_noise(x0, eps, sigma.mean()))


def test_euler_step_formula():
    x, v = _randn(2, 3, 4, 4, seed=5), _randn(2, 3, 4, 4, seed=6)
    torch.testing.assert_close(flow.euler_step(x, v, 0.8, 0.3), x + (0.3 - 0.8) * v, atol=1e-12, rtol=0)
    s_from = torch.tensor([0.9, 0.6], dtype=torch.float64)
    s_to = torch.tensor([0.5, 0.0], dtype=torch.float64)
    out = flow.euler_step(x, v, s_from, s_to)
    for i in range(2):
        torch.testing.assert_close(out[i], x[i] + (s_to[i] - s_from[i]) * v[i], atol=1e-12, rtol=0)


def test_euler_to_zero_with_true_velocity_lands_on_x0():
    x0, eps = _randn(2, 3, 4, 4, seed=7), _randn(2, 3, 4, 4, seed=8)
    sigma = torch.tensor([0.75, 0.3], dtype=torch.float64)
    x_t = flow.add_noise(x0, eps, sigma)
    torch.testing.assert_close(flow.euler_step(x_t, eps - x0, sigma, 0.0), x0, atol=1e-12, rtol=0)
    # Two Euler steps along the straight path land there too.
    mid = flow.euler_step(x_t, eps - x0, sigma, 0.1)
    torch.testing.assert_close(mid, flow.add_noise(x0, eps, 0.1), atol=1e-12, rtol=0)
    torch.testing.assert_close(flow.euler_step(mid, eps - x0, 0.1, 0.0), x0, atol=1e-12, rtol=0)


def test_renoise_step():
    x, v, noise = _randn(2, 3, 4, 4, seed=9), _randn(2, 3, 4, 4, seed=10), _randn(2, 3, 4, 4, seed=11)
    out = flow.renoise_step(x, v, 0.9, 0.5, noise)
    torch.testing.assert_close(out, flow.add_noise(flow.x0_from_velocity(x, v, 0.9), noise, 0.5), atol=1e-12, rtol=0)
    torch.testing.assert_close(out, 0.5 * (x - 0.9 * v) + 0.5 * noise, atol=1e-12, rtol=0)
    # To sigma 0 the fresh noise is irrelevant: the x0 prediction comes out.
    torch.testing.assert_close(flow.renoise_step(x, v, 0.9, 0.0, noise), x - 0.9 * v, atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Index <-> sigma and ISG


#: The reference's anchor indices (method notes 1.7): SD 3.5's index list and FLUX's hard-coded timesteps (the shifted
#: sigmas .9045, .7595, .5128 truncated to the 1000-step grid), each followed by 0 for sigma 0.
REFERENCE_INDICES = {'flux': [1000, 904, 759, 512, 0], 'sd35': [999, 749, 499, 249, 0]}


@pytest.mark.parametrize('name', ['flux', 'sd35'])
def test_sigma_to_index_round_trip_on_anchor_indices(name):
    family = FAMILIES[name]()
    anchor_idx = family.sigma_to_index(family.anchors((128, 128)))
    expected = REFERENCE_INDICES[name][:4]
    assert anchor_idx.tolist() == expected
    for i in [*expected, 0, 1, 500]:
        assert int(family.sigma_to_index(family.index_to_sigma(i))) == i
    assert int(family.sigma_to_index(0.0)) == 0


def test_sd3_index_zero():
    family = SD35Family()
    assert int(family.sigma_to_index(0.0)) == 0
    assert float(family.index_to_sigma(0)) == pytest.approx(3 * 0.001 / (1 + 2 * 0.001), abs=1e-15)
    assert float(flow.flux_index_to_sigma(904)) == pytest.approx(0.904, abs=1e-15)


@pytest.mark.parametrize('name,margin', [('flux', 20), ('sd35', 50)])
def test_isg_mid_sigma_inside_segments(name, margin):
    family = FAMILIES[name]()
    assert family.defaults.isg_margin == margin
    sigmas = flow.append_zero(family.anchors((128, 128)))
    n = 4000
    rng = torch.Generator().manual_seed(0)
    for i in range(4):
        cur = torch.full((n,), float(sigmas[i]), dtype=torch.float64)
        nxt = torch.full((n,), float(sigmas[i + 1]), dtype=torch.float64)
        mid = mid_sigma(family, cur, nxt, rng)
        assert mid.shape == (n,)
        assert (mid > nxt).all() and (mid < cur).all(), (i, mid.min(), mid.max())
        # The grid index of each draw, by hand: FLUX t = 1000 s; SD 3.5 (t + 1) / 1000 = s / (3 - 2 s).
        idx = mid * 1000 if name == 'flux' else 1000 * mid / (3 - 2 * mid) - 1
        assert (idx - idx.round()).abs().max() < 1e-6
        idx = idx.round()
        lo = REFERENCE_INDICES[name][i + 1] + margin
        hi = REFERENCE_INDICES[name][i] - margin
        assert int(idx.min()) == lo and int(idx.max()) == hi, (i, lo, hi)  # uniform on [lo, hi], both ends hit
        if i == 3:  # last segment ends at sigma 0
            assert float(sigmas[i + 1]) == 0.0 and lo == margin
    # Per-sample segments in one call.
    cur = sigmas[:4].clone()
    nxt = sigmas[1:].clone()
    mid = mid_sigma(family, cur, nxt, torch.Generator().manual_seed(1))
    assert (mid > nxt).all() and (mid < cur).all()


# ---------------------------------------------------------------------------------------------------------------------
# DMD loss


def _dmd_tensors():
    x0 = _randn(2, 3, 4, 4, seed=20)
    x0_real = _randn(2, 3, 4, 4, seed=21)
    x0_fake = _randn(2, 3, 4, 4, seed=22)
    return x0, x0_real, x0_fake


def _dmd_grad(x0, x0_real, x0_fake):
    x = x0.clone().requires_grad_(True)
    flow.dmd_loss(x, x0_real, x0_fake).backward()
    return x.grad


def test_dmd_gradient_by_hand():
    x0, x0_real, x0_fake = _dmd_tensors()
    grad = _dmd_grad(x0, x0_real, x0_fake)
    numel = x0.numel()
    for i in range(2):
        norm = (x0[i] - x0_real[i]).abs().mean()  # mean over C, H, W of this sample only
        expected = (x0_fake[i] - x0_real[i]) / norm / numel
        # dmd_loss computes in float32 (for bf16 training), hence the float32 tolerance.
        torch.testing.assert_close(grad[i], expected, atol=1e-9, rtol=1e-5)
    # dmd_gradient itself is the un-divided-by-numel direction.
    g = flow.dmd_gradient(x0, x0_real, x0_fake)
    torch.testing.assert_close(g / numel, grad, atol=1e-9, rtol=1e-5)
    # The loss value is 0.5 * mean(g^2).
    torch.testing.assert_close(flow.dmd_loss(x0, x0_real, x0_fake).double(), 0.5 * (g**2).mean(), atol=1e-7, rtol=1e-5)


def test_dmd_normalisation_is_per_sample():
    x0, x0_real, x0_fake = _dmd_tensors()
    base = _dmd_grad(x0, x0_real, x0_fake)
    # Scale sample 1's distance to the teacher by 10: its gradient shrinks by 10, sample 0's is unchanged.
    x0_real_2 = x0_real.clone()
    x0_fake_2 = x0_fake.clone()
    x0_real_2[1] = x0[1] - 10 * (x0[1] - x0_real[1])
    x0_fake_2[1] = x0_real_2[1] + (x0_fake[1] - x0_real[1])  # same fake - real difference
    scaled = _dmd_grad(x0, x0_real_2, x0_fake_2)
    torch.testing.assert_close(scaled[0], base[0], atol=1e-9, rtol=1e-5)
    torch.testing.assert_close(scaled[1], base[1] / 10, atol=1e-9, rtol=1e-5)
    assert not torch.allclose(scaled[1], base[1], rtol=0.5)


def test_dmd_gradient_zero_normaliser_gives_zero_not_inf():
    x0, x0_real, x0_fake = _dmd_tensors()
    x0_real[0] = x0[0]  # x0 already at the teacher's estimate, the fake score elsewhere: (fake - real) / 0
    g = flow.dmd_gradient(x0, x0_real, x0_fake)
    assert torch.equal(g[0], torch.zeros_like(g[0])) and torch.isfinite(g).all()
    assert torch.isfinite(flow.dmd_loss(x0, x0_real, x0_fake))


def test_dmd_gradient_nan_becomes_zero():
    x0, x0_real, x0_fake = _dmd_tensors()
    # Sample 0 already equals teacher and fake score (0 / 0 = NaN -> 0); sample 1 is untouched.
    x0_real[0] = x0[0]
    x0_fake[0] = x0[0]
    g = flow.dmd_gradient(x0, x0_real, x0_fake)
    assert torch.equal(g[0], torch.zeros_like(g[0]))
    torch.testing.assert_close(g[1], (x0_fake[1] - x0_real[1]) / (x0[1] - x0_real[1]).abs().mean(), atol=1e-12,
                               rtol=0)


def test_dmd_descent_moves_toward_teacher():
    x0, x0_real, _ = _dmd_tensors()
    x = x0.clone().requires_grad_(True)
    loss = flow.dmd_loss(x, x0_real, x0.clone())  # fake score agrees with the generator
    loss.backward()
    stepped = x0 - 0.5 * x0.numel() * x.grad
    for i in range(2):
        before = (x0[i] - x0_real[i]).norm()
        after = (stepped[i] - x0_real[i]).norm()
        assert after < before
    # The direction is exactly toward x0_real.
    direction = (x0_real - x0)
    cos = torch.nn.functional.cosine_similarity((-x.grad).flatten(1), direction.flatten(1), dim=1)
    torch.testing.assert_close(cos, torch.ones(2, dtype=torch.float64), atol=1e-6, rtol=0)


def test_charbonnier():
    a = _randn(2, 3, 4, 4, seed=30)
    assert float(flow.charbonnier(a, a.clone())) == 0.0
    pred = torch.tensor([[0.0, 3.0], [1.0, -4.0]])
    target = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    c = 0.5
    expected = sum(math.sqrt(d * d + c * c) - c for d in (0.0, 3.0, 0.0, 4.0)) / 4
    assert float(flow.charbonnier(pred, target, c=c)) == pytest.approx(expected, abs=1e-6)
    assert float(flow.charbonnier(pred, target)) == pytest.approx(
        sum(math.sqrt(d * d + 1e-6) - 1e-3 for d in (0.0, 3.0, 0.0, 4.0)) / 4, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Backward simulation


class _Counting:

    def __init__(self, shape):
        self.shape = shape
        self.rng = torch.Generator().manual_seed(123)
        self.draws: list[torch.Tensor] = []
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def noise(self):
        eps = torch.randn(*self.shape, generator=self.rng, dtype=torch.float64)
        self.draws.append(eps)
        return eps

    def velocity(self, x, sigma):
        self.calls.append((x.clone(), sigma.clone()))
        return 0.5 * x + sigma.reshape(-1, 1, 1, 1)


@pytest.mark.parametrize('k', [0, 1, 2, 3])
def test_backward_simulation_counts(k):
    anchors = flow.append_zero([1.0, 0.9, 0.75, 0.5])
    rec = _Counting((2, 3, 4, 4))
    out = flow.backward_simulation(rec.velocity, rec.noise, anchors, k)
    assert len(rec.calls) == k
    assert len(rec.draws) == k + 1
    for a in range(len(rec.draws)):
        for b in range(a + 1, len(rec.draws)):
            assert not torch.equal(rec.draws[a], rec.draws[b])
    for j, (_, sigma) in enumerate(rec.calls):
        assert sigma.shape == (2,) and torch.all(sigma == anchors[j])
    if k == 0:
        assert torch.equal(out, rec.draws[0])
    # Replay by hand (notes 1.8): x0 = x - s v, then x = s_next eps' + (1 - s_next) x0 with the j+1-th draw.
    x = rec.draws[0]
    for j in range(k):
        s, s_next = float(anchors[j]), float(anchors[j + 1])
        x0 = x - s * (0.5 * x + s)
        x = s_next * rec.draws[j + 1] + (1 - s_next) * x0
    torch.testing.assert_close(out, x, atol=1e-12, rtol=0)


def test_backward_simulation_k1_by_hand():
    anchors = flow.append_zero([1.0, 0.9, 0.75, 0.5])
    rec = _Counting((2, 3, 4, 4))
    out = flow.backward_simulation(rec.velocity, rec.noise, anchors, 1)
    eps0, eps1 = rec.draws
    v = 0.5 * eps0 + 1.0
    expected = flow.renoise_step(eps0, v, 1.0, 0.9, eps1)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(out, 0.1 * (eps0 - v) + 0.9 * eps1, atol=1e-12, rtol=0)
    assert torch.equal(rec.calls[0][0], eps0)
