"""Stable Diffusion 3.5 (Large / Medium): CFG teacher with an empty-prompt unconditional branch, shift-3 schedule."""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch

from senseflow_algos import flow
from senseflow_algos.models.families.base import (
    DEFAULT_NUM_STEPS,
    Conditioning,
    ConstantPromptCache,
    MethodDefaults,
    ModelFamily,
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
        self._empty = ConstantPromptCache()  # the empty prompt is encoded once, not every batch

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline(
            transformer=None, scheduler=None, vae=None, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
            text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2, text_encoder_3=self.text_encoder_3,
            tokenizer_3=self.tokenizer_3)
        device = next(self.text_encoder.parameters()).device
        # Without CFG encode_prompt encodes the prompts alone; with negative_prompt='' it builds the negative branch
        # the same way from ''.
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, device=device,
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=self.max_sequence_length)
        return embeds, pooled

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> Conditioning:
        prompts = list(prompts)
        embeds, pooled = self._encode(prompts)

        def empty() -> Conditioning:
            neg, neg_pooled = self._encode([''])
            return {'negative_prompt_embeds': neg, 'negative_pooled_prompt_embeds': neg_pooled}

        return {'prompt_embeds': embeds, 'pooled_prompt_embeds': pooled,
                **self._empty.get(self.text_encoder, empty, len(prompts))}


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
        anchors (list[int], optional): Anchor indices (index ``i`` is sigma ``shift((i + 1) / 1000)``) instead of the
            reference's ``[999, 749, 499, 249]`` (the default for 4 steps).
    """

    name = 'sd35'
    network_class = 'SD3Transformer2DModel'
    pipeline_class = 'StableDiffusion3Pipeline'
    text_components = ('text_encoder', 'tokenizer', 'text_encoder_2', 'tokenizer_2', 'text_encoder_3', 'tokenizer_3')
    # The reference SD 3.5 Large code: DMD real score CFG ~ U(3, 10), ISG teacher step CFG 5, margin 50 (Medium's
    # U(2, 8) and U(2, 4) are set in yamls/sd35_medium.yaml).
    defaults = MethodDefaults(dmd_guidance=(3.0, 10.0), isg_guidance=(5.0, 5.0), isg_margin=50)
    uses_cfg = True
    adversarial_weightings = ('scheduler_sigma_squared', 'signal_power')

    def __init__(self, shift: float = 3.0, dmd_index_range: tuple[int, int] = (20, 980), max_sequence_length: int = 256,
                 adversarial_weighting: str = 'scheduler_sigma_squared', anchors: Optional[Sequence[int]] = None):
        self.shift = shift
        self.dmd_index_range = tuple(dmd_index_range)
        self.max_sequence_length = max_sequence_length
        self._set_adversarial_weighting(adversarial_weighting)
        self._set_anchors(anchors)

    # -- loading ------------------------------------------------------------------------------------------------------

    def make_conditioner(self, modules, max_sequence_length=None):
        return SD35Conditioner(*(modules[name] for name in self.text_components),
                               max_sequence_length=max_sequence_length or self.max_sequence_length)

    def tiny_pipeline(self, seed=0):
        from senseflow_algos.models.tiny import build_tiny_sd3_pipeline

        return build_tiny_sd3_pipeline(seed=seed)

    def _tiny_sequence_length(self, pipe):
        return pipe.tokenizer_3.model_max_length

    # -- schedule -----------------------------------------------------------------------------------------------------

    def _default_anchors(self, latent_hw, num_steps=DEFAULT_NUM_STEPS):
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

    # -- export -------------------------------------------------------------------------------------------------------

    def export_scheduler(self, base_config, sigmas, latent_shape, method):
        # StableDiffusion3Pipeline has no default sigmas for a few steps: the call passes sigmas= (pre-shift).
        return self._flow_match_export(base_config, sigmas, method,
                                       dict(use_dynamic_shifting=False, shift=float(self.shift)),
                                       lambda anchors: flow.unshift_sigma(anchors, float(self.shift)))

    def pipeline_call_kwargs(self, resolution, conditioner):
        # StableDiffusion3Pipeline runs CFG when guidance_scale > 1; the student is sampled without.
        return {**super().pipeline_call_kwargs(resolution, conditioner), 'guidance_scale': 1.0}

    # -- planner ------------------------------------------------------------------------------------------------------

    def planner_text_lengths(self, max_sequence_length):
        return {'text_encoder': 77, 'text_encoder_2': 77, 'text_encoder_3': max_sequence_length}

    def planner_conditioning(self, teacher_config, lengths, batch, dtype):
        tokens = lengths['text_encoder'] + lengths['text_encoder_3']  # CLIP-L/G (77) then T5, concatenated
        embeds = torch.empty(batch, tokens, teacher_config.joint_attention_dim, dtype=dtype, device='meta')
        pooled = torch.empty(batch, teacher_config.pooled_projection_dim, dtype=dtype, device='meta')
        return {'prompt_embeds': embeds, 'pooled_prompt_embeds': pooled, 'negative_prompt_embeds': torch.empty_like(embeds),
                'negative_pooled_prompt_embeds': torch.empty_like(pooled)}
