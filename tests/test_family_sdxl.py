"""The sdxl family (epsilon UNet on a DDPM schedule, seen in flow coordinates) against independent references.

Expected values come from diffusers' own DDPM / DDIM schedulers and StableDiffusionXLPipeline (its UNet call, CFG
with zero unconditional embeddings, its scheduler steps), the method notes (``/work/shared/reference/
senseflow-method.md`` sections 1.4, 1.5, 1.7) and hand derivations written here; none is taken from the family's own
output.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from senseflow_algos import flow
from senseflow_algos.models.blocks import transformer_blocks
from senseflow_algos.models.families import get_family
from senseflow_algos.models.families.sdxl import SDXLFamily, build_tiny_sdxl_pipeline

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ['a red circle above a blue square', 'a small green star']
SDXL_INDICES = [999, 749, 499, 249]  # notes 1.7: DMD2's range(999, 0, -250)


def ddpm_scheduler() -> DDPMScheduler:
    """SDXL's schedule as diffusers builds it (scaled_linear betas 0.00085..0.012, 1000 steps; no x0 clipping)."""
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear', num_train_timesteps=1000,
                         clip_sample=False)


def hand_sigma(alpha_bar: torch.Tensor) -> torch.Tensor:
    """The flow sigma of a DDPM point, by hand: x_t / (sqrt(ab) + sqrt(1 - ab)) has weights (1 - s, s)."""
    a, b = alpha_bar.double().sqrt(), (1 - alpha_bar.double()).sqrt()
    return b / (a + b)


# ---------------------------------------------------------------------------------------------------------------------
# (a) Maths: flow <-> DDPM


def test_alphas_cumprod_table_is_diffusers():
    torch.testing.assert_close(flow.ddpm_alphas_cumprod(), ddpm_scheduler().alphas_cumprod.double(), rtol=0, atol=0)


def test_ddpm_point_is_the_scaled_flow_point_and_x0_from_epsilon_is_ddims():
    sched = ddpm_scheduler()
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([20, 499, 980])
    ab = sched.alphas_cumprod[t].double()
    sigma = hand_sigma(ab)
    family = SDXLFamily()
    torch.testing.assert_close(family.index_to_sigma(t), sigma, rtol=0, atol=1e-12)
    torch.testing.assert_close(flow.ddpm_alpha_bar(sigma), ab, rtol=1e-9, atol=0)
    scale = (ab.sqrt() + (1 - ab).sqrt()).float().reshape(-1, 1, 1, 1)
    x_t = sched.add_noise(x0, eps, t)
    torch.testing.assert_close(scale * flow.add_noise(x0, eps, sigma.float()), x_t, rtol=0, atol=2e-6)
    torch.testing.assert_close(flow.ddpm_scale(sigma).float().reshape(-1, 1, 1, 1), scale, rtol=1e-7, atol=0)
    # x0 from epsilon: DDIM's pred_original_sample for each sample's own timestep.
    for i in range(3):
        ddim = DDIMScheduler.from_config(sched.config)
        ddim.set_timesteps(4)
        want = ddim.step(eps[i:i + 1], int(t[i]), x_t[i:i + 1]).pred_original_sample
        got = flow.x0_from_epsilon(x_t[i:i + 1], eps[i:i + 1], ab[i].float())
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(got, x0[i:i + 1], rtol=0, atol=1e-5)  # the true epsilon gives the true x0


def test_flow_euler_step_is_a_ddim_step_and_renoise_is_add_noise():
    sched = ddpm_scheduler()
    ddim = DDIMScheduler.from_config(sched.config, timestep_spacing='trailing', set_alpha_to_one=True, steps_offset=0)
    ddim.set_timesteps(4)
    assert ddim.timesteps.tolist() == SDXL_INDICES
    gen = torch.Generator().manual_seed(1)
    x_t, eps, fresh = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(3))
    for t, t_next in [(749, 499), (499, 249), (249, None)]:
        ab = sched.alphas_cumprod[t].double()
        s = float(hand_sigma(ab))
        s_next = 0.0 if t_next is None else float(hand_sigma(sched.alphas_cumprod[t_next]))
        c_next = 1.0 if t_next is None else float(sched.alphas_cumprod[t_next].sqrt() +
                                                 (1 - sched.alphas_cumprod[t_next]).sqrt())
        x = x_t / float(ab.sqrt() + (1 - ab).sqrt())  # the flow point of x_t
        v = flow.velocity_from_epsilon(x, eps, s)
        torch.testing.assert_close(flow.epsilon_from_velocity(x, v, s), eps, rtol=0, atol=1e-5)
        want = ddim.step(eps, t, x_t).prev_sample
        torch.testing.assert_close(c_next * flow.euler_step(x, v, s, s_next), want, rtol=0, atol=1e-5)
        x0 = flow.x0_from_velocity(x, v, s)
        if t_next is not None:  # re-noise = DDPMScheduler.add_noise of the predicted x0 at the next index
            torch.testing.assert_close(c_next * flow.renoise_step(x, v, s, s_next, fresh),
                                       sched.add_noise(x0, fresh, torch.tensor([t_next])), rtol=0, atol=1e-5)


def test_anchors_indices_and_pure_noise_convention():
    family = SDXLFamily()
    sched = ddpm_scheduler()
    anchors = family.anchors((128, 128))
    assert family.sigma_to_index(anchors).tolist() == SDXL_INDICES
    assert float(anchors[0]) == 1.0  # index 999 is pure noise (DMD2: the input at t = 999 is replaced by noise)
    torch.testing.assert_close(anchors[1:], hand_sigma(sched.alphas_cumprod[SDXL_INDICES[1:]]), rtol=0, atol=1e-12)
    # Other step counts: DMD2's range(999, 0, -1000 // n).
    for n in (1, 2, 3, 8):
        expected = list(range(999, 0, -(1000 // n)))[:n]
        assert family.sigma_to_index(family.anchors((128, 128), n)).tolist() == expected, n
    # YAML anchors, and their check that the first is pure noise.
    assert family.sigma_to_index(SDXLFamily(anchors=[999, 500]).anchors((128, 128), 2)).tolist() == [999, 500]
    with pytest.raises(ValueError, match='pure noise'):
        SDXLFamily(anchors=[900, 500]).anchors((128, 128), 2)
    assert family.sigma_to_index(torch.tensor([0.0])).tolist() == [0]


def test_adversarial_weight_is_sqrt_alpha_bar_at_the_anchor_index():
    family = SDXLFamily()
    anchors = family.anchors((128, 128)).float()
    expected = ddpm_scheduler().alphas_cumprod[SDXL_INDICES].sqrt()
    torch.testing.assert_close(family.adversarial_weight(anchors), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(expected, torch.tensor([0.068, 0.238, 0.527, 0.822]), rtol=0, atol=1e-3)  # notes 1.5
    paper = SDXLFamily(adversarial_weighting='signal_power').adversarial_weight(anchors)
    torch.testing.assert_close(paper, (1 - anchors)**2)
    with pytest.raises(ValueError, match=r"adversarial_weighting='scheduler_sigma_squared'.*'sdxl'"):
        SDXLFamily(adversarial_weighting='scheduler_sigma_squared')


def test_sigma_draws_and_the_fake_score_objective_is_epsilon_mse():
    family = SDXLFamily()
    grid = hand_sigma(ddpm_scheduler().alphas_cumprod)
    rng = torch.Generator().manual_seed(0)
    fake = family.fake_score_sigma(4000, rng)
    idx = torch.searchsorted(grid, fake).clamp_max(999)
    torch.testing.assert_close(grid[idx], fake, rtol=0, atol=1e-12)  # on the grid (s(999) < 1 included)
    assert idx.min() < 20 and idx.max() > 980
    dmd = family.dmd_sigma(4000, rng)
    dmd_idx = family.sigma_to_index(dmd)
    assert dmd_idx.min() >= 20 and dmd_idx.max() <= 980 and len(dmd_idx.unique()) > 900
    # The objective is the reference's eps-MSE: given an epsilon prediction at the DDPM point of x_t.
    gen = torch.Generator().manual_seed(2)
    x0, noise, eps_hat = (torch.randn(3, 4, 8, 8, generator=gen) for _ in range(3))
    sigma = fake[:3].float()
    x_t = flow.add_noise(x0, noise, sigma)
    v = flow.velocity_from_epsilon(x_t, eps_hat, sigma)
    got = family.fake_score_objective(v, noise, x0, x_t, sigma)
    torch.testing.assert_close(got, ((eps_hat - noise)**2).mean(), rtol=1e-5, atol=0)
    assert SDXLFamily.defaults.dmd_guidance == (8.0, 8.0) and SDXLFamily.defaults.isg_guidance == (3.0, 15.0)
    assert SDXLFamily.defaults.isg_margin == 20 and SDXLFamily.uses_cfg


# ---------------------------------------------------------------------------------------------------------------------
# (b) Velocity against StableDiffusionXLPipeline's own UNet call, CFG and scheduler step


def _first_step_only(pipe, i, t, callback_kwargs):
    pipe._interrupt = True  # the remaining steps are skipped; output_type='latent' returns the latents after step 0
    return {}


@pytest.fixture(scope='module')
def tiny():
    pipe = build_tiny_sdxl_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    family = get_family('sdxl')
    conditioner = family.conditioner_from_pipeline(pipe)
    assert family.latent_shape(pipe.vae, 32) == (4, 16, 16)
    return pipe, family, conditioner


def _pipeline_step(pipe, latents, steps, offset, w):
    """One step of the pipeline with DDIM (set_alpha_to_one) on timesteps ``offset + k * 1000 // steps``."""
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing='leading', steps_offset=offset,
                                               set_alpha_to_one=True, clip_sample=False)
    return pipe(PROMPTS, height=32, width=32, latents=latents.clone(), num_inference_steps=steps, guidance_scale=w,
                guidance_rescale=0.0, output_type='latent', callback_on_step_end=_first_step_only).images


@pytest.mark.parametrize('w', [4.5, 8.0])
def test_cfg_velocity_matches_a_pipeline_step(tiny, w):
    pipe, family, conditioner = tiny
    alphas = pipe.scheduler.alphas_cumprod.double()
    c = lambda t: float(alphas[t].sqrt() + (1 - alphas[t]).sqrt())  # noqa: E731
    s, s_next = (float(hand_sigma(alphas[t])) for t in (749, 249))
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))  # a flow point at s(749)
    x_t = x * torch.tensor(c(749), dtype=torch.float32)  # its DDPM point, rounded as the family rounds it
    # Timesteps [749, 249]: the pipeline runs the UNet at 749 on x_t (CFG, zero negative embeddings) and steps to 249.
    out = _pipeline_step(pipe, x_t, 2, 249, w)
    assert pipe.scheduler.timesteps.tolist() == [749, 249]
    v = family.velocity(pipe.unet, x, torch.full((2,), s), conditioner(PROMPTS), guidance=torch.full((2,), w))
    torch.testing.assert_close(c(249) * flow.euler_step(x, v, s, s_next), out, rtol=1e-5, atol=1e-5)
    v_cond = family.velocity(pipe.unet, x, torch.full((2,), s), conditioner(PROMPTS))
    assert (c(249) * flow.euler_step(x, v_cond, s, s_next) - out).abs().max() > 1e-3  # guidance matters


def test_pure_noise_velocity_gives_the_pipelines_x0_at_t999(tiny):
    pipe, family, conditioner = tiny
    alphas = pipe.scheduler.alphas_cumprod.double()
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    out = _pipeline_step(pipe, noise, 4, 249, 8.0)  # timesteps [999, 749, 499, 249]; the UNet gets the noise at 999
    assert pipe.scheduler.timesteps.tolist() == SDXL_INDICES
    # DDIM: noise = a x0 + b eps and out = a' x0 + b' eps; solve the 2x2 system for x0 by hand.
    a, b = float(alphas[999].sqrt()), float((1 - alphas[999]).sqrt())
    a2, b2 = float(alphas[749].sqrt()), float((1 - alphas[749]).sqrt())
    x0_pipe = (b * out - b2 * noise) / (b * a2 - b2 * a)
    v = family.velocity(pipe.unet, noise, torch.ones(2), conditioner(PROMPTS), guidance=torch.full((2,), 8.0))
    torch.testing.assert_close(flow.x0_from_velocity(noise, v, 1.0), x0_pipe, rtol=1e-4, atol=1e-4)


def test_time_projection_gets_float32_timesteps_under_a_bf16_input_cast(tiny):
    """FSDP mixed precision casts the UNet's floating inputs to bf16 (t = 999 -> 1000); the family hands the time
    projection its float32 timesteps back. Simulated with a root pre-hook doing that cast."""
    pipe, family, conditioner = tiny
    unet, seen = pipe.unet, []

    def cast(module, args, kwargs):  # the timestep (second positional argument) as FSDP's bf16 cast leaves it
        return (args[0], args[1].bfloat16(), *args[2:]), kwargs

    handles = [unet.register_forward_pre_hook(cast, with_kwargs=True),
               unet.time_proj.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))]
    try:
        sigma = family.index_to_sigma(torch.tensor([999, 749])).float()
        family.velocity(unet, torch.randn(2, 4, 16, 16), sigma, conditioner(PROMPTS[:2]))
    finally:
        for handle in handles:
            handle.remove()
    assert torch.tensor(999.0).bfloat16().item() == 1000.0  # what the hook undoes
    assert seen[0].dtype == torch.float32 and seen[0].tolist() == [999.0, 749.0]


def test_conditioner_is_encode_prompt_and_blocks_are_the_unet_blocks(tiny):
    pipe, family, conditioner = tiny
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, device='cpu', do_classifier_free_guidance=True)
    cond = conditioner(PROMPTS)
    assert cond.keys() == {'prompt_embeds', 'pooled_prompt_embeds'}
    torch.testing.assert_close(cond['prompt_embeds'], embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond['pooled_prompt_embeds'], pooled, rtol=0, atol=0)
    assert embeds.shape == (2, 77, 40) and pooled.shape == (2, 24)
    assert not neg.any() and not neg_pooled.any()  # force_zeros_for_empty_prompt: the unconditional branch is zeros
    unet = pipe.unet
    assert transformer_blocks(unet) == [*unet.down_blocks, unet.mid_block, *unet.up_blocks]


# ---------------------------------------------------------------------------------------------------------------------
# (c) Training with IDA + ISG + VFM, resumed bit-identically


@pytest.fixture(scope='module')
def runs(tmp_path_factory, make_trainer):
    root = tmp_path_factory.mktemp('sdxl_resume')
    base = ['model.gen_every=2']
    out = {'root': root}
    trainer, rec = make_trainer('tiny_sdxl', [*base, 'trainer.max_duration=4ba', f'trainer.save_folder={root / "a"}',
                                              'trainer.save_interval=1ba'])
    assert {type(a).__name__ for a in trainer.state.algorithms} == {
        'ImplicitDistributionAlignment', 'IntraSegmentGuidance', 'VFMDiscriminator'}
    trainer.fit()
    model = trainer.state.model
    out['a'] = {'losses': rec.losses, 'generator': {k: v.clone() for k, v in model.generator.state_dict().items()},
                'fake_score': {k: v.clone() for k, v in model.fake_score.state_dict().items()}}
    trainer.close()
    trainer, rec = make_trainer('tiny_sdxl', [*base, 'trainer.max_duration=4ba',
                                              f'trainer.load_path={root / "a" / "ep0-ba2-rank0.pt"}'])
    trainer.fit()
    model = trainer.state.model
    out['b'] = {'losses': rec.losses, 'generator': model.generator.state_dict(),
                'fake_score': model.fake_score.state_dict(), 'model': model}
    trainer.close()
    return out


def test_training_runs_every_algorithm_and_resumes_bit_identically(runs):
    a, b = runs['a'], runs['b']
    assert len(a['losses']) == 4 and b['losses'] == a['losses'][2:]
    assert all(math.isfinite(v) for loss in a['losses'] for v in loss.values())
    # gen_every 2: batches 0 and 2 step the generator with DMD, ISG and the GAN term; every batch the critic.
    for i, loss in enumerate(a['losses']):
        generator = {'loss/train/generator/dmd', 'loss/train/generator/isg', 'loss/train/generator/adversarial'}
        assert (generator <= loss.keys()) is (i % 2 == 0), (i, sorted(loss))
        assert {'loss/train/fake_score/flow_matching', 'loss/train/discriminator/hinge'} <= loss.keys()
    for name in ('generator', 'fake_score'):
        for key, value in a[name].items():
            assert torch.equal(b[name][key], value), (name, key)
    model = b['model']
    assert model.family.name == 'sdxl' and model.dmd_guidance == (8.0, 8.0)
    assert model.sigmas.tolist()[:1] == [1.0] and model.family.sigma_to_index(model.sigmas[:-1]).tolist() == \
        SDXL_INDICES


# ---------------------------------------------------------------------------------------------------------------------
# (d) Export: StableDiffusionXLPipeline against the in-repo sampler


def _pipe_images(folder: Path, seed: int = 0):
    from diffusers import DiffusionPipeline

    from senseflow_algos.export import pipeline_call_kwargs
    from senseflow_algos.sampling import seeded_default_rng

    pipe = DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe, pipe(PROMPTS, generator=seeded_default_rng(seed), output_type='pt',
                      **pipeline_call_kwargs(folder)).images


@pytest.mark.parametrize('method', ['renoise', 'euler'])
def test_export_reproduces_the_in_repo_sampler(runs, tmp_path, method):
    from senseflow_algos.export import EXPORT_INFO, export_checkpoint
    from senseflow_algos.restore import restore_student
    from senseflow_algos.sampling import sample, seeded_default_rng

    yaml, overrides = REPO / 'yamls' / 'tiny_sdxl.yaml', ['trainer.progress_bar=false', 'model.gen_every=2']
    folder = runs['root'] / 'a'
    out = export_checkpoint(folder, tmp_path / 'export', config=yaml, overrides=overrides, method=method,
                            progress=False)
    info = json.loads((out / EXPORT_INFO).read_text())
    assert info['family'] == 'sdxl' and info['pipeline_class'] == 'StableDiffusionXLPipeline'
    assert info['load_kwargs'] == {'add_watermarker': False}
    model = restore_student(folder, yaml, overrides)
    ours = sample(model, PROMPTS, rng=seeded_default_rng(0), method=method).images
    pipe, theirs = _pipe_images(out)
    assert type(pipe).__name__ == 'StableDiffusionXLPipeline' and pipe.watermark is None
    diff = (ours - theirs).abs().max().item()
    print(f'sdxl {method}: max |exported - in-repo| = {diff:.3g}')
    if method == 'renoise':
        assert type(pipe.scheduler).__name__ == 'LCMScheduler'
        assert info['call_kwargs']['timesteps'] == SDXL_INDICES
        assert diff <= 1e-5  # LCM's c_skip at t = 249 is 4e-8: no visible difference
        _, other = _pipe_images(out, seed=1)
        assert (other - theirs).abs().max() > 1e-3
    else:
        assert type(pipe.scheduler).__name__ == 'DDIMScheduler'
        assert pipe.scheduler.timesteps.tolist() == SDXL_INDICES
        # DDIM's first step from pure noise moves along the predicted epsilon, the flow Euler step along x itself
        # (module docstring). With that one step taken DDIM's way, the in-repo Euler steps reproduce the pipeline.
        assert diff > 1e-4
        assert _ddim_first_step_images(model).sub(theirs).abs().max().item() <= 1e-5


def _ddim_first_step_images(model) -> torch.Tensor:
    """The in-repo Euler sampler with its first step (sigma 1 -> s(749)) along the predicted epsilon, as DDIM."""
    from senseflow_algos.sampling import draw_noise, latents_to_images, run_sampler, seeded_default_rng

    family, net, sigmas = model.family, model.generator, model.sigmas
    cond = model.conditioner(PROMPTS)
    with torch.no_grad():
        noise = draw_noise((2, *model.latent_shape), seeded_default_rng(0))
        v = family.velocity(net, noise, torch.ones(2), cond)
        ab = float(family.alphas_cumprod[999])
        eps = flow.epsilon_from_velocity(noise, v, 1.0, ab, 1.0)  # at sigma 1 the UNet saw the noise unscaled
        s1 = float(sigmas[1])
        x = (1 - s1) * flow.x0_from_velocity(noise, v, 1.0) + s1 * eps
        latents = run_sampler(lambda y, s: family.velocity(net, y, s, cond), x, sigmas[1:], method='euler')
    return latents_to_images(family, model.vae, latents)


def test_lora_student_exports_fused_and_as_a_lora_of_the_teachers_pipeline(tmp_path):
    """A ``model.lora`` SDXL student: the fused pipeline and the teacher's StableDiffusionXLPipeline with the exported
    LoRA loaded (``load_lora_weights`` on its UNet) both give the in-repo sampler's images."""
    pytest.importorskip('peft')
    import diffusers

    from senseflow_algos.builders import build_trainer
    from senseflow_algos.config import load_config, validate_config
    from senseflow_algos.export import export_pipeline, pipeline_call_kwargs
    from senseflow_algos.export_lora import load_lora_pipeline
    from senseflow_algos.sampling import sample, seeded_default_rng

    cfg = load_config(REPO / 'yamls' / 'tiny_sdxl.yaml', [
        'trainer.progress_bar=false', 'trainer.max_duration=2ba', 'algorithms.vfm_discriminator=null',
        f'trainer.save_folder={tmp_path / "run"}', 'trainer.save_interval=2ba', 'model.gen_every=1',
        'model.lora.rank=4', 'model.lora.alpha=8', 'optimizer.lr=1e-2'])
    validate_config(cfg)
    trainer = build_trainer(cfg)
    trainer.fit()
    trainer.close()
    model = trainer.state.model.eval()
    out = export_pipeline(model, tmp_path / 'export')
    ours = sample(model, PROMPTS, rng=seeded_default_rng(0)).images
    scheduler = diffusers.EulerDiscreteScheduler.from_config(model.scheduler_config)
    model.family.build_pipeline(model.teacher, model.vae, model.conditioner, scheduler).save_pretrained(
        tmp_path / 'teacher')
    for pipe in (load_lora_pipeline(tmp_path / 'teacher', out), diffusers.DiffusionPipeline.from_pretrained(str(out))):
        pipe.set_progress_bar_config(disable=True)
        theirs = pipe(PROMPTS, generator=seeded_default_rng(0), output_type='pt', **pipeline_call_kwargs(out)).images
        diff = (ours - theirs).abs().max().item()
        print(f'sdxl lora ({type(pipe.unet).__name__} {"peft" if hasattr(pipe.unet, "peft_config") else "fused"}): '
              f'max |pipeline - in-repo| = {diff:.3g}')
        assert diff <= 1e-5


def test_export_refuses_what_it_cannot_reproduce():
    from senseflow_algos.models.families import ExportError

    family = SDXLFamily()
    config = dict(build_tiny_sdxl_pipeline().scheduler.config)
    six = flow.append_zero(family.anchors((16, 16), 6))
    family.export_scheduler(config, six, (4, 16, 16), 'renoise')  # LCM takes any timesteps
    with pytest.raises(ExportError, match='not x0'):
        family.export_scheduler(config, six, (4, 16, 16), 'euler')
    with pytest.raises(ExportError, match='not DDPM grid points'):
        family.export_scheduler(config, torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64), (4, 16, 16), 'renoise')
    with pytest.raises(ExportError, match="prediction_type='v_prediction'"):
        family.export_scheduler({**config, 'prediction_type': 'v_prediction'},
                                flow.append_zero(family.anchors((16, 16))), (4, 16, 16), 'renoise')


# ---------------------------------------------------------------------------------------------------------------------
# (e) Loading with from_pretrained from a saved tiny pipeline folder


def test_load_components_from_a_saved_pipeline_folder(tmp_path):
    pipe = build_tiny_sdxl_pipeline(seed=3)
    pipe.save_pretrained(tmp_path / 'tiny-sdxl', safe_serialization=True)
    family = get_family('sdxl')
    comps = family.load_components(str(tmp_path / 'tiny-sdxl'))
    for got, want in ((comps.teacher, pipe.unet), (comps.student, pipe.unet), (comps.vae, pipe.vae)):
        state = want.state_dict()
        assert got.state_dict().keys() == state.keys()
        assert all(torch.equal(v, state[k]) for k, v in got.state_dict().items())
    assert comps.student is not comps.teacher and comps.scheduler_config['_class_name'] == 'EulerDiscreteScheduler'
    ours = comps.conditioner(PROMPTS)
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device='cpu', do_classifier_free_guidance=False)
    torch.testing.assert_close(ours['prompt_embeds'], embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours['pooled_prompt_embeds'], pooled, rtol=0, atol=0)
    # The lean start's meta build: same parameter names and shapes, no memory.
    meta = family.load_components(str(tmp_path / 'tiny-sdxl'), transformers_on_meta=True, text_encoders=False)
    assert all(p.is_meta for p in meta.teacher.parameters())
    assert {k: v.shape for k, v in meta.teacher.state_dict().items()} == \
        {k: v.shape for k, v in pipe.unet.state_dict().items()}
    assert all(p.is_meta for p in meta.student.parameters()) and meta.conditioner is None
    # A v-prediction teacher is refused, naming the key.
    bad = tmp_path / 'v-pred'
    shutil.copytree(tmp_path / 'tiny-sdxl', bad)
    cfg_path = bad / 'scheduler' / 'scheduler_config.json'
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, 'prediction_type': 'v_prediction'}))
    with pytest.raises(ValueError, match="prediction_type='v_prediction'"):
        family.load_components(str(bad))


def test_planner_architecture_is_sdxl_base():
    from senseflow_algos.plan.architectures import architecture_folder, meta_components

    folder = architecture_folder('stabilityai/stable-diffusion-xl-base-1.0')
    assert folder.name == 'sdxl-base'
    family = get_family('sdxl')
    comps = meta_components(family, folder, torch.float32, torch.bfloat16, torch.bfloat16)
    # Published parameter counts of SDXL base: UNet 2.567B, VAE 83.7M, CLIP-L 123.1M, CLIP-G 694.7M.
    counts = {name: sum(p.numel() for p in getattr(comps, name).parameters()) for name in ('teacher', 'vae')}
    assert counts == {'teacher': 2_567_463_684, 'vae': 83_653_863}
    assert sum(p.numel() for p in comps.conditioner.text_encoder_2.parameters()) == 694_659_840
    lengths = family.planner_text_lengths(family.max_sequence_length)
    cond = family.planner_conditioning(comps.teacher.config, lengths, 2, torch.bfloat16)
    assert cond['prompt_embeds'].shape == (2, 77, 2048) and cond['pooled_prompt_embeds'].shape == (2, 1280)
    assert family.pooled_text_dim(comps.teacher.config) == 1280  # CLIP-G's projection_dim
    assert len(transformer_blocks(comps.teacher)) == 3 + 1 + 3


@pytest.mark.slow
def test_sdxl_8gpu_run_file_plans_and_fits_80gb():
    """The planner runs the project's passes on the SDXL base architecture (UNet blocks as FSDP units, CFG teacher,
    VFM heads on CLIP-G's pooled width) for the 8-GPU run file's config, and it fits an 80 GB GPU."""
    from senseflow_algos.config import load_config
    from senseflow_algos.plan.planner import Hardware, plan_run

    cfg = load_config(REPO / 'yamls' / 'sdxl.yaml', ['dataset.remote=/nonexistent'])
    plan = plan_run(cfg, Hardware(gpus=8))
    assert plan.fits, plan.problems
