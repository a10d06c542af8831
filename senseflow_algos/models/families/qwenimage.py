"""Qwen-Image (``Qwen/Qwen-Image``, a 20B MMDiT flow model): true-CFG teacher, 5-D causal VAE, Qwen2.5-VL prompts.

Everything here follows diffusers 0.39's ``QwenImagePipeline`` (read in ``pipeline_qwenimage.py``):

* prompts: the chat template is wrapped around each prompt, Qwen2.5-VL's last hidden state is taken, the template's
  first 34 tokens are dropped and each prompt keeps only its own tokens; a batch is zero-padded to its longest prompt
  with ``prompt_embeds_mask`` marking the real tokens (the transformer masks the padding in attention, so padding
  length does not change the image tokens' output);
* latents: the VAE works on ``(B, C, 1, H, W)`` videos of one frame, normalised with the config's per-channel
  ``latents_mean`` / ``latents_std``; the transformer sees 2x2-packed tokens, like FLUX, the timestep as sigma
  (``t / 1000``) and ``img_shapes`` for its RoPE;
* guidance: true CFG with a negative prompt, the combined prediction rescaled per token to the conditional
  prediction's norm;
* schedule: FlowMatchEulerDiscreteScheduler with exponential dynamic shifting (``mu`` linear in the packed token count
  between 256 and 8192 tokens, 0.5 .. 0.9) and ``shift_terminal = 0.02``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from senseflow_algos import flow
from senseflow_algos.models.families.base import (
    Conditioning,
    ConstantPromptCache,
    ExportError,
    MethodDefaults,
    PackedShiftedFlowFamily,
)

__all__ = ['QWEN_SHIFT', 'QWEN_SCHEDULER_CONFIG', 'QwenImageFamily', 'QwenImageConditioner', 'tiny_qwen_tokenizer',
           'build_tiny_qwenimage_pipeline']

#: Qwen-Image's time-shift parameters (its scheduler config: 256 .. 8192 packed tokens, mu 0.5 .. 0.9).
QWEN_SHIFT = flow.FluxShift(base_seq_len=256, max_seq_len=8192, base_shift=0.5, max_shift=0.9)

#: ``Qwen/Qwen-Image`` ``scheduler/scheduler_config.json`` (the values that differ from diffusers' defaults and the
#: sampler switches).
QWEN_SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, time_shift_type='exponential',
    shift_terminal=0.02, invert_sigmas=False, stochastic_sampling=False, use_karras_sigmas=False,
    use_exponential_sigmas=False, use_beta_sigmas=False, **QWEN_SHIFT.scheduler_kwargs())

#: The negative prompt of the teacher's true CFG: QwenImagePipeline runs CFG only with a negative prompt, and its
#: docstring and the model card use a single space as the "empty" one.
DEFAULT_NEGATIVE_PROMPT = ' '


# ---------------------------------------------------------------------------------------------------------------------
# Tiny offline pipeline


_SPECIAL = ('<|endoftext|>', '<|im_start|>', '<|im_end|>')
#: Words of QwenImagePipeline's prompt template (byte-level pieces, 'Ġ' = a leading space, 'Ċ' = a newline).
_TEMPLATE_PIECES = ('system', 'user', 'assistant', 'Describe', 'Ċ', ',', ':', 'Ġthe', 'Ġimage', 'Ġby', 'Ġdetailing',
                    'Ġcolor', 'Ġshape', 'Ġsize', 'Ġtexture', 'Ġquantity', 'Ġtext', 'Ġspatial', 'Ġrelationships', 'Ġof',
                    'Ġobjects', 'Ġand', 'Ġbackground')


def tiny_qwen_tokenizer():
    """A Qwen2TokenizerFast over a small word vocabulary, built in-process (no download).

    Byte-level pre-tokenisation as Qwen2's (GPT-2 regex, spaces as 'Ġ', newlines as 'Ċ') with a word-level model, so
    QwenImagePipeline's template prefix is exactly 34 tokens, as with the real tokenizer, and its
    ``prompt_template_encode_start_idx = 34`` drops exactly the template. Words of
    :data:`~senseflow_algos.models.tiny_tokenizers.WORDS` are one token each (with or without a leading space), other
    pieces map to ``<unk>``.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    from senseflow_algos.models.tiny_tokenizers import WORDS

    pieces = ['<unk>', *_TEMPLATE_PIECES]
    for word in WORDS:
        pieces += [word, 'Ġ' + word]
    vocab = {p: i for i, p in enumerate(dict.fromkeys(pieces))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _SPECIAL])
    return Qwen2TokenizerFast(tokenizer_object=backend, unk_token='<unk>', bos_token=None, eos_token='<|im_end|>',
                              pad_token='<|endoftext|>', model_max_length=2048)


def _tiny_text_encoder(tokenizer, hidden: int, seed: int):
    """A two-layer Qwen2.5-VL (text hidden ``hidden``, a two-block vision tower) over ``tokenizer``'s vocabulary."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    # Vision/image token ids point past the tiny vocabulary: prompts never contain them.
    big = len(tokenizer) + 8
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=len(tokenizer), max_position_embeddings=2048,
                         rope_theta=1000000.0, rms_norm_eps=1e-6,
                         rope_scaling={'mrope_section': [2, 3, 3], 'rope_type': 'default', 'type': 'default'}),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=hidden,
                           fullatt_block_indexes=[1]),
        vocab_size=len(tokenizer), hidden_size=hidden, image_token_id=big, video_token_id=big + 1,
        vision_start_token_id=big + 2, vision_end_token_id=big + 3, vision_token_id=big + 4,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def build_tiny_qwenimage_pipeline(seed: int = 0):
    """A tiny random-weight ``QwenImagePipeline`` of the real classes (CPU tests, demos).

    Sizes: VAE z_dim 4, spatial factor 2 (one downsampling stage), non-trivial ``latents_mean`` / ``latents_std``;
    transformer 2 blocks, 2 heads of dim 16 (RoPE axes 4 + 6 + 6), patch 2 (in_channels 16), joint_attention_dim 32 =
    the text encoder's hidden size; Qwen2.5-VL with 2 text layers and a 2-block vision tower; the scheduler has
    Qwen-Image's config (:data:`QWEN_SCHEDULER_CONFIG`).
    """
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    tokenizer = tiny_qwen_tokenizer()
    hidden, z_dim = 32, 4
    text_encoder = _tiny_text_encoder(tokenizer, hidden, seed)
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * z_dim, out_channels=z_dim, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=hidden, guidance_embeds=False, axes_dims_rope=(4, 6, 6)).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(
        base_dim=8, z_dim=z_dim, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
        latents_mean=[0.1, -0.2, 0.3, -0.05], latents_std=[0.5, 2.0, 1.5, 0.8]).eval()
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER_CONFIG), vae=vae,
                             text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)


# ---------------------------------------------------------------------------------------------------------------------
# Conditioner

#: Template tokens around a prompt: the 34 QwenImagePipeline drops before the prompt and the 5 after it
#: (``<|im_end|>``, newline, ``<|im_start|>``, ``assistant``, newline), which the text encoder also runs on.
TEMPLATE_TOKENS = 39


class QwenImageConditioner(nn.Module):
    """Frozen Qwen2.5-VL prompt encoder, through ``QwenImagePipeline.encode_prompt`` (the pipeline's own code).

    Returns ``prompt_embeds`` ``(B, L, 3584)`` with ``prompt_embeds_mask`` ``(B, L)`` (1 on a prompt's own tokens):
    each prompt keeps its own tokens (and the template's 5 closing ones) after the template's first 34 are dropped, and
    the batch is zero-padded at the end to its longest prompt, as the pipeline pads. The transformer masks padded tokens out of attention (and text RoPE positions
    count from the start), so the image tokens' output does not depend on how far a batch is padded: precomputed
    embeddings may be padded further (to ``max_sequence_length``) with zeros and mask 0. The negative branch of the
    teacher's true CFG (``negative_prompt_embeds`` / ``negative_prompt_embeds_mask``) is the negative prompt encoded
    on its own, with its own length, as the pipeline encodes it. ``pooled_prompt_embeds`` is the mean of the prompt's
    own token embeddings: Qwen-Image has no pooled text vector, and the VFM discriminator's text condition needs one.

    Args:
        text_encoder: ``Qwen2_5_VLForConditionalGeneration``. tokenizer: its ``Qwen2Tokenizer``.
        max_sequence_length (int): Prompt tokens kept after the template (QwenImagePipeline's call default: 512; at
            most 1024).
        negative_prompt (str): The teacher's unconditional prompt. Default: ``' '``.
    """

    def __init__(self, text_encoder, tokenizer, max_sequence_length: int = 512,
                 negative_prompt: str = DEFAULT_NEGATIVE_PROMPT):
        super().__init__()
        if not 0 < int(max_sequence_length) <= 1024:
            raise ValueError(f'model.family_kwargs.max_sequence_length={max_sequence_length} must be in 1..1024 '
                             '(QwenImagePipeline refuses longer prompts)')
        self.text_encoder = text_encoder.requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_sequence_length = int(max_sequence_length)
        self.negative_prompt = negative_prompt
        self._negative = ConstantPromptCache()  # the negative prompt is encoded once, not every batch

    def _encode(self, pipe, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, mask = pipe.encode_prompt(prompts, device=device, max_sequence_length=self.max_sequence_length)
        if mask is None:  # the pipeline drops an all-ones mask
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return embeds, mask

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> Conditioning:
        from diffusers import QwenImagePipeline

        pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                 transformer=None)
        prompts = list(prompts)
        device = next(self.text_encoder.parameters()).device
        embeds, mask = self._encode(pipe, prompts, device)
        weights = mask.to(embeds.dtype).unsqueeze(-1)
        pooled = (embeds * weights).sum(1) / weights.sum(1).clamp_min(1)

        def negative() -> Conditioning:
            neg, neg_mask = self._encode(pipe, [self.negative_prompt], device)
            return {'negative_prompt_embeds': neg, 'negative_prompt_embeds_mask': neg_mask}

        return {'prompt_embeds': embeds, 'prompt_embeds_mask': mask, 'pooled_prompt_embeds': pooled,
                **self._negative.get(self.text_encoder, negative, len(prompts))}


# ---------------------------------------------------------------------------------------------------------------------
# Family


class QwenImageFamily(PackedShiftedFlowFamily):
    """Qwen-Image: a true-CFG teacher with FLUX-like packed latents and a FLUX-like (exponential, dynamic) time shift.

    No SenseFlow reference exists for Qwen-Image; the choices and their reasons:

    * Anchors: :func:`~senseflow_algos.flow.uniform_times` through the scheduler's resolution shift ``mu`` at the
      training size (how the reference derives FLUX's anchors from the same scheduler rule): at 1024x1024 (4096 packed
      tokens, ``mu`` = 0.6935) {1, .857, .667, .400}. The scheduler's ``shift_terminal = 0.02`` is left out: it
      stretches a whole inference ladder so its last sigma is 0.02, which on a 4-step ladder would put the last anchor
      at sigma 0.02 (a step that barely changes the image) instead of 0.40. The export switches it off, so the exported
      pipeline steps exactly through these anchors.
    * Index grid: sigma = index / 1000 (the anchors are already shifted, as FLUX's).
    * DMD and fake-score sigmas: a plain logit-normal (no shift), as the reference samples for FLUX, whose scheduler
      (the same class, dynamic shifting) holds unshifted sigmas at init; DMD and the fake score thus see the same
      noise levels, and ``mu`` only moves the anchors.
    * Teacher guidance: true CFG against the negative prompt ``' '`` with QwenImagePipeline's norm rescale. DMD real
      score CFG ~ U(3, 5), around Qwen-Image's recommended ``true_cfg_scale`` 4 (the reference redraws the scale per
      step from a range around the teacher's usual values, U(3, 10) for SD 3.5 Large; a narrower range here, since
      Qwen-Image's norm rescale already tames large scales and no run says more); ISG's teacher step at the
      recommended 4 (the reference's SD 3.5 Large uses a fixed 5); ISG margin 20 on the t / 1000 grid, as FLUX's (SD
      3.5's 50 is on its pre-shift grid).
    * GAN weighting: ``signal_power`` ``(1 - sigma)^2`` (the paper's alpha_t^2, used by the reference for FLUX, whose
      shifted anchors Qwen-Image's resemble); SD 3.5's ``scheduler.sigmas[t]^2`` is a quirk of its static-shift index
      grid. At the 1024 anchors it is [0, .020, .111, .360].

    Args:
        base_seq_len, max_seq_len, base_shift, max_shift: The scheduler's shift parameters (default
            :data:`QWEN_SHIFT`: 256, 8192, 0.5, 0.9).
        max_sequence_length (int): Prompt tokens after the template. Default: ``512`` (the pipeline's).
        negative_prompt (str): The unconditional prompt of the teacher's CFG. Default: ``' '``.
        adversarial_weighting (str): Only ``signal_power``.
        anchors (list[int], optional): Anchor indices (sigma = index / 1000) instead of the shifted uniform ones.
    """

    name = 'qwenimage'
    # Prompt embeddings are as long as each prompt (with a mask), padded per batch: no fixed MDS column shape yet.
    precomputable_conditioning = False
    network_class = 'QwenImageTransformer2DModel'
    vae_class = 'AutoencoderKLQwenImage'
    pipeline_class = 'QwenImagePipeline'
    text_components = ('text_encoder', 'tokenizer')
    defaults = MethodDefaults(dmd_guidance=(3.0, 5.0), isg_guidance=(4.0, 4.0), isg_margin=20)
    uses_cfg = True

    def __init__(self, base_seq_len: int = QWEN_SHIFT.base_seq_len, max_seq_len: int = QWEN_SHIFT.max_seq_len,
                 base_shift: float = QWEN_SHIFT.base_shift, max_shift: float = QWEN_SHIFT.max_shift,
                 max_sequence_length: int = 512, negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
                 adversarial_weighting: str = 'signal_power', anchors: Optional[Sequence[int]] = None):
        self._set_shift(base_seq_len, max_seq_len, base_shift, max_shift)
        if not 0 < int(max_sequence_length) <= 1024:
            raise ValueError(f'model.family_kwargs.max_sequence_length={max_sequence_length} must be in 1..1024 '
                             '(QwenImagePipeline refuses longer prompts)')
        self.max_sequence_length = int(max_sequence_length)
        self.negative_prompt = negative_prompt
        self._set_adversarial_weighting(adversarial_weighting)
        self._set_anchors(anchors)

    # -- loading ------------------------------------------------------------------------------------------------------

    def make_conditioner(self, modules, max_sequence_length=None):
        return QwenImageConditioner(modules['text_encoder'], modules['tokenizer'],
                                    max_sequence_length or self.max_sequence_length, self.negative_prompt)

    def tiny_pipeline(self, seed=0):
        return build_tiny_qwenimage_pipeline(seed=seed)

    # Schedule, export scheduler and re-noise layout: PackedShiftedFlowFamily's, with Qwen-Image's shift parameters.
    # The export switches the scheduler's shift_terminal off, so the pipeline's default linspace(1, 1/n, n) sigmas land
    # on the anchors; its initial noise is drawn as (B, 1, C, h, w), the unpacked order, and its re-noise noise packed.

    # -- networks -----------------------------------------------------------------------------------------------------

    def velocity(self, net, x, sigma, cond, guidance=None):
        """See :meth:`ModelFamily.velocity`; ``guidance`` is the per-sample true-CFG scale.

        Two calls, conditional then negative, as QwenImagePipeline makes them (each branch with its own length and
        mask, no padding between them), combined by :func:`true_cfg` in float32 (the pipeline combines in the
        transformer's dtype: the same in fp32, within bf16 rounding in bf16).
        """
        b, c, h, w = x.shape
        tokens = flow.pack_latents(x).to(next(net.parameters()).dtype)
        timestep = self._as_sigma(sigma, x)  # the pipeline's t / 1000 (the transformer casts it to its dtype)
        img_shapes = [[(1, h // 2, w // 2)]] * b
        v = self._call(net, tokens, timestep, img_shapes, cond['prompt_embeds'], cond.get('prompt_embeds_mask'))
        if guidance is not None:
            if 'negative_prompt_embeds' not in cond:
                raise KeyError('a true-CFG teacher query needs negative_prompt_embeds / negative_prompt_embeds_mask '
                               '(the negative prompt) in the conditioning')
            v_neg = self._call(net, tokens, timestep, img_shapes, cond['negative_prompt_embeds'],
                               cond.get('negative_prompt_embeds_mask'))
            v = true_cfg(v, v_neg, guidance.to(device=x.device, dtype=torch.float32))
        return flow.unpack_latents(v, c, h, w)

    def pooled_text_dim(self, teacher_config) -> int:
        """Width of ``pooled_prompt_embeds`` (the VFM discriminator's text condition): the mean-pooled prompt
        embedding is the text encoder's width, the transformer's ``joint_attention_dim``. (Qwen/Qwen-Image's
        transformer config also lists ``pooled_projection_dim: 768``, which the transformer ignores.)"""
        return int(teacher_config.joint_attention_dim)

    @staticmethod
    def _call(net, tokens, timestep, img_shapes, embeds, mask) -> torch.Tensor:
        # The pipeline passes no mask when every token is real (encode_prompt drops an all-ones mask): the same here.
        if mask is not None and not mask.is_meta and bool(mask.all()):  # (the planner's meta mask is kept)
            mask = None
        return net(hidden_states=tokens, timestep=timestep, encoder_hidden_states=embeds.to(tokens.dtype),
                   encoder_hidden_states_mask=mask, img_shapes=img_shapes, return_dict=False)[0].float()

    def latent_shape(self, vae, resolution):
        factor = 2**len(vae.config.temperal_downsample)
        side = 2 * (resolution // (factor * 2))  # packing needs an even latent side, as QwenImagePipeline rounds
        return (vae.config.z_dim, side, side)

    @staticmethod
    def _latent_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``latents_mean`` and ``1 / latents_std`` as ``(1, C, 1, 1, 1)``, as QwenImagePipeline builds them."""
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(like.device, like.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(like.device, like.dtype)
        return mean, inv_std

    def encode_images(self, vae, pixels):
        """Pixels in [-1, 1] to normalised latents ``(z - mean) / std`` (posterior mode) of shape ``(B, C, h, w)``.

        As QwenImageImg2ImgPipeline encodes, with the posterior's mode: images are one-frame videos.
        """
        z = vae.encode(pixels.to(next(vae.parameters()).dtype).unsqueeze(2)).latent_dist.mode()
        mean, inv_std = self._latent_stats(vae, z)
        return ((z - mean) * inv_std)[:, :, 0].float()

    def decode_latents(self, vae, latents):
        """Normalised ``(B, C, h, w)`` latents to pixels in [-1, 1] (differentiable), as QwenImagePipeline decodes."""
        if vae.encoder is None:
            _decode_without_encoder(vae)
        z = latents.to(next(vae.parameters()).dtype).unsqueeze(2)
        mean, inv_std = self._latent_stats(vae, z)
        return vae.decode(z / inv_std + mean, return_dict=False)[0][:, :, 0].float()

    # -- export -------------------------------------------------------------------------------------------------------

    def pipeline_call_kwargs(self, resolution, conditioner):
        # No negative prompt: the pipeline runs no CFG; true_cfg_scale=1 also keeps it from warning about that.
        return {**super().pipeline_call_kwargs(resolution, conditioner), 'true_cfg_scale': 1.0}

    def build_pipeline(self, net, vae, conditioner, scheduler):
        if getattr(net.config, 'guidance_embeds', False):
            raise ExportError('the Qwen-Image student has guidance_embeds=true; Qwen-Image is a true-CFG model '
                              'without a guidance embedding')
        return super().build_pipeline(net, vae, conditioner, scheduler)

    # -- planner ------------------------------------------------------------------------------------------------------

    def planner_text_lengths(self, max_sequence_length):
        # Qwen2.5-VL runs on the template around the prompt; the transformer then sees the prompt's tokens only.
        return {'text_encoder': max_sequence_length + TEMPLATE_TOKENS}

    def planner_conditioning(self, teacher_config, lengths, batch, dtype):
        length = lengths['text_encoder'] - TEMPLATE_TOKENS
        width = teacher_config.joint_attention_dim

        def embeds(n):
            return torch.empty(batch, n, width, dtype=dtype, device='meta')

        def mask(n):
            return torch.empty(batch, n, dtype=torch.long, device='meta')

        # The negative prompt ' ' keeps the template's 5 closing tokens (and at most one of its own).
        return {'prompt_embeds': embeds(length), 'prompt_embeds_mask': mask(length),
                'pooled_prompt_embeds': torch.empty(batch, width, dtype=dtype, device='meta'),
                'negative_prompt_embeds': embeds(6), 'negative_prompt_embeds_mask': mask(6)}


def _decode_without_encoder(vae) -> None:
    """Let an ``AutoencoderKLQwenImage`` whose encoder was dropped (``drop_vae_encoder``) decode.

    Its ``clear_cache``, which ``decode`` calls, also counts the encoder's causal convolutions for the encode cache;
    with the encoder gone that fails. This instance gets a ``clear_cache`` that resets the decode cache only.
    """
    if getattr(vae, '_decode_only', False):
        return
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d

    def clear_cache():
        vae._conv_num = sum(isinstance(m, QwenImageCausalConv3d) for m in vae.decoder.modules())
        vae._conv_idx = [0]
        vae._feat_map = [None] * vae._conv_num

    vae.clear_cache = clear_cache
    vae._decode_only = True


def true_cfg(v_cond: torch.Tensor, v_neg: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """QwenImagePipeline's true CFG on packed ``(B, N, D)`` predictions with a per-sample ``scale`` ``(B,)``.

    ``comb = v_neg + w (v_cond - v_neg)``, then each token of ``comb`` is rescaled to the norm (over its ``D`` packed
    channels) of the conditional prediction's token: ``comb * |v_cond| / |comb|``.
    """
    comb = v_neg + scale.reshape(-1, 1, 1) * (v_cond - v_neg)
    return comb * (torch.norm(v_cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
