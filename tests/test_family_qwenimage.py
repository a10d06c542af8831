"""The ``qwenimage`` family against diffusers' own ``QwenImagePipeline`` on a tiny random-weight pipeline of the real
classes: the true-CFG velocity, the latent normalisation, loading from a saved folder, export, and a resumable
training run with IDA, ISG and the VFM discriminator."""

import copy
import json

import pytest
import torch

from senseflow_algos import flow
from senseflow_algos.models.families import get_family
from senseflow_algos.models.families.qwenimage import QWEN_SCHEDULER_CONFIG, QwenImageFamily

PROMPTS = ['a red circle above a blue square', 'a star']  # different lengths: the second is padded and masked
RES = 32  # 16x16 latents (tiny VAE factor 2)


@pytest.fixture(scope='module')
def family() -> QwenImageFamily:
    return get_family('qwenimage')


@pytest.fixture(scope='module')
def pipe(family):
    return family.tiny_pipeline(seed=0)


@pytest.fixture(scope='module')
def cond(family, pipe):
    return family.conditioner_from_pipeline(pipe)(PROMPTS)


def _one_step(pipe, x, sigma, **kwargs):
    """The pipeline's own denoising step from ``x`` at ``sigma`` to 0 (Euler): returns ``x - sigma * v_pipeline``.

    A scheduler without shift (static shift 1, no dynamic shift, no terminal stretch) makes ``sigmas=[sigma]`` step
    exactly from ``sigma`` to 0.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = copy.copy(pipe)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler()
    pipe.set_progress_bar_config(disable=True)
    b, c, h, w = x.shape
    out = pipe(PROMPTS, num_inference_steps=1, sigmas=[sigma], latents=flow.pack_latents(x), height=RES, width=RES,
               output_type='latent', **kwargs).images
    return flow.unpack_latents(out, c, h, w)


def test_conditioner_matches_the_pipeline_encode_prompt(family, pipe, cond):
    embeds, mask = pipe.encode_prompt(PROMPTS, device='cpu', max_sequence_length=512)
    torch.testing.assert_close(cond['prompt_embeds'], embeds, rtol=0, atol=0)
    assert mask is not None and torch.equal(cond['prompt_embeds_mask'], mask)
    assert mask[0].all() and not mask[1].all()  # the short prompt is zero-padded and masked
    assert (cond['prompt_embeds'][1][mask[1] == 0] == 0).all()
    neg, _ = pipe.encode_prompt([' '] * 2, device='cpu', max_sequence_length=512)
    torch.testing.assert_close(cond['negative_prompt_embeds'], neg, rtol=0, atol=0)
    assert torch.equal(cond['negative_prompt_embeds_mask'], torch.ones(neg.shape[:2], dtype=torch.long))
    # The pooled text condition of the VFM discriminator: the mean over each prompt's own tokens.
    n = int(mask[1].sum())
    torch.testing.assert_close(cond['pooled_prompt_embeds'][1], embeds[1, :n].mean(0))


@pytest.mark.parametrize('scale', [4.0, 1.5])
def test_true_cfg_velocity_matches_the_pipeline_step(family, pipe, cond, scale):
    torch.manual_seed(1)
    x = torch.randn(2, *family.latent_shape(pipe.vae, RES))
    sigma = 0.7
    want = _one_step(pipe, x, sigma, negative_prompt=' ', true_cfg_scale=scale)
    with torch.no_grad():
        v = family.velocity(pipe.transformer, x, torch.full((2,), sigma), cond, torch.full((2,), scale))
    got = flow.x0_from_velocity(x, v, sigma)
    diff = (got - want).abs().max().item()
    print(f'true CFG {scale}: max |ours - QwenImagePipeline step| = {diff:.3g}')
    assert diff < 1e-5
    # The guided prediction differs from the plain one, and the plain one is the pipeline's without CFG.
    plain = _one_step(pipe, x, sigma, true_cfg_scale=1.0)
    with torch.no_grad():
        v_plain = family.velocity(pipe.transformer, x, torch.full((2,), sigma), cond)
    assert (flow.x0_from_velocity(x, v_plain, sigma) - plain).abs().max().item() < 1e-5
    assert (plain - want).abs().max().item() > 1e-3


def test_per_sample_cfg_scales(family, pipe, cond):
    """Each sample is guided by its own scale, as two pipeline runs with one scale each."""
    torch.manual_seed(2)
    x = torch.randn(2, *family.latent_shape(pipe.vae, RES))
    with torch.no_grad():
        v = family.velocity(pipe.transformer, x, torch.tensor([0.5, 0.5]), cond, torch.tensor([3.0, 5.0]))
    got = flow.x0_from_velocity(x, v, 0.5)
    for i, scale in enumerate((3.0, 5.0)):
        want = _one_step(pipe, x, 0.5, negative_prompt=' ', true_cfg_scale=scale)
        assert (got[i] - want[i]).abs().max().item() < 1e-5


def test_padding_does_not_change_the_velocity(family, pipe, cond):
    """Precomputed embeddings padded further (zeros, mask 0) give the same prediction: the padding is masked."""
    torch.manual_seed(3)
    x = torch.randn(2, *family.latent_shape(pipe.vae, RES))
    padded = dict(cond)
    for key in ('prompt_embeds', 'negative_prompt_embeds'):
        e, m = cond[key], cond[f'{key}_mask']
        padded[key] = torch.cat([e, e.new_zeros(e.shape[0], 7, e.shape[2])], 1)
        padded[f'{key}_mask'] = torch.cat([m, m.new_zeros(m.shape[0], 7)], 1)
    sigma, scale = torch.full((2,), 0.6), torch.full((2,), 4.0)
    with torch.no_grad():
        a = family.velocity(pipe.transformer, x, sigma, cond, scale)
        b = family.velocity(pipe.transformer, x, sigma, padded, scale)
    assert (a - b).abs().max().item() < 1e-5


def test_latents_match_the_pipeline_normalisation(family, pipe):
    """encode: the VAE's posterior mode normalised by the config's mean / std; decode: QwenImagePipeline's own."""
    from senseflow_algos.sampling import latents_to_images

    vae = pipe.vae
    assert family.latent_shape(vae, RES) == (4, 16, 16)
    assert family.latent_shape(vae, 36) == (4, 18, 18) and family.latent_shape(vae, 38) == (4, 18, 18)
    torch.manual_seed(4)
    pixels = torch.rand(2, 3, RES, RES) * 2 - 1
    with torch.no_grad():
        lat = family.encode_images(vae, pixels)
        raw = vae.encode(pixels[:, :, None]).latent_dist.mode()[:, :, 0]
    assert lat.shape == (2, 4, 16, 16) and lat.dtype == torch.float32
    mean = torch.tensor([0.1, -0.2, 0.3, -0.05]).view(1, 4, 1, 1)  # the tiny VAE's config
    std = torch.tensor([0.5, 2.0, 1.5, 0.8]).view(1, 4, 1, 1)
    torch.testing.assert_close(lat, (raw - mean) / std, rtol=1e-6, atol=1e-6)
    # Decoding: the pipeline's own path from the same latents (a transformer predicting 0 leaves them unchanged).
    from diffusers import FlowMatchEulerDiscreteScheduler

    p = copy.copy(pipe)
    p.scheduler = FlowMatchEulerDiscreteScheduler()  # one step of Qwen-Image's would stretch [1] to 0 / 0
    p.set_progress_bar_config(disable=True)
    handle = p.transformer.register_forward_hook(lambda m, a, out: (torch.zeros_like(out[0]),))
    try:
        theirs = p(PROMPTS, num_inference_steps=1, latents=flow.pack_latents(lat), height=RES, width=RES,
                   true_cfg_scale=1.0, output_type='pt').images
    finally:
        handle.remove()
    ours = latents_to_images(family, vae, lat)
    assert ours.shape == (2, 3, RES, RES)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    # Decoding is differentiable (the VFM discriminator's generator term).
    lat = lat.clone().requires_grad_(True)
    family.decode_latents(vae, lat).sum().backward()
    assert lat.grad is not None and lat.grad.abs().sum() > 0


def test_schedule(family):
    # 1024x1024: 64x64 packed tokens; mu = 0.5 + 0.4 * (4096 - 256) / (8192 - 256).
    mu = 0.5 + 0.4 * 3840 / 7936
    assert family.mu((128, 128)) == pytest.approx(mu, abs=1e-12)
    e = torch.tensor(mu, dtype=torch.float64).exp()
    want = torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64)
    want = e / (e + 1 / want - 1)
    torch.testing.assert_close(family.anchors((128, 128), 4), want, rtol=0, atol=1e-12)
    assert [round(float(a), 3) for a in want] == [1.0, 0.857, 0.667, 0.4]
    # QwenImagePipeline's scheduler at 1024 without the terminal stretch steps through the anchors by default.
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(**{**QWEN_SCHEDULER_CONFIG, 'shift_terminal': None})
    sched.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=mu)
    torch.testing.assert_close(sched.sigmas[:-1].double(), want, rtol=0, atol=1e-6)
    assert family.index_to_sigma(857).item() == pytest.approx(0.857)
    assert family.sigma_to_index(torch.tensor([0.857, 0.8572, 0.0], dtype=torch.float64)).tolist() == [857, 857, 0]
    assert family.defaults.dmd_guidance == (3.0, 5.0) and family.defaults.isg_guidance == (4.0, 4.0)
    assert family.uses_cfg and family.defaults.isg_margin == 20
    torch.testing.assert_close(family.adversarial_weight(torch.tensor([1.0, 0.4])), torch.tensor([0.0, 0.36]))
    rng = torch.Generator().manual_seed(0)
    s = family.dmd_sigma(4096, rng)
    assert 0 < float(s.min()) and float(s.max()) < 1 and abs(float(s.mean()) - 0.5) < 0.02
    with pytest.raises(ValueError, match='max_sequence_length'):
        get_family('qwenimage', max_sequence_length=2048)


def test_transformer_blocks_are_enumerated(pipe):
    from senseflow_algos.models.blocks import transformer_blocks

    blocks = transformer_blocks(pipe.transformer)
    assert len(blocks) == 2 and type(blocks[0]).__name__ == 'QwenImageTransformerBlock'


def test_from_pretrained_loads_a_saved_pipeline(family, pipe, cond, tmp_path):
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    comp = family.load_components(str(tmp_path))
    assert type(comp.teacher).__name__ == 'QwenImageTransformer2DModel'
    assert type(comp.vae).__name__ == 'AutoencoderKLQwenImage'
    for key, value in pipe.transformer.state_dict().items():
        assert torch.equal(comp.teacher.state_dict()[key], value), key
        assert torch.equal(comp.student.state_dict()[key], value), key
    assert comp.student is not comp.teacher
    assert comp.scheduler_config['shift_terminal'] == 0.02 and comp.scheduler_config['max_shift'] == 0.9
    loaded = comp.conditioner(PROMPTS)
    for key, value in cond.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
    meta = family.load_components(str(tmp_path), torch_dtype=torch.bfloat16, transformers_on_meta=True,
                                  text_encoders=False, vae_encoder=False)
    assert meta.conditioner is None and meta.vae.encoder is None
    assert all(p.is_meta for p in meta.teacher.parameters()) and all(p.is_meta for p in meta.student.parameters())
    assert next(meta.student.parameters()).dtype == torch.bfloat16
    assert meta.teacher.state_dict().keys() == pipe.transformer.state_dict().keys()
    # A VAE without its encoder still decodes.
    with torch.no_grad():
        assert family.decode_latents(meta.vae, torch.zeros(1, 4, 16, 16)).shape == (1, 3, RES, RES)


@pytest.fixture(scope='module')
def model():
    from senseflow_algos.models.factory import build_dmd_model

    m = build_dmd_model('qwenimage', resolution=RES, tiny=True, seed=0)
    torch.manual_seed(5)
    with torch.no_grad():  # a generator that differs from the teacher
        for p in m.generator.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return m


@pytest.mark.parametrize('method', ['renoise', 'euler'])
def test_export_reproduces_the_in_repo_sampler(model, tmp_path, method):
    from diffusers import DiffusionPipeline

    from senseflow_algos.export import (
        EXPORT_INFO,
        export_pipeline,
        pipeline_call_kwargs,
        sampling_components_from_pipeline,
    )
    from senseflow_algos.sampling import sample, seeded_default_rng

    out = export_pipeline(model, tmp_path / 'export', method=method)
    pipe = DiffusionPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == 'QwenImagePipeline'
    assert pipe.scheduler.config.stochastic_sampling is (method == 'renoise')
    assert pipe.scheduler.config.shift_terminal is None
    call = pipeline_call_kwargs(out)
    assert call['true_cfg_scale'] == 1.0 and call['height'] == RES
    ours = sample(model, PROMPTS, rng=seeded_default_rng(0), method=method).images
    theirs = pipe(PROMPTS, generator=seeded_default_rng(0), output_type='pt', **call).images
    torch.testing.assert_close(pipe.scheduler.sigmas.double(), model.sigmas, rtol=0, atol=1e-6)
    diff = (ours - theirs).abs().max().item()
    print(f'{method}: max |exported QwenImagePipeline - in-repo sampler| = {diff:.3g}')
    assert diff <= 1e-5
    # Without sigmas=, the pipeline's default linspace(1, 1/n, n) lands on the same anchors (mu at this size).
    rest = {k: v for k, v in call.items() if k != 'sigmas'}
    again = pipe(PROMPTS, generator=seeded_default_rng(0), output_type='pt', **rest).images
    assert (again - ours).abs().max().item() <= 1e-5
    other = pipe(PROMPTS, generator=seeded_default_rng(1), output_type='pt', **call).images
    assert (other - theirs).abs().max().item() > 1e-3
    info = json.loads((out / EXPORT_INFO).read_text())
    assert info['family'] == 'qwenimage' and len(info['anchors']) == 4
    # The exported pipeline's modules through the in-repo sampler (what eval.py runs for exported students).
    parts = sampling_components_from_pipeline(pipe, info)
    assert (sample(parts, PROMPTS, rng=seeded_default_rng(0), method=method).images - ours).abs().max() <= 1e-5


# -- training, resumed ------------------------------------------------------------------------------------------------

BASE = ['model.gen_every=2']


def _state(trainer) -> dict:
    m = trainer.state.model
    nets = {name: {k: v.detach().clone() for k, v in getattr(m, name).state_dict().items()}
            for name in ('generator', 'fake_score')}
    heads = [n for n, _ in m.named_children() if 'disc' in n and 'backbone' not in n]
    for name in heads:
        nets[name] = {k: v.detach().clone() for k, v in getattr(m, name).state_dict().items()}
    return nets


def test_training_with_all_algorithms_resumes_bit_identically(make_trainer, tmp_path):
    a, rec_a = make_trainer('tiny_qwenimage', [*BASE, 'trainer.max_duration=4ba', f'trainer.save_folder={tmp_path / "a"}',
                                               'trainer.save_interval=2ba'])
    a.fit()
    final_a = _state(a)
    a.close()
    keys = set().union(*rec_a.losses)
    print('losses logged:', sorted(keys))
    for term in ('dmd', 'isg', 'flow_matching', 'hinge'):
        assert any(term in k for k in keys), term
    assert any('disc' in k for k in final_a), 'the VFM discriminator heads are part of the model'
    _export_from_checkpoint_matches_the_restored_student(tmp_path / 'a', tmp_path / 'export')
    b, rec_b = make_trainer('tiny_qwenimage', [*BASE, 'trainer.max_duration=4ba',
                                               f'trainer.load_path={tmp_path / "a" / "ep0-ba2-rank0.pt"}'])
    assert int(b.state.model.batches_seen) == 2
    b.fit()
    final_b = _state(b)
    b.close()
    assert rec_b.batches_seen_history == [3, 4]
    assert rec_b.losses == rec_a.losses[2:]
    assert final_a.keys() == final_b.keys()
    for name in final_a:
        for key, value in final_a[name].items():
            assert torch.equal(final_b[name][key], value), f'{name}.{key}'


def test_shipped_architecture_and_planner_conditioning(family):
    """The shipped Qwen/Qwen-Image configs build the 20.43B transformer; planner conditioning runs a meta CFG query."""
    from pathlib import Path

    from diffusers import QwenImageTransformer2DModel

    import senseflow_algos.plan as plan

    folder = Path(plan.__file__).parent / 'architectures' / 'qwen-image'
    with torch.device('meta'):
        net = QwenImageTransformer2DModel.from_config(QwenImageTransformer2DModel.load_config(folder / 'transformer'))
    assert sum(p.numel() for p in net.parameters()) == 20_430_401_088
    # The config's unused pooled_projection_dim (768) is not the width of the pooled text condition.
    assert net.config.pooled_projection_dim == 768 and family.pooled_text_dim(net.config) == 3584
    lengths = family.planner_text_lengths(512)
    assert lengths == {'text_encoder': 512 + 39}
    cond = family.planner_conditioning(net.config, lengths, 2, torch.bfloat16)
    assert cond['prompt_embeds'].shape == (2, 512, 3584) and cond['prompt_embeds_mask'].shape == (2, 512)
    with torch.device('meta'):
        small = QwenImageTransformer2DModel(num_layers=1, joint_attention_dim=3584)
    x = torch.empty(2, 16, 128, 128, device='meta')
    v = family.velocity(small, x, torch.full((2,), 0.5, device='meta'), cond, torch.full((2,), 4.0, device='meta'))
    assert v.shape == x.shape and v.is_meta


def test_packing_is_the_pipeline_packing():
    from diffusers import QwenImagePipeline

    x = torch.randn(2, 4, 6, 8)
    tokens = flow.pack_latents(x)
    assert torch.equal(tokens, QwenImagePipeline._pack_latents(x, 2, 4, 6, 8))
    # The pipeline unpacks to (B, C, 1, H, W) for the VAE, from the pixel size (vae_scale_factor 2 here).
    assert torch.equal(flow.unpack_latents(tokens, 4, 6, 8), QwenImagePipeline._unpack_latents(tokens, 12, 16, 2)[:, :, 0])


def _export_from_checkpoint_matches_the_restored_student(run_folder, out):
    """``python export.py``'s path: the student restored from the run's last checkpoint, exported, sampled."""
    from diffusers import DiffusionPipeline

    from senseflow_algos.export import export_checkpoint, pipeline_call_kwargs
    from senseflow_algos.restore import restore_student
    from senseflow_algos.sampling import sample, seeded_default_rng
    from tests.conftest import YAMLS

    config, overrides = YAMLS / 'tiny_qwenimage.yaml', [*BASE, 'algorithms.vfm_discriminator=null']
    export_checkpoint(run_folder, out, config=config, overrides=overrides, progress=False)
    student = restore_student(run_folder, config, overrides)
    ours = sample(student, PROMPTS, rng=seeded_default_rng(0)).images
    pipe = DiffusionPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPTS, generator=seeded_default_rng(0), output_type='pt', **pipeline_call_kwargs(out)).images
    diff = (ours - theirs).abs().max().item()
    print(f'checkpoint export: max |exported - restored student| = {diff:.3g}')
    assert diff <= 1e-5
