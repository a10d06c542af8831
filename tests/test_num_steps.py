"""``model.num_steps``: students of 1, 2, 4 and 8 steps.

The anchors, the inverse shifts export uses and the ISG segments are checked against diffusers' own scheduler and
FluxPipeline (an implementation independent of ``senseflow_algos.flow``) and against hand-derived values; tiny FLUX and
SD 3.5 students of 1 and 2 steps train two batches through the Composer trainer, export, and the exported pipeline
reproduces the in-repo sampler.
"""

import json
import math

import numpy as np
import pytest
import torch

from senseflow_algos import flow
from senseflow_algos.algorithms.isg import mid_sigma
from senseflow_algos.algorithms.isg.isg import check_segments
from senseflow_algos.models.families import FluxFamily, SD35Family

STEPS = (1, 2, 4, 8)


# ---------------------------------------------------------------------------------------------------------------------
# Shifts and their inverses


def test_inverse_shifts_undo_the_forward_ones():
    s = torch.linspace(0, 1, 1001, dtype=torch.float64)
    for shift in (1.0, 3.0, 6.0):
        torch.testing.assert_close(flow.unshift_sigma(flow.shift_sigma(s, shift), shift), s, atol=1e-14, rtol=0)
        torch.testing.assert_close(flow.shift_sigma(flow.unshift_sigma(s, shift), shift), s, atol=1e-14, rtol=0)
    for mu in (0.0, 0.5, 1.15, 2.0):
        torch.testing.assert_close(flow.flux_time_unshift(flow.flux_time_shift(s, mu), mu), s, atol=1e-14, rtol=0)
        torch.testing.assert_close(flow.flux_time_shift(flow.flux_time_unshift(s, mu), mu), s, atol=1e-14, rtol=0)
    # By hand: shift 3 maps .5 to .75, so its inverse maps .75 back to .5; FLUX at mu = ln 3 maps .5 to .75 too.
    assert float(flow.unshift_sigma(0.75, 3.0)) == pytest.approx(0.5, abs=1e-15)
    assert float(flow.flux_time_unshift(0.75, math.log(3.0))) == pytest.approx(0.5, abs=1e-15)
    assert float(flow.flux_time_unshift(0.0, 1.15)) == 0.0


def test_flux_mu_is_fluxpipeline_calculate_shift():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for tokens in (16, 256, 1024, 4096):
        assert flow.flux_mu(tokens) == pytest.approx(calculate_shift(tokens, 256, 4096, 0.5, 1.15), abs=1e-12)


def test_uniform_times():
    assert flow.uniform_times(1).tolist() == [1.0]
    assert flow.uniform_times(2).tolist() == [1.0, 0.5]
    assert flow.uniform_times(4).tolist() == [1.0, 0.75, 0.5, 0.25]
    for n in (0, -1, 2.5):
        with pytest.raises(ValueError, match='model.num_steps'):
            flow.uniform_times(n)


# ---------------------------------------------------------------------------------------------------------------------
# Anchors per family, against diffusers


def _diffusers_sd3_sigmas(n: int) -> np.ndarray:
    """SD 3.5's scheduler (static shift 3) given FluxPipeline-style uniform pre-shift sigmas."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n))
    return sched.sigmas.double().numpy()


def _diffusers_flux_sigmas(n: int, tokens: int) -> np.ndarray:
    """What FluxPipeline does for ``n`` steps: ``linspace(1, 1/n, n)`` through the scheduler at ``calculate_shift``."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                            base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                            max_image_seq_len=4096)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=calculate_shift(tokens, 256, 4096, 0.5, 1.15))
    return sched.sigmas.double().numpy()


@pytest.mark.parametrize('n', STEPS)
def test_sd3_anchors_match_the_diffusers_scheduler(n):
    anchors = SD35Family().anchors((128, 128), n)
    assert anchors.dtype == torch.float64 and len(anchors) == n
    np.testing.assert_allclose(flow.append_zero(anchors).numpy(), _diffusers_sd3_sigmas(n), atol=1e-6, rtol=0)
    # The reference's index form: [999, 749, 499, 249] for 4 steps, i.e. 1000 k / n - 1 through the scheduler's sigmas.
    index = torch.tensor([1000 * k // n - 1 for k in range(n, 0, -1)])
    torch.testing.assert_close(anchors, flow.sd3_index_to_sigma(index), atol=1e-12, rtol=0)


@pytest.mark.parametrize('n', STEPS)
@pytest.mark.parametrize('latent_hw', [(128, 128), (4, 4)])
def test_flux_anchors_match_fluxpipeline(n, latent_hw):
    anchors = FluxFamily().anchors(latent_hw, n)
    tokens = (latent_hw[0] // 2) * (latent_hw[1] // 2)
    np.testing.assert_allclose(flow.append_zero(anchors).numpy(), _diffusers_flux_sigmas(n, tokens), atol=1e-6,
                               rtol=0)


def test_flux_anchor_indices_by_hand():
    fam = FluxFamily()
    idx = {n: fam.sigma_to_index(fam.anchors((128, 128), n)).long().tolist() for n in STEPS}
    assert idx[4] == [1000, 904, 759, 512]  # the reference's hard-coded list
    assert idx[2] == [1000, 759]             # e^1.15 / (e^1.15 + 1) = .7595
    assert idx[1] == [1000]
    # 8 steps: e^1.15 / (e^1.15 + 1/s - 1) for s = 7/8 .. 1/8, truncated onto the 0..1000 grid.
    e = math.exp(1.15)
    assert idx[8] == [1000] + [math.floor(1000 * e / (e + 8 / k - 1)) for k in range(7, 0, -1)]


def test_four_steps_are_the_default_anchors():
    for fam, hw in ((FluxFamily(), (128, 128)), (FluxFamily(), (4, 4)), (SD35Family(), (128, 128))):
        assert torch.equal(fam.anchors(hw), fam.anchors(hw, 4))


# ---------------------------------------------------------------------------------------------------------------------
# ISG segments and the GAN weight


@pytest.mark.parametrize('n', STEPS)
@pytest.mark.parametrize('family', [FluxFamily(), SD35Family()], ids=['flux', 'sd35'])
def test_isg_mid_points_stay_inside_every_segment(family, n):
    sigmas = flow.append_zero(family.anchors((128, 128), n))
    check_segments(family, sigmas)
    rng = torch.Generator().manual_seed(0)
    for i in range(n):
        cur = sigmas[i].expand(256)
        nxt = sigmas[i + 1].expand(256)
        mid = mid_sigma(family, cur, nxt, rng)
        # Strictly inside, at least a margin away from both ends on the family's index grid.
        assert (mid < cur).all() and (mid > nxt).all()
        m_idx = family.sigma_to_index(mid)
        assert (m_idx >= family.sigma_to_index(nxt) + family.defaults.isg_margin).all()
        assert (m_idx <= family.sigma_to_index(cur) - family.defaults.isg_margin).all()


def test_isg_names_an_impossible_step_count_and_margin():
    fam = FluxFamily()
    sigmas = flow.append_zero(fam.anchors((128, 128), 8))  # top segment 1000 -> 956: 44 indices
    check_segments(fam, sigmas, margin=22)
    with pytest.raises(ValueError, match=r'algorithms.isg.margin=23 .*segment 0 .*model.num_steps=8.*at most 22'):
        check_segments(fam, sigmas, margin=23)
    with pytest.raises(ValueError, match='model.num_steps=16'):
        check_segments(fam, flow.append_zero(fam.anchors((128, 128), 16)))


def test_gan_weight_follows_the_anchors():
    # FLUX: (1 - sigma)^2 at each anchor; 2 steps at 1024 px: sigma = [1, .7595].
    fam = FluxFamily()
    a2 = fam.anchors((128, 128), 2)
    torch.testing.assert_close(fam.adversarial_weight(a2), (1 - a2)**2)
    assert float(fam.adversarial_weight(a2)[1]) == pytest.approx((1 - math.exp(1.15) / (math.exp(1.15) + 1))**2)
    # SD 3.5's reference weight: the unflipped scheduler sigma at the anchor's index, squared. 2 steps: indices
    # [999, 499] -> scheduler.sigmas[999], [499] = shift3(1/1000), shift3(501/1000).
    sd3 = SD35Family()
    w = sd3.adversarial_weight(sd3.anchors((128, 128), 2))
    shift3 = [3 * s / (1 + 2 * s) for s in (0.001, 0.501)]
    torch.testing.assert_close(w, torch.tensor([shift3[0]**2, shift3[1]**2], dtype=torch.float64), atol=1e-12,
                               rtol=0)


def test_num_steps_is_validated():
    from senseflow_algos.config import ConfigError, load_config, validate_config
    from tests.algorithms.conftest import REPO

    with pytest.raises(ValueError, match='model.num_steps'):
        from senseflow_algos.models.factory import build_dmd_model

        build_dmd_model('flux', resolution=32, tiny=True, num_steps=0)
    cfg = load_config(REPO / 'yamls' / 'tiny_flux.yaml', ['model.num_steps=0'])
    with pytest.raises(ConfigError, match='num_steps'):
        validate_config(cfg)


# ---------------------------------------------------------------------------------------------------------------------
# Train, export, reproduce

PROMPTS = ['a red circle above a blue square', 'a small green star']


@pytest.fixture(scope='module', params=[('flux', 1), ('flux', 2), ('sd35', 1), ('sd35', 2)],
                ids=lambda p: f'{p[0]}-{p[1]}step')
def trained(request, tmp_path_factory):
    """Two batches of the tiny yaml with ``model.num_steps`` set (generator on the first batch), no VFM."""
    from senseflow_algos.builders import build_trainer
    from senseflow_algos.config import load_config, validate_config
    from tests.algorithms.conftest import REPO

    family, n = request.param
    folder = tmp_path_factory.mktemp(f'run_{family}_{n}')
    cfg = load_config(REPO / 'yamls' / f'tiny_{family}.yaml', [
        'trainer.progress_bar=false', 'trainer.max_duration=2ba', f'trainer.save_folder={folder}',
        'trainer.save_interval=2ba',
        'algorithms.vfm_discriminator=null', 'model.gen_every=1', f'model.num_steps={n}', 'optimizer.lr=1e-3'])
    validate_config(cfg)
    trainer = build_trainer(cfg)
    model = trainer.state.model
    before = {k: v.clone() for k, v in model.generator.state_dict().items()}
    trainer.fit()
    trainer.close()
    assert any(not torch.equal(v, before[k]) for k, v in model.generator.state_dict().items())
    return family, n, model, folder


def test_num_steps_student_exports_and_reproduces_the_sampler(trained, tmp_path):
    from diffusers import DiffusionPipeline

    from senseflow_algos.export import EXPORT_INFO, export_pipeline, pipeline_call_kwargs
    from senseflow_algos.sampling import sample, seeded_default_rng

    family, n, model, _ = trained
    assert model.num_anchors == n and len(model.sigmas) == n + 1
    out = export_pipeline(model, tmp_path / 'export', bare=False)
    info = json.loads((out / EXPORT_INFO).read_text())
    assert info['num_steps'] == n and info['call_kwargs']['num_inference_steps'] == n
    assert info['sigmas'] == [float(s) for s in model.sigmas]
    # The pipeline's pre-shift sigmas are the uniform times [1, .., 1/n] (written to 6 digits).
    np.testing.assert_allclose(info['call_kwargs']['sigmas'], np.linspace(1.0, 1 / n, n), atol=1e-6, rtol=0)
    ours = sample(model, PROMPTS, rng=seeded_default_rng(0)).images
    pipe = DiffusionPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPTS, generator=seeded_default_rng(0), output_type='pt',
                  **pipeline_call_kwargs(out)).images
    np.testing.assert_allclose(pipe.scheduler.sigmas.double().numpy(), model.sigmas.numpy(), atol=1e-6, rtol=0)
    diff = (ours - theirs).abs().max().item()
    print(f'{family} {n}-step: max |exported - in-repo| = {diff:.3g}')
    assert diff <= 1e-5


def test_num_steps_checkpoint_exports_through_export_py(trained, tmp_path):
    """``python export.py <run folder>`` restores only the generator, from the run config saved with the checkpoint,
    and writes the same anchors; its pipeline gives the in-repo sampler's images of the trained model."""
    from diffusers import DiffusionPipeline

    from senseflow_algos.export import EXPORT_INFO, main, pipeline_call_kwargs
    from senseflow_algos.sampling import sample, seeded_default_rng

    family, n, model, folder = trained
    assert main([str(folder), str(tmp_path / 'export'), '--no-bare']) == 0
    out = tmp_path / 'export'
    info = json.loads((out / EXPORT_INFO).read_text())
    assert info['num_steps'] == n and info['sigmas'] == [float(s) for s in model.sigmas]
    pipe = DiffusionPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPTS, generator=seeded_default_rng(0), output_type='pt',
                  **pipeline_call_kwargs(out)).images
    ours = sample(model, PROMPTS, rng=seeded_default_rng(0)).images
    diff = (ours - theirs).abs().max().item()
    print(f'{family} {n}-step via export.py: max |exported - in-repo| = {diff:.3g}')
    assert diff <= 1e-5
