"""The 4-step samplers: Euler and x0-re-noise on the training anchors, generator-call count, seeding, per-sample
generators, the (family, generator, vae, conditioner) entry point and the FLUX re-noise noise layout."""

import pytest
import torch

from senseflow_algos import flow
from senseflow_algos.models.factory import build_dmd_model
from senseflow_algos.sampling import (
    SamplingComponents,
    draw_noise,
    images_to_pil,
    run_sampler,
    sample,
    seeded_default_rng,
)

PROMPTS = ['a red circle above a blue square', 'a small green star']
ANCHOR_SETS = {
    'sd35': [1.0, 0.9, 0.75, 0.5, 0.0],
    'flux-1024': [1.0, 0.9045, 0.7595, 0.5128, 0.0],
}


@pytest.fixture(scope='module', params=['flux', 'sd35'])
def model(request):
    return build_dmd_model(family=request.param, tiny=True, resolution=32, seed=0)


@pytest.mark.parametrize('anchors', list(ANCHOR_SETS.values()), ids=list(ANCHOR_SETS))
def test_euler_with_exact_velocity_recovers_x0(anchors):
    rng = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=rng)
    eps = torch.randn(3, 4, 8, 8, generator=rng)
    calls = []

    def velocity(x, sigma):
        calls.append(sigma)
        assert sigma.shape == (3,)
        return eps - x0  # the exact rectified-flow velocity of the straight path from x0 to eps

    out = run_sampler(velocity, eps, anchors, method='euler')
    torch.testing.assert_close(out, x0, atol=1e-6, rtol=0)
    assert len(calls) == len(anchors) - 1
    assert [float(c[0]) for c in calls] == pytest.approx(anchors[:-1])


def test_renoise_with_exact_x0_predictor_lands_on_x0_and_draws_fresh_noise_each_step():
    rng = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 4, 8, 8, generator=rng)
    noises = []

    def noise_fn():
        noises.append(torch.randn(2, 4, 8, 8, generator=rng))
        return noises[-1]

    seen = []

    def velocity(x, sigma):
        s = float(sigma[0])
        seen.append(x.clone())
        return flow.velocity_from_x0(x, x0, s)  # predicts x0 exactly at every anchor

    anchors = ANCHOR_SETS['sd35']
    out = run_sampler(velocity, torch.randn(2, 4, 8, 8, generator=rng), anchors, method='renoise', noise_fn=noise_fn)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)
    assert len(noises) == 4  # one per step, the last one multiplied by sigma = 0
    for k in range(1, 4):  # each step's input is x0 re-noised with that step's fresh noise
        torch.testing.assert_close(seen[k], flow.add_noise(x0, noises[k - 1], anchors[k]), atol=1e-5, rtol=0)


def test_sampler_argument_errors():
    with pytest.raises(ValueError, match='not known'):
        run_sampler(lambda x, s: x, torch.zeros(1, 1), [1.0, 0.0], method='heun')
    with pytest.raises(ValueError, match='noise_fn'):
        run_sampler(lambda x, s: x, torch.zeros(1, 1), [1.0, 0.0], method='renoise')
    with pytest.raises(ValueError, match='one per sample'):
        draw_noise((3, 4), [torch.Generator()] * 2)


def _count_calls(module):
    calls = []
    handle = module.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls, handle


def test_renoise_sampler_makes_exactly_four_generator_calls(model):
    gen_calls, h1 = _count_calls(model.generator)
    teacher_calls, h2 = _count_calls(model.teacher)
    fake_calls, h3 = _count_calls(model.fake_score)
    try:
        out = sample(model, PROMPTS, rng=torch.Generator().manual_seed(0))
    finally:
        for h in (h1, h2, h3):
            h.remove()
    assert len(gen_calls) == 4 == model.num_anchors
    assert not teacher_calls and not fake_calls
    assert out.latents.shape == (2, *model.latent_shape)
    assert out.images.shape == (2, 3, 32, 32)
    assert 0.0 <= float(out.images.min()) and float(out.images.max()) <= 1.0
    assert [im.size for im in out.to_pil()] == [(32, 32), (32, 32)]


def test_seeding_and_methods(model):
    def run(seed, method='renoise'):
        return sample(model, PROMPTS, rng=torch.Generator().manual_seed(seed), method=method,
                      decode=False).latents

    torch.testing.assert_close(run(0), run(0), rtol=0, atol=0)
    assert not torch.allclose(run(0), run(1))
    assert not torch.allclose(run(0), run(0, 'euler'))
    # Euler draws only the initial noise: the generator's stream advances by one latent's worth.
    rng = torch.Generator().manual_seed(3)
    sample(model, PROMPTS, rng=rng, method='euler', decode=False)
    ref = torch.Generator().manual_seed(3)
    torch.randn(2, *model.latent_shape, generator=ref)
    assert torch.equal(torch.randn(5, generator=rng), torch.randn(5, generator=ref))


def test_per_sample_generators_make_each_image_independent_of_the_batch(model):
    both = sample(model, PROMPTS, rng=[torch.Generator().manual_seed(s) for s in (10, 11)]).images
    second = sample(model, PROMPTS[1:], rng=[torch.Generator().manual_seed(11)]).images
    torch.testing.assert_close(both[1:], second, atol=1e-5, rtol=0)


def test_sampling_restores_the_generator_mode_and_touches_no_global_rng(model):
    model.generator.train()
    state = torch.random.get_rng_state()
    sample(model, PROMPTS[:1], rng=torch.Generator().manual_seed(0), decode=False)
    assert model.generator.training
    assert torch.equal(state, torch.random.get_rng_state())
    model.generator.eval()


def test_components_entry_point_equals_model_entry_point(model):
    parts = SamplingComponents.build(model.family, model.generator, model.vae, model.conditioner, resolution=32)
    torch.testing.assert_close(parts.sigmas, model.sigmas)
    a = sample(model, PROMPTS, rng=torch.Generator().manual_seed(5))
    b = sample(parts, PROMPTS, rng=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)
    cond = model.conditioner(PROMPTS)
    c = sample(parts, cond=cond, rng=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a.latents, c.latents, rtol=0, atol=0)
    with pytest.raises(ValueError, match='exactly one'):
        sample(parts, PROMPTS, cond=cond)
    with pytest.raises(TypeError, match='DMDModel or SamplingComponents'):
        sample(object(), PROMPTS)


def test_flux_renoise_noise_is_drawn_in_the_packed_layout():
    """FluxPipeline's scheduler draws re-noise noise on packed tokens; the sampler draws the same numbers."""
    from senseflow_algos.models.families import FluxFamily
    from senseflow_algos.models.families.flux import pack_latents
    from senseflow_algos.sampling import _renoise_noise_fn

    shape = (2, 4, 8, 8)
    noise = _renoise_noise_fn(FluxFamily(), shape, torch.Generator().manual_seed(0), 'cpu')()
    packed = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pack_latents(noise), packed)


def test_seeded_default_rng_is_the_global_cpu_generator():
    rng = seeded_default_rng(123)
    a = torch.randn(4, generator=rng)
    torch.manual_seed(123)
    assert torch.equal(a, torch.randn(4))
    with pytest.raises(ValueError, match='default generator'):
        seeded_default_rng(0, 'meta')


def test_images_to_pil_rounds_like_diffusers():
    img = images_to_pil(torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1))[0]
    assert img.getpixel((0, 0)) == (0, 128, 255)
