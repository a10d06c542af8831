"""Stable Diffusion 3.5 (Large / Medium): CFG teacher with an empty-prompt unconditional branch, shift-3 schedule."""

from __future__ import annotations

import contextlib
import copy

import torch

from senseflow_algos import flow
from senseflow_algos.models.families.base import (
    DEFAULT_NUM_STEPS,
    Components,
    Conditioning,
    ModelFamily,
    drop_vae_encoder,
    shifted_anchors,
)

__all__ = ['SD35Family', 'SD35Conditioner', 'float32_timestep']


@contextlib.contextmanager
def float32_timestep(net: torch.nn.Module, timestep: torch.Tensor):
    """Within this block, ``net``'s time embedding receives ``timestep`` (float32) whatever dtype reached ``net``.

    The SD3 transformer embeds its ``timestep`` argument as given, and StableDiffusion3Pipeline gives the scheduler's
    float32 values. Under FSDP mixed precision (Composer's ``mixed_precision: DEFAULT`` with ``amp_bf16``) the root
    module casts every floating forward input to bf16 first, so t = 750 would be embedded as 752. A pre-hook on the
    time embedding, which runs after that cast, hands it the float32 timestep back.
    """
    def restore(module, args):
        if args[0].shape != timestep.shape:
            raise RuntimeError(f'time embedding got a timestep of shape {tuple(args[0].shape)}, expected '
                               f'{tuple(timestep.shape)}')
        return (timestep.to(args[0].device), *args[1:])

    handle = net.time_text_embed.register_forward_pre_hook(restore, prepend=True)  # before any other hook sees it
    try:
        yield
    finally:
        handle.remove()


class SD35Conditioner(torch.nn.Module):
    """Frozen CLIP-L + CLIP-G + T5 prompt encoder through ``StableDiffusion3Pipeline.encode_prompt``.

    Also returns the empty-prompt embeddings (``negative_*``) that the CFG teacher uses as its unconditional branch.

    Args:
        text_encoder, text_encoder_2, text_encoder_3: CLIP-L, CLIP-G (with projection) and T5.
        tokenizer, tokenizer_2, tokenizer_3: their tokenizers.
        max_sequence_length (int): T5 tokens. Default: ``256``.
    """

    def __init__(self, text_encoder, tokenizer, text_encoder_2, tokenizer_2, text_encoder_3, tokenizer_3,
                 max_sequence_length: int = 256):
        super().__init__()
        self.text_encoder = text_encoder.requires_grad_(False)
        self.text_encoder_2 = text_encoder_2.requires_grad_(False)
        self.text_encoder_3 = text_encoder_3.requires_grad_(False)
        self.tokenizer, self.tokenizer_2, self.tokenizer_3 = tokenizer, tokenizer_2, tokenizer_3
        self.max_sequence_length = max_sequence_length

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> Conditioning:
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline(
            transformer=None, scheduler=None, vae=None, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
            text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2, text_encoder_3=self.text_encoder_3,
            tokenizer_3=self.tokenizer_3)
        prompts = list(prompts)
        device = next(self.text_encoder.parameters()).device
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompts, prompts, prompts, device=device, do_classifier_free_guidance=True, negative_prompt='',
            max_sequence_length=self.max_sequence_length)
        return {'prompt_embeds': embeds, 'pooled_prompt_embeds': pooled, 'negative_prompt_embeds': neg,
                'negative_pooled_prompt_embeds': neg_pooled}


class SD35Family(ModelFamily):
    """SD 3.5: anchors ``shift3({1, .75, .5, .25}) = {1, .9, .75, .5}``; index ``i`` maps to ``shift3((i+1)/1000)``.

    Args:
        shift (float): Static time shift of the scheduler. Default: ``3.0``.
        dmd_index_range (tuple[int, int]): DMD compares teacher and fake score at an index drawn uniformly
            from this range (inclusive), mapped to sigma. Default: ``(20, 980)``.
        max_sequence_length (int): T5 prompt tokens. Default: ``256``.
        adversarial_weighting (str): Per-anchor GAN weight. ``scheduler_sigma_squared`` (default): the reference
            SD 3.5 code's ``scheduler.sigmas[t_idx]^2``, the *unflipped* scheduler sigma at the anchor's index
            ``t_idx``, i.e. ``shift((1000 - t_idx) / 1000)^2`` = [0, .251, .564, .811] at the anchors; the paper's SD 3.5
            numbers come from that code. ``signal_power``: ``(1 - sigma)^2`` = [0, .01, .0625, .25], the paper's
            formula.
    """

    name = 'sd35'
    isg_margin = 50
    adversarial_weightings = ('scheduler_sigma_squared', 'signal_power')

    def __init__(self, shift: float = 3.0, dmd_index_range: tuple[int, int] = (20, 980), max_sequence_length: int = 256,
                 adversarial_weighting: str = 'scheduler_sigma_squared'):
        self.shift = shift
        self.dmd_index_range = tuple(dmd_index_range)
        self.max_sequence_length = max_sequence_length
        self._set_adversarial_weighting(adversarial_weighting)

    # -- loading ------------------------------------------------------------------------------------------------------

    def load_components(self, pretrained, torch_dtype=torch.float32, teacher_dtype=None, revision=None,
                        text_encoders=True, vae_encoder=True, encoder_dtype=None, transformers_on_meta=False):
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

        kw = dict(revision=revision)
        teacher_dtype = teacher_dtype or torch_dtype
        encoder_dtype = encoder_dtype or teacher_dtype
        teacher = self._load_transformer(SD3Transformer2DModel, pretrained, teacher_dtype, revision,
                                         on_meta=transformers_on_meta)
        student = copy.deepcopy(teacher).to(torch_dtype)  # on meta too when the teacher is
        vae = self._load_vae(pretrained, encoder_dtype, revision)
        return Components(
            teacher=teacher,
            student=student,
            vae=vae if vae_encoder else drop_vae_encoder(vae),
            conditioner=self._load_conditioner(pretrained, encoder_dtype, revision) if text_encoders else None,
            scheduler_config=dict(FlowMatchEulerDiscreteScheduler.load_config(pretrained, subfolder='scheduler',
                                                                              **kw)),
        )

    def _load_conditioner(self, pretrained, torch_dtype, revision):
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        kw = dict(revision=revision)

        def clip(sub):
            return CLIPTextModelWithProjection.from_pretrained(pretrained, subfolder=sub, torch_dtype=torch_dtype, **kw)

        return SD35Conditioner(
            clip('text_encoder'), AutoTokenizer.from_pretrained(pretrained, subfolder='tokenizer', **kw),
            clip('text_encoder_2'), AutoTokenizer.from_pretrained(pretrained, subfolder='tokenizer_2', **kw),
            T5EncoderModel.from_pretrained(pretrained, subfolder='text_encoder_3', torch_dtype=torch_dtype, **kw),
            AutoTokenizer.from_pretrained(pretrained, subfolder='tokenizer_3', **kw),
            max_sequence_length=self.max_sequence_length)

    def tiny_components(self, seed=0, text_encoders=True, vae_encoder=True):
        from senseflow_algos.models.tiny import build_tiny_sd3_pipeline

        pipe = build_tiny_sd3_pipeline(seed=seed)
        conditioner = SD35Conditioner(pipe.text_encoder, pipe.tokenizer, pipe.text_encoder_2, pipe.tokenizer_2,
                                     pipe.text_encoder_3, pipe.tokenizer_3,
                                     max_sequence_length=pipe.tokenizer_3.model_max_length)
        return Components(
            teacher=pipe.transformer,
            student=copy.deepcopy(pipe.transformer),
            vae=pipe.vae if vae_encoder else drop_vae_encoder(pipe.vae),
            conditioner=conditioner if text_encoders else None,
            scheduler_config=dict(pipe.scheduler.config),
        )

    # -- schedule -----------------------------------------------------------------------------------------------------

    def anchors(self, latent_hw, num_steps=DEFAULT_NUM_STEPS):
        return shifted_anchors(lambda s: flow.shift_sigma(s, self.shift), num_steps)

    def index_to_sigma(self, index):
        return flow.sd3_index_to_sigma(index, self.shift)

    def sigma_to_index(self, sigma):
        return torch.round(flow.unshift_sigma(sigma, self.shift) * 1000 - 1).clamp_min(0)

    def dmd_sigma(self, n, rng, device=None):
        lo, hi = self.dmd_index_range
        idx = torch.randint(lo, hi + 1, (n,), generator=rng, device=device)
        return self.index_to_sigma(idx)

    def fake_score_sigma(self, n, rng, device=None):
        return flow.shift_sigma(flow.sample_logit_normal(n, rng, device=device), self.shift)

    def _adversarial_weight(self, sigma):
        # scheduler_sigma_squared: the scheduler's sigmas run from noise to clean (sigmas[i] = index_to_sigma(999 - i))
        # while the anchor's index t_idx counts the other way (sigma = index_to_sigma(t_idx)).
        sigma = torch.as_tensor(sigma)
        return (self.index_to_sigma(999 - self.sigma_to_index(sigma))**2).to(sigma)

    # -- networks -----------------------------------------------------------------------------------------------------

    def velocity(self, net, x, sigma, cond, guidance=None):
        dtype = next(net.parameters()).dtype
        timestep = self._as_sigma(sigma, x) * 1000  # float32, as StableDiffusion3Pipeline passes it
        if guidance is None:
            return self._call(net, x, timestep, cond['prompt_embeds'], cond['pooled_prompt_embeds'], dtype)
        if 'negative_prompt_embeds' not in cond:
            raise KeyError('CFG teacher query needs negative_prompt_embeds / negative_pooled_prompt_embeds '
                           '(empty-prompt embeddings) in the conditioning')
        # One batched call for the unconditional and the conditional branch.
        v_uncond, v_cond = self._call(
            net, torch.cat([x, x]), torch.cat([timestep, timestep]),
            torch.cat([cond['negative_prompt_embeds'], cond['prompt_embeds']]),
            torch.cat([cond['negative_pooled_prompt_embeds'], cond['pooled_prompt_embeds']]), dtype).chunk(2)
        w = guidance.to(device=x.device, dtype=torch.float32).reshape(-1, 1, 1, 1)
        return v_uncond + w * (v_cond - v_uncond)

    @staticmethod
    def _call(net, x, timestep, embeds, pooled, dtype):
        with float32_timestep(net, timestep):
            return net(hidden_states=x.to(dtype), timestep=timestep, encoder_hidden_states=embeds.to(dtype),
                       pooled_projections=pooled.to(dtype), return_dict=False)[0].float()

    def latent_shape(self, vae, resolution):
        factor = 2**(len(vae.config.block_out_channels) - 1)
        return (vae.config.latent_channels, resolution // factor, resolution // factor)
