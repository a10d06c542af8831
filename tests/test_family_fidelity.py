"""The teacher families against independent references: the GAN weight per anchor against diffusers' scheduler and
the method notes, FLUX's anchor indices against the reference code's constants, the SD 3.5 / FLUX velocities against
one step of the diffusers pipelines themselves, and the timesteps every network receives (float32, as the pipelines
pass them), also under FSDP2 mixed precision.

Expected values come from diffusers (scheduler sigmas, pipeline steps, its packing helpers), the method notes
(``/work/shared/reference/senseflow-method.md`` sections 1.5, 1.7) or a hand derivation written here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

from senseflow_algos.models.families import FluxConditioner, FluxFamily, SD35Conditioner, SD35Family
from senseflow_algos.models.tiny import build_tiny_flux_pipeline, build_tiny_sd3_pipeline

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ['a red circle above a blue square', 'a small green star']
TOKENS = 16  # T5 tokens, the same for our conditioners and the pipeline calls

#: Notes 1.7: the reference's SD 3.5 anchor indices and the FLUX code's hard-coded timesteps.
SD35_INDICES = [999, 749, 499, 249]
FLUX_REFERENCE_TIMESTEPS = [1000, 904, 759, 512]


def shift3(s):
    """SD 3.5's static shift by hand: 3s / (1 + 2s)."""
    return 3 * s / (1 + 2 * s)


def unshift3(sigma):
    """Its inverse by hand: s = sigma / (3 - 2 sigma)."""
    return sigma / (3 - 2 * sigma)


# ---------------------------------------------------------------------------------------------------------------------
# GAN weight per anchor (notes 1.5)


def test_sd35_adversarial_weight_is_the_scheduler_sigma_squared_at_the_anchor_index():
    # The reference SD 3.5 code: scheduler.sigmas[t_idx] ** 2 with the unflipped shift-3 scheduler sigmas.
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    expected = scheduler.sigmas[SD35_INDICES].double()**2
    family = SD35Family()
    assert family.adversarial_weighting == 'scheduler_sigma_squared'
    notes_anchors = torch.tensor([1.0, 0.9, 0.75, 0.5])  # notes 1.7, for these indices
    for sigma in (notes_anchors, family.anchors((128, 128)).float()):
        torch.testing.assert_close(family.adversarial_weight(sigma).double(), expected, atol=1e-6, rtol=0)
    # The notes' rounded values, and the quirk: it is not (1 - sigma)^2 = [0, .01, .0625, .25].
    torch.testing.assert_close(expected.float(), torch.tensor([0.0, 0.251, 0.564, 0.811]), atol=1e-3, rtol=0)
    # The paper's signal power is still selectable.
    paper = SD35Family(adversarial_weighting='signal_power').adversarial_weight(notes_anchors)
    torch.testing.assert_close(paper, torch.tensor([0.0, 0.01, 0.0625, 0.25]), atol=1e-6, rtol=0)


def test_flux_adversarial_weight_is_signal_power_at_its_anchors():
    family = FluxFamily()
    assert family.adversarial_weighting == 'signal_power'
    weights = family.adversarial_weight(family.anchors((128, 128)).float())
    torch.testing.assert_close(weights, torch.tensor([0.0, 0.0092, 0.058, 0.238]), atol=1e-3, rtol=0)  # notes 1.5
    at_reference = family.adversarial_weight(torch.tensor([1.0, 0.904, 0.759, 0.512]))
    torch.testing.assert_close(at_reference, torch.tensor([0.0, 0.096**2, 0.241**2, 0.488**2]), atol=1e-6, rtol=0)


def test_adversarial_weighting_is_validated_naming_the_key():
    with pytest.raises(ValueError, match=r"model\.family_kwargs\.adversarial_weighting='scheduler_sigma_squared' is "
                       r"not available for family 'flux'; choose one of \['signal_power'\]"):
        FluxFamily(adversarial_weighting='scheduler_sigma_squared')
    with pytest.raises(ValueError, match=r"adversarial_weighting='alpha'.*'sd35'"):
        SD35Family(adversarial_weighting='alpha')


# ---------------------------------------------------------------------------------------------------------------------
# Anchors (notes 1.7)


def test_flux_anchor_indices_are_the_reference_constants():
    family = FluxFamily()
    anchors = family.anchors((128, 128))  # 1024 px: 64 x 64 packed tokens
    assert family.sigma_to_index(anchors).tolist() == FLUX_REFERENCE_TIMESTEPS
    torch.testing.assert_close(anchors, torch.tensor(FLUX_REFERENCE_TIMESTEPS, dtype=torch.float64) / 1000,
                               atol=1e-3, rtol=0)
    # ... and the sigmas themselves are what FluxPipeline's default 4 steps use at 1024 px (mu = max_shift = 1.15).
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    scheduler.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=1.15)
    torch.testing.assert_close(anchors.float(), scheduler.sigmas[:4], atol=1e-6, rtol=0)


def test_sd35_anchor_indices_are_the_reference_constants():
    family = SD35Family()
    anchors = family.anchors((128, 128))
    assert family.sigma_to_index(anchors).tolist() == SD35_INDICES
    # The reference reads flip(scheduler.sigmas)[idx].
    flipped = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).sigmas.flip(0)
    torch.testing.assert_close(anchors.float(), flipped[SD35_INDICES], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Velocity against one step of the diffusers pipelines (fp32)


def _first_step_only(pipe, i, t, callback_kwargs):
    pipe._interrupt = True  # the remaining steps are skipped; output_type='latent' returns the latents after step 0
    return {}


@pytest.mark.parametrize('w', [4.5, 7.0])
def test_sd35_cfg_velocity_matches_one_stable_diffusion_3_pipeline_step(w):
    pipe = build_tiny_sd3_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    family = SD35Family()
    conditioner = SD35Conditioner(pipe.text_encoder, pipe.tokenizer, pipe.text_encoder_2, pipe.tokenizer_2,
                                 pipe.text_encoder_3, pipe.tokenizer_3, max_sequence_length=TOKENS)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))  # 32 px through a 2x VAE
    sigma, sigma_next = 0.75, 0.5
    # The pipeline shifts the sigmas it is given (shift 3): pass the pre-shift values. Its unconditional branch is the
    # empty negative prompt; latents go in and out unscaled with output_type='latent'.
    out = pipe(PROMPTS, height=32, width=32, latents=x.clone(), sigmas=[unshift3(sigma), unshift3(sigma_next)],
               guidance_scale=w, output_type='latent', max_sequence_length=TOKENS,
               callback_on_step_end=_first_step_only).images
    torch.testing.assert_close(pipe.scheduler.sigmas[:2], torch.tensor([sigma, sigma_next]), atol=1e-7, rtol=0)
    v = family.velocity(pipe.transformer, x, torch.full((2,), sigma), conditioner(PROMPTS), guidance=torch.full((2,), w))
    torch.testing.assert_close(x + (sigma_next - sigma) * v, out, atol=1e-5, rtol=1e-5)
    # Guidance matters at this tolerance: the unguided (conditional) velocity is far from it.
    v_cond = family.velocity(pipe.transformer, x, torch.full((2,), sigma), conditioner(PROMPTS))
    assert (x + (sigma_next - sigma) * v_cond - out).abs().max() > 1e-3


def test_flux_guided_velocity_matches_one_flux_pipeline_step():
    pipe = build_tiny_flux_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    family = FluxFamily()
    conditioner = FluxConditioner(pipe.text_encoder, pipe.tokenizer, pipe.text_encoder_2, pipe.tokenizer_2,
                                  max_sequence_length=TOKENS)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    packed = FluxPipeline._pack_latents(x, 2, 4, 16, 16)  # diffusers' own packing
    w = 3.5
    out = pipe(PROMPTS, height=32, width=32, latents=packed, sigmas=[0.8, 0.6], guidance_scale=w,
               output_type='latent', max_sequence_length=TOKENS, callback_on_step_end=_first_step_only).images
    sigma, sigma_next = (float(s) for s in pipe.scheduler.sigmas[:2])  # after FLUX's resolution shift
    assert 0.6 < sigma_next < sigma < 1.0
    v = family.velocity(pipe.transformer, x, torch.full((2,), sigma), conditioner(PROMPTS),
                        guidance=torch.full((2,), w))
    expected = FluxPipeline._unpack_latents(out, 32, 32, pipe.vae_scale_factor)
    torch.testing.assert_close(x + (sigma_next - sigma) * v, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Timesteps stay float32 for a bf16 network


def _record_kwargs(module, store):
    return module.register_forward_pre_hook(lambda m, args, kwargs: store.append(dict(kwargs)), with_kwargs=True)


def test_sd35_bf16_teacher_gets_the_pipeline_float32_timestep():
    pipe = build_tiny_sd3_pipeline(seed=0)
    teacher = pipe.transformer.to(torch.bfloat16)
    cond = SD35Conditioner(pipe.text_encoder, pipe.tokenizer, pipe.text_encoder_2, pipe.tokenizer_2,
                          pipe.text_encoder_3, pipe.tokenizer_3, max_sequence_length=TOKENS)(PROMPTS)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    calls, embedded, outputs = [], [], []
    _record_kwargs(teacher, calls)
    teacher.time_text_embed.register_forward_pre_hook(lambda m, args: embedded.append(args[0].clone()))
    teacher.register_forward_hook(lambda m, args, out: outputs.append(out[0].clone()))
    SD35Family().velocity(teacher, x, torch.full((2,), 0.75), cond, guidance=torch.full((2,), 5.0))
    (kwargs,) = calls
    expected_t = torch.full((4,), 750.0)  # sigma * 1000 for the uncond + cond halves, float32 as the scheduler's
    assert kwargs['timestep'].dtype == torch.float32 and torch.equal(kwargs['timestep'], expected_t)
    assert embedded[0].dtype == torch.float32 and torch.equal(embedded[0], expected_t)
    # The transformer output equals StableDiffusion3Pipeline's call: latents and embeddings in the transformer's dtype,
    # [negative; positive] batched, the scheduler's float32 timestep expanded.
    t = FlowMatchEulerDiscreteScheduler(shift=3.0)
    t.set_timesteps(sigmas=[unshift3(0.75)])
    assert float(t.timesteps[0]) == 750.0
    with torch.no_grad():
        reference = teacher(hidden_states=torch.cat([x, x]).to(torch.bfloat16), timestep=t.timesteps[0].expand(4),
                            encoder_hidden_states=torch.cat([cond['negative_prompt_embeds'],
                                                             cond['prompt_embeds']]).to(torch.bfloat16),
                            pooled_projections=torch.cat([cond['negative_pooled_prompt_embeds'],
                                                          cond['pooled_prompt_embeds']]).to(torch.bfloat16),
                            return_dict=False)[0]
        # The old behaviour (timestep cast to bf16: 750 -> 752) gives another output: the check can fail.
        cast = teacher(hidden_states=torch.cat([x, x]).to(torch.bfloat16), timestep=expected_t.to(torch.bfloat16),
                       encoder_hidden_states=torch.cat([cond['negative_prompt_embeds'],
                                                        cond['prompt_embeds']]).to(torch.bfloat16),
                       pooled_projections=torch.cat([cond['negative_pooled_prompt_embeds'],
                                                     cond['pooled_prompt_embeds']]).to(torch.bfloat16),
                       return_dict=False)[0]
    assert float(expected_t.to(torch.bfloat16)[0]) == 752.0
    assert torch.equal(outputs[0], reference)
    assert not torch.equal(outputs[0], cast)


def test_flux_bf16_teacher_gets_float32_sigma_and_guidance_as_flux_pipeline_passes_them():
    pipe = build_tiny_flux_pipeline(seed=0)
    teacher = pipe.transformer.to(torch.bfloat16)
    cond = FluxConditioner(pipe.text_encoder, pipe.tokenizer, pipe.text_encoder_2, pipe.tokenizer_2,
                           max_sequence_length=TOKENS)(PROMPTS)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    calls, outputs = [], []
    _record_kwargs(teacher, calls)
    teacher.register_forward_hook(lambda m, args, out: outputs.append(out[0].clone()))
    FluxFamily().velocity(teacher, x, torch.full((2,), 0.75), cond, guidance=torch.full((2,), 3.5))
    (kwargs,) = calls
    # FluxPipeline passes timestep / 1000 from the scheduler's float32 timesteps, and float32 guidance.
    assert kwargs['timestep'].dtype == torch.float32 and torch.equal(kwargs['timestep'], torch.full((2,), 750.0) / 1000)
    assert kwargs['guidance'].dtype == torch.float32 and torch.equal(kwargs['guidance'], torch.full((2,), 3.5))
    with torch.no_grad():
        reference = teacher(
            hidden_states=FluxPipeline._pack_latents(x, 2, 4, 16, 16).to(torch.bfloat16),
            timestep=torch.full((2,), 750.0) / 1000, guidance=torch.full([1], 3.5, dtype=torch.float32).expand(2),
            pooled_projections=cond['pooled_prompt_embeds'].to(torch.bfloat16),
            encoder_hidden_states=cond['prompt_embeds'].to(torch.bfloat16),
            txt_ids=torch.zeros(TOKENS, 3, dtype=torch.bfloat16),
            img_ids=FluxPipeline._prepare_latent_image_ids(2, 8, 8, 'cpu', torch.bfloat16), return_dict=False)[0]
    assert torch.equal(outputs[0], reference)


FSDP_WORKER = textwrap.dedent('''
    import os, sys, torch, torch.distributed as dist
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=sys.argv[1], RANK='0', WORLD_SIZE='1')
    dist.init_process_group('gloo')
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from senseflow_algos.models.families import SD35Family
    from senseflow_algos.models.tiny import build_tiny_sd3_pipeline
    net = build_tiny_sd3_pipeline(seed=0).transformer
    at_root, embedded = [], []
    net.register_forward_pre_hook(lambda m, a, k: at_root.append(k['timestep'].clone()), with_kwargs=True)
    net.time_text_embed.register_forward_pre_hook(lambda m, a: embedded.append(a[0].clone()))
    # What Composer's FSDP2 applies under amp_bf16 with mixed_precision DEFAULT.
    fully_shard(net, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    cond = {'prompt_embeds': torch.randn(1, 5, 48), 'pooled_prompt_embeds': torch.randn(1, 40)}
    with torch.no_grad():
        SD35Family().velocity(net, torch.randn(1, 4, 16, 16), torch.tensor([0.75]), cond)
    print('ROOT', at_root[0].dtype, at_root[0].tolist())
    print('EMBEDDED', embedded[0].dtype, embedded[0].tolist())
    dist.destroy_process_group()
''')


def test_sd35_timestep_stays_float32_under_fsdp2_mixed_precision(tmp_path):
    """FSDP mixed precision casts a root's floating inputs to bf16 (750 -> 752); the embedding still sees 750."""
    script = tmp_path / 'worker.py'
    script.write_text(FSDP_WORKER)
    port = str(29500 + os.getpid() % 2000)
    proc = subprocess.run([sys.executable, str(script), port], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(' ', 1) for line in proc.stdout.splitlines() if line.startswith(('ROOT', 'EMBEDDED')))
    assert lines['ROOT'] == 'torch.bfloat16 [752.0]'  # FSDP's cast of the root input: why the hook is needed
    assert lines['EMBEDDED'] == 'torch.float32 [750.0]'
