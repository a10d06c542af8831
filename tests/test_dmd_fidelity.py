"""DMDModel's DMD loss, its choice of generator input and ISG's segment ends, intermediate times and guidance, each
checked against the method notes (``/work/shared/reference/senseflow-method.md`` 1.3, 1.7, 1.8, 3.1, 5): calls
recorded per network, distributions checked with a Kolmogorov-Smirnov statistic against a CDF written here, counts
against a binomial bound, the loss and its gradient recomputed from the notes' formula.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from composer.core import Event

from senseflow_algos.algorithms import IntraSegmentGuidance
from senseflow_algos.algorithms.isg import mid_sigma
from senseflow_algos.models.dmd import GENERATOR_PHASE
from senseflow_algos.models.factory import build_dmd_model
from senseflow_algos.models.families import FluxFamily, SD35Family

REPO = Path(__file__).resolve().parents[1]
#: A KS distance this large has p < 1e-4 at the sample sizes used (critical value about 1.95 / sqrt(n)): generous for
#: a fixed seed, yet far below what a wrong distribution gives (e.g. shifted vs unshifted sigma: D > 0.2).
KS_MAX = 0.06


def ks_distance(samples: torch.Tensor, cdf) -> float:
    """Two-sided Kolmogorov-Smirnov distance between the samples' empirical CDF and ``cdf`` (continuous)."""
    x = samples.double().sort().values
    n = x.numel()
    f = cdf(x)
    upper = torch.arange(1, n + 1, dtype=torch.float64) / n - f
    lower = f - torch.arange(0, n, dtype=torch.float64) / n
    return float(torch.maximum(upper, lower).max())


def discrete_uniform_distance(values: torch.Tensor, lo: int, hi: int) -> float:
    """KS distance of integer ``values`` to the uniform distribution on {lo..hi}, at every support point."""
    support = torch.arange(lo, hi + 1, dtype=torch.float64)
    empirical = (values.double()[None, :] <= support[:, None]).double().mean(1)
    return float((empirical - (support - lo + 1) / (hi - lo + 1)).abs().max())


def logit_normal_cdf(s: torch.Tensor) -> torch.Tensor:
    """P(sigmoid(N(0, 1)) <= s) = Phi(logit(s))."""
    logit = torch.log(s / (1 - s))
    return 0.5 * (1 + torch.erf(logit / math.sqrt(2)))


def sd35_index_of(sigma: torch.Tensor) -> torch.Tensor:
    """Invert sigma = shift3((i + 1) / 1000) by hand: (i + 1) / 1000 = sigma / (3 - 2 sigma)."""
    s = sigma.double()
    return 1000 * s / (3 - 2 * s) - 1


def _conditioning(model, n: int, tokens: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    config = model.teacher.config
    cond = {'prompt_embeds': torch.randn(n, tokens, config.joint_attention_dim, generator=g),
            'pooled_prompt_embeds': torch.randn(n, config.pooled_projection_dim, generator=g)}
    if model.family.name == 'sd35':
        cond['negative_prompt_embeds'] = torch.randn(n, tokens, config.joint_attention_dim, generator=g)
        cond['negative_pooled_prompt_embeds'] = torch.randn(n, config.pooled_projection_dim, generator=g)
    return cond


class VelocityCalls:
    """Wraps ``family.velocity`` and records every call: which network, its guidance, sigma, input and output."""

    def __init__(self, model):
        self.model, self.original, self.calls = model, model.family.velocity, []
        model.family.velocity = self

    def __call__(self, net, x, sigma, cond, guidance=None):
        out = self.original(net, x, sigma, cond, guidance)
        name = next(n for n in ('teacher', 'generator', 'fake_score') if getattr(self.model, n) is net)
        self.calls.append(SimpleNamespace(net=name, x=x.detach().clone(), sigma=sigma.detach().clone(),
                                          guidance=None if guidance is None else guidance.detach().clone(),
                                          out=out.detach().clone()))
        return out


# ---------------------------------------------------------------------------------------------------------------------
# DMD loss (notes 1.3, 5)


@pytest.mark.parametrize('family,guidance', [('flux', (1.0, 8.0)), ('sd35', (3.0, 10.0))])
def test_dmd_loss_guided_teacher_unguided_fake_and_the_notes_gradient(family, guidance):
    model = build_dmd_model(family=family, tiny=True, resolution=32, seed=0, dmd_guidance=guidance)
    n = 4
    cond = _conditioning(model, n)
    x0 = torch.randn(n, *model.latent_shape, generator=torch.Generator().manual_seed(1), requires_grad=True)
    rec = VelocityCalls(model)
    loss = model.dmd_loss(x0, cond)
    loss.backward()

    teacher, fake = rec.calls
    assert (teacher.net, fake.net) == ('teacher', 'fake_score')
    assert fake.guidance is None  # the fake score is queried plainly
    lo, hi = guidance
    assert teacher.guidance.shape == (n,) and ((teacher.guidance >= lo) & (teacher.guidance <= hi)).all()
    assert teacher.guidance.unique().numel() == n  # drawn per sample
    # Both see the same noisy sample at the same per-sample sigma: x_t = (1 - s) x0 + s eps with eps ~ N(0, I).
    assert torch.equal(teacher.sigma, fake.sigma) and torch.equal(teacher.x, fake.x)
    s = teacher.sigma.reshape(-1, 1, 1, 1)
    eps = (teacher.x - (1 - s) * x0.detach()) / s
    assert abs(float(eps.mean())) < 0.1 and abs(float(eps.std()) - 1) < 0.1

    # Notes 1.3, by hand: x0_real / x0_fake, p = x0 - x0_hat, g = (p_real - p_fake) / mean_CHW |p_real|,
    # L = 0.5 mean((x0 - sg(x0 - g))^2), so dL/dx0 = g / numel.
    x0_real = teacher.x - s * teacher.out
    x0_fake = fake.x - s * fake.out
    p_real, p_fake = x0.detach() - x0_real, x0.detach() - x0_fake
    g = (p_real - p_fake) / p_real.abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(loss.detach(), 0.5 * (g**2).mean(), atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(x0.grad, g / g.numel(), atol=1e-9, rtol=1e-5)
    # The generator sample moves toward the teacher's estimate relative to the fake score's.
    assert float((-x0.grad * (x0_real - x0_fake)).sum()) > 0


def _dmd_draws(model, batches: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmas and teacher guidances of ``batches`` DMD losses of ``n`` samples each (successive batches)."""
    rec = VelocityCalls(model)
    cond = _conditioning(model, n)
    for _ in range(batches):
        with torch.no_grad():
            model.dmd_loss(torch.randn(n, *model.latent_shape), cond)
        model.end_batch()
    teacher = [c for c in rec.calls if c.net == 'teacher']
    assert len(teacher) == batches and all(c.net == 'fake_score' for c in rec.calls if c.net != 'teacher')
    return torch.cat([c.sigma for c in teacher]), torch.cat([c.guidance for c in teacher])


def test_flux_dmd_sigma_is_plain_logit_normal_and_guidance_uniform():
    model = build_dmd_model(family='flux', tiny=True, resolution=32, seed=0, dmd_guidance=(1.0, 8.0))
    sigma, guidance = _dmd_draws(model, batches=6, n=400)
    assert ks_distance(sigma, logit_normal_cdf) < KS_MAX
    # The SD3-shifted logit-normal (what the fake loss of SD 3.5 uses) is clearly rejected: the test can fail.
    assert ks_distance(3 * sigma / (1 + 2 * sigma), logit_normal_cdf) > 0.2
    assert ks_distance(guidance, lambda x: (x - 1.0) / 7.0) < KS_MAX


def test_sd35_dmd_sigma_is_a_uniform_index_in_20_980_through_shift3():
    model = build_dmd_model(family='sd35', tiny=True, resolution=32, seed=0, dmd_guidance=(3.0, 10.0))
    sigma, guidance = _dmd_draws(model, batches=6, n=400)
    index = sd35_index_of(sigma)
    assert (index - index.round()).abs().max() < 1e-3  # on the integer grid
    index = index.round()
    assert int(index.min()) == 20 and int(index.max()) == 980
    assert discrete_uniform_distance(index, 20, 980) < KS_MAX
    assert ks_distance(guidance, lambda x: (x - 3.0) / 7.0) < KS_MAX


# ---------------------------------------------------------------------------------------------------------------------
# Generator input: backward simulation vs forward diffusion (notes 1.8)


def _input_model(family='sd35', resolution=32, **kwargs):
    model = build_dmd_model(family=family, tiny=True, resolution=resolution, seed=0, **kwargs)
    model.generator_velocity = lambda x, sigma, cond: torch.zeros_like(x)  # the choice, not the network, is tested
    return model


def _passes(model, batches: int, n: int = 2, with_latents: bool = True, rank=None, monkeypatch=None):
    cond = _conditioning(model, n)
    batch = {**cond, **({'latents': torch.randn(n, *model.latent_shape)} if with_latents else {})}
    if rank is not None:
        monkeypatch.setattr('senseflow_algos.models.dmd.dist.get_global_rank', lambda: rank)
    outs = []
    for step in range(batches):
        model.batches_seen.fill_(step)
        out = model.generator_pass(batch, with_grad=False)
        outs.append(SimpleNamespace(**{k: getattr(out, k) for k in ('backward_simulation', 'anchor_index', 'sigma', 'sigma_next',
                                                                      'x_t')}))
        model.end_batch()
    return outs


@pytest.mark.parametrize('p', [0.5, 0.2])
def test_backward_simulation_is_chosen_with_probability_backsim_prob(p):
    model = _input_model(backsim_prob=p)
    n_batches = 1500
    outs = _passes(model, n_batches)
    count = sum(o.backward_simulation for o in outs)
    sd = math.sqrt(n_batches * p * (1 - p))
    assert abs(count - n_batches * p) < 4 * sd, (count, n_batches * p)
    # Backward simulation: one anchor for the whole batch; forward diffusion: one per sample. Both uniform over the 4.
    shared = torch.tensor([int(o.anchor_index[0]) for o in outs if o.backward_simulation])
    assert all(o.anchor_index.unique().numel() == 1 for o in outs if o.backward_simulation)
    per_sample = torch.cat([o.anchor_index for o in outs if not o.backward_simulation])
    for draws in (shared, per_sample):
        counts = torch.bincount(draws, minlength=4).double()
        expected = draws.numel() / 4
        assert (counts - expected).abs().max() < 4 * math.sqrt(expected * 0.75), counts.tolist()


def test_backward_simulation_choice_and_anchor_are_shared_by_all_ranks(monkeypatch):
    model = _input_model()
    rank0 = _passes(model, 40, rank=0, monkeypatch=monkeypatch)
    rank1 = _passes(model, 40, rank=1, monkeypatch=monkeypatch)
    assert [o.backward_simulation for o in rank0] == [o.backward_simulation for o in rank1]
    assert 5 < sum(o.backward_simulation for o in rank0) < 35
    for a, b in zip(rank0, rank1):
        if a.backward_simulation:
            assert torch.equal(a.anchor_index, b.anchor_index)
        assert not torch.equal(a.x_t, b.x_t)  # each rank's own noise


def test_prompt_only_batches_always_backward_simulate():
    model = _input_model(backsim_prob=0.0)
    assert all(o.backward_simulation for o in _passes(model, 50, with_latents=False))
    assert not any(o.backward_simulation for o in _passes(model, 50))  # with latents, p = 0 means never


# ---------------------------------------------------------------------------------------------------------------------
# ISG: segment ends, intermediate time, guidance (notes 1.7, 3.1, 5)

#: Each anchor's next anchor (the last segment ends at 0), notes 1.7 / 5.
NEXT_ANCHOR = {'flux': {1.0: 0.904, 0.904: 0.759, 0.759: 0.512, 0.512: 0.0},
               'sd35': {1.0: 0.9, 0.9: 0.75, 0.75: 0.5, 0.5: 0.0}}


@pytest.mark.parametrize('family', ['flux', 'sd35'])
def test_sigma_next_is_the_next_anchor_and_zero_after_the_last(family):
    # FLUX's anchors depend on the token count: the tiny VAE's 2x downsampling at 256 px gives 1024 px's 64 x 64 tokens.
    model = _input_model(family, resolution=256 if family == 'flux' else 32)
    seen = set()
    for out in _passes(model, 60, n=4):
        for s, s_next in zip(out.sigma.tolist(), out.sigma_next.tolist()):
            anchor = min(NEXT_ANCHOR[family], key=lambda a: abs(a - s))
            assert abs(s - anchor) < 1e-3 and abs(s_next - NEXT_ANCHOR[family][anchor]) < 1e-3, (s, s_next)
            seen.add(anchor)
    assert seen == set(NEXT_ANCHOR[family])


#: Intermediate-sigma range per segment, by hand: t_mid uniform in [t_next + m, t_cur - m] on the 0..1000 grid.
#: FLUX (m = 20, sigma = t / 1000, reference timesteps [1000, 904, 759, 512, 0]); SD 3.5 (m = 50, sigma =
#: shift3((t + 1) / 1000), indices [999, 749, 499, 249] and 0 for sigma 0) as the notes give them for two segments.
MID_RANGE = {
    'flux': {1.0: (0.924, 0.980), 0.904: (0.779, 0.884), 0.759: (0.532, 0.739), 0.512: (0.020, 0.492)},
    'sd35': {1.0: (0.923, 0.983), 0.5: (0.139, 0.429)},
}


@pytest.mark.parametrize('name', ['flux', 'sd35'])
def test_isg_mid_sigma_ranges_from_the_notes(name):
    family = {'flux': FluxFamily, 'sd35': SD35Family}[name]()
    anchors = family.anchors((128, 128))
    rng = torch.Generator().manual_seed(0)
    for cur, (lo, hi) in MID_RANGE[name].items():
        i = min(range(4), key=lambda j: abs(float(anchors[j]) - cur))
        s_cur = torch.full((3000,), float(anchors[i]), dtype=torch.float64)
        s_next = torch.full((3000,), float(torch.cat([anchors, anchors.new_zeros(1)])[i + 1]), dtype=torch.float64)
        mid = mid_sigma(family, s_cur, s_next, rng)
        assert float(mid.min()) == pytest.approx(lo, abs=5e-4) and float(mid.max()) == pytest.approx(hi, abs=5e-4)
        grid = mid * 1000 if name == 'flux' else sd35_index_of(mid)
        assert (grid - grid.round()).abs().max() < 1e-6
        t_lo, t_hi = int(grid.min().round()), int(grid.max().round())
        assert grid.round().unique().numel() == t_hi - t_lo + 1  # every grid point of the range drawn ...
        assert discrete_uniform_distance(grid.round(), t_lo, t_hi) < KS_MAX  # ... uniformly


def _isg_calls(model, algo, batches: int, n: int = 16) -> list[SimpleNamespace]:
    """Run ISG's AFTER_LOSS on generator outputs of ``batches`` batches; the recorded teacher/generator calls."""
    rec = VelocityCalls(model)
    cond = _conditioning(model, n)
    batch = {**cond, 'latents': torch.randn(n, *model.latent_shape)}
    calls = []
    for _ in range(batches):
        model.begin_phase(GENERATOR_PHASE)
        with torch.no_grad():
            out = model.generator_pass(batch, with_grad=False)
        rec.calls.clear()
        state = SimpleNamespace(model=model, outputs=out, loss={'total': torch.zeros(())})
        model._weighted_terms = {'generator/dmd': torch.zeros(())}
        algo.apply(Event.AFTER_LOSS, state, None)
        teacher, generator = rec.calls
        assert (teacher.net, generator.net) == ('teacher', 'generator') and generator.guidance is None
        calls.append(SimpleNamespace(sigma=out.sigma, sigma_next=out.sigma_next, teacher=teacher,
                                     generator=generator))
        model.end_batch()
    return calls


@pytest.mark.parametrize('family,guidance', [('sd35', (2.0, 4.0)), ('flux', (1.0, 8.0))])
def test_isg_step_uses_the_segment_and_guidance_in_the_configured_range(family, guidance):
    model = build_dmd_model(family=family, tiny=True, resolution=32, seed=0)
    calls = _isg_calls(model, IntraSegmentGuidance(guidance=guidance), batches=12)
    margin = {'flux': 20, 'sd35': 50}[family]
    index = (lambda s: s.double() * 1000) if family == 'flux' else sd35_index_of
    draws = []
    for c in calls:
        assert torch.equal(c.teacher.sigma, c.sigma)  # the teacher steps from the anchor ...
        mid = c.generator.sigma  # ... and the generator from the intermediate point
        t_mid, t_cur = index(mid).round(), index(c.sigma).round()
        t_next = torch.where(c.sigma_next > 0, index(c.sigma_next).round(), torch.zeros_like(t_cur))
        if family == 'flux':  # the reference's FLUX timesteps: sigma * 1000 truncated to the grid
            t_cur, t_next = (c.sigma.double() * 1000 + 1e-6).floor(), (c.sigma_next.double() * 1000 + 1e-6).floor()
        assert ((t_mid >= t_next + margin) & (t_mid <= t_cur - margin)).all()
        draws.append(c.teacher.guidance)
    g = torch.cat(draws)
    lo, hi = guidance
    assert ((g >= lo) & (g <= hi)).all()
    assert ks_distance(g, lambda x: (x - lo) / (hi - lo)) < 2 * KS_MAX  # 192 draws


def test_isg_default_guidance_is_the_notes_per_family():
    for family, (lo, hi) in (('flux', (1.0, 8.0)), ('sd35', (5.0, 5.0))):  # FLUX embedded U(1, 8); SD 3.5 L CFG 5
        model = build_dmd_model(family=family, tiny=True, resolution=32, seed=0)
        g = torch.cat([c.teacher.guidance for c in _isg_calls(model, IntraSegmentGuidance(), batches=2)])
        assert ((g >= lo) & (g <= hi)).all() and (lo == hi or g.unique().numel() == g.numel())


@pytest.mark.parametrize('config,dmd,isg', [('flux.yaml', [1.0, 8.0], [1.0, 8.0]),
                                            ('sd35_large.yaml', [3.0, 10.0], [5.0, 5.0]),
                                            ('sd35_medium.yaml', [2.0, 8.0], [2.0, 4.0])])
def test_production_configs_use_the_notes_guidance(config, dmd, isg):
    cfg = yaml.safe_load((REPO / 'yamls' / config).read_text())
    assert cfg['model']['dmd_guidance'] == dmd
    assert cfg['algorithms']['isg']['guidance'] == isg
    assert cfg['algorithms']['isg']['margin'] == (20 if 'flux' in config else 50)
