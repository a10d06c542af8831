"""The shapes-world FLUX pipeline: component builders, prompt encoding and the teacher's Euler sampling.

The teacher uses the classes of FLUX.1-dev at a toy size:

* ``FluxTransformer2DModel`` with a guidance embedding (the shipped teacher: hidden 128 = 4 heads x 32, 3 double +
  3 single blocks);
* ``AutoencoderKL`` with 3 levels (channels 32, 64, 64; spatial factor 4) and 16 latent channels: 32x32 images <->
  8x8x16 latents, i.e. 16 packed image tokens;
* ``CLIPTextModel`` (pooled, width 32) and ``T5EncoderModel`` (sequence, width 64, 3 layers) with the project's tiny
  tokenizers (:mod:`senseflow_algos.models.tiny_tokenizers`: every caption word is one token), CLIP padded to 16
  tokens and T5 to :data:`MAX_SEQUENCE_LENGTH`;
* ``FlowMatchEulerDiscreteScheduler`` with FLUX's dynamic shift.

The T5 sequence length is part of the model: the teacher was trained with ``max_sequence_length=12`` and
should be queried with it (``FluxPipeline(...)(prompt, max_sequence_length=12)``, ``family_kwargs:
{max_sequence_length: 12}`` in a run YAML); FLUX's default of 512 pads 500 extra tokens the model never saw.

Sampling reuses the library: FLUX's shift from :class:`~senseflow_algos.models.families.flux.FluxFamily` and
:mod:`senseflow_algos.flow`, the loop from :func:`senseflow_algos.sampling.run_sampler` (``method='euler'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from senseflow_algos import flow
from senseflow_algos.flow import FLUX_SHIFT
from senseflow_algos.sampling import run_sampler

__all__ = [
    'ASSETS', 'TEACHER_DIR', 'VFM_WEIGHTS', 'EVALUATOR_WEIGHTS', 'RESOLUTION', 'LATENT_CHANNELS',
    'MAX_SEQUENCE_LENGTH', 'CLIP_LENGTH', 'DEFAULT_GUIDANCE', 'DEFAULT_STEPS', 'build_tokenizers',
    'build_text_encoders', 'build_vae', 'build_transformer', 'build_scheduler', 'encode_prompts',
    'load_teacher', 'sample_euler', 'teacher_sigmas', 'num_threads'
]

ASSETS = Path(__file__).resolve().parent / 'assets'
TEACHER_DIR = ASSETS / 'teacher'
VFM_WEIGHTS = ASSETS / 'vfm' / 'model.safetensors'
EVALUATOR_WEIGHTS = ASSETS / 'evaluator' / 'model.safetensors'

RESOLUTION = 32
LATENT_CHANNELS = 16  # FLUX's own latent width; 8 channels blurred the world's corners (see the shapes README)
VAE_CHANNELS = (32, 64, 64)
T5_LAYERS = 3
MAX_SEQUENCE_LENGTH = 12  # T5 tokens: the longest caption has 10 words + </s>
CLIP_LENGTH = 16
CLIP_WIDTH, T5_WIDTH = 32, 64
#: The teacher's full-step sampling: Euler steps and embedded guidance.
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 4.0


def num_threads(n: Optional[int] = None) -> int:
    """Cap torch's intra-op threads (default 2: the project's CPU budget) and return the count."""
    n = n or 2
    torch.set_num_threads(n)
    return n


def build_tokenizers():
    """The project's CLIP-style BPE and T5-style word tokenizers (CLIP padded to :data:`CLIP_LENGTH`)."""
    from senseflow_algos.models.tiny_tokenizers import tiny_clip_tokenizer, tiny_t5_tokenizer

    clip, t5 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    clip.model_max_length = CLIP_LENGTH
    t5.model_max_length = MAX_SEQUENCE_LENGTH
    return clip, t5


def build_text_encoders(tokenizer, tokenizer_2, seed: int = 0, t5_layers: int = T5_LAYERS):
    """Tiny CLIP (2 layers, width 32, pooled output) and T5 v1.1-style (``t5_layers`` layers, width 64) text
    encoders."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=CLIP_WIDTH, intermediate_size=2 * CLIP_WIDTH,
        projection_dim=CLIP_WIDTH, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=CLIP_LENGTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    torch.manual_seed(seed + 1)
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=T5_WIDTH, d_kv=16, d_ff=2 * T5_WIDTH, num_layers=t5_layers, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj='gated-gelu',
        pad_token_id=tokenizer_2.pad_token_id, eos_token_id=tokenizer_2.eos_token_id,
        decoder_start_token_id=tokenizer_2.pad_token_id))
    return clip, t5


def build_vae(seed: int = 0, channels: Sequence[int] = VAE_CHANNELS, latent_channels: int = LATENT_CHANNELS):
    """3-level ``AutoencoderKL`` (``channels`` per level; spatial factor 4; ``latent_channels``)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        down_block_types=('DownEncoderBlock2D',) * 3, up_block_types=('UpDecoderBlock2D',) * 3,
        block_out_channels=tuple(channels), layers_per_block=1, norm_num_groups=8, latent_channels=latent_channels,
        sample_size=RESOLUTION, scaling_factor=1.0, shift_factor=0.0, use_quant_conv=False,
        use_post_quant_conv=False)


def build_transformer(seed: int = 0, heads: int = 4, head_dim: int = 16, double: int = 2, single: int = 2,
                      latent_channels: int = LATENT_CHANNELS):
    """``FluxTransformer2DModel`` with guidance embedding (FLUX.1-dev layout), RoPE axes (4, 6, 6) for dim 16."""
    from diffusers import FluxTransformer2DModel

    rope = {16: (4, 6, 6), 24: (8, 8, 8), 32: (8, 12, 12)}[head_dim]
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=double, num_single_layers=single,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=CLIP_WIDTH, guidance_embeds=True, axes_dims_rope=rope)


def build_scheduler():
    """FLUX.1-dev's scheduler settings (dynamic, resolution-dependent exponential shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, **FLUX_SHIFT.scheduler_kwargs())


def encode_prompts(prompts: Sequence[str], tokenizer, text_encoder, tokenizer_2, text_encoder_2,
                   max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> dict[str, torch.Tensor]:
    """What ``FluxPipeline.encode_prompt`` computes, differentiable (the teacher trains its text encoders).

    Returns:
        ``{'prompt_embeds': (B, L, 64), 'pooled_prompt_embeds': (B, 32)}``.
    """
    device = next(text_encoder.parameters()).device
    ids = tokenizer(list(prompts), padding='max_length', max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors='pt').input_ids.to(device)
    pooled = text_encoder(ids, output_hidden_states=False).pooler_output
    ids2 = tokenizer_2(list(prompts), padding='max_length', max_length=max_sequence_length, truncation=True,
                       return_tensors='pt').input_ids.to(device)
    embeds = text_encoder_2(ids2, output_hidden_states=False)[0]
    return {'prompt_embeds': embeds, 'pooled_prompt_embeds': pooled}


def load_teacher(folder: str | Path = TEACHER_DIR, device='cpu'):
    """``FluxPipeline.from_pretrained(folder)`` in fp32, eval mode, on ``device``."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(folder), torch_dtype=torch.float32).to(device)
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        m.eval().requires_grad_(False)
    return pipe


def teacher_sigmas(steps: int, latent_hw: tuple[int, int] = (8, 8), scheduler_config: Optional[dict] = None):
    """The sigmas ``FluxPipeline`` uses for ``steps`` Euler steps: ``linspace(1, 1/N, N)`` under FLUX's shift at
    this image-token count, followed by 0 (float64)."""
    cfg = FLUX_SHIFT.scheduler_kwargs()
    if scheduler_config:
        cfg.update({k: scheduler_config[k] for k in cfg if k in scheduler_config})
    tokens = (latent_hw[0] // 2) * (latent_hw[1] // 2)
    mu = flow.flux_mu(tokens, cfg['base_image_seq_len'], cfg['max_image_seq_len'], cfg['base_shift'],
                      cfg['max_shift'])
    base = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    return flow.append_zero(flow.flux_time_shift(base, mu))


@torch.no_grad()
def sample_euler(net: nn.Module, cond: dict[str, torch.Tensor], sigmas: torch.Tensor, noise: torch.Tensor,
                 guidance: Optional[float] = None, family=None) -> torch.Tensor:
    """Deterministic Euler from ``noise`` (sigma = sigmas[0]) through ``sigmas`` (ending in 0); returns latents.

    The library's sampling loop (:func:`~senseflow_algos.sampling.run_sampler`, ``method='euler'``) on ``family``'s
    velocity (default :class:`~senseflow_algos.models.families.flux.FluxFamily`). ``guidance`` is the embedded
    guidance of a FLUX-dev network (``None`` for the guidance-free student).
    """
    from senseflow_algos.models.families.flux import FluxFamily

    family = family or FluxFamily()
    x = noise.float()
    g = None if guidance is None else torch.full((x.shape[0],), float(guidance), device=x.device)
    return run_sampler(lambda x_t, sigma: family.velocity(net, x_t, sigma, cond, g), x, sigmas, method='euler')
