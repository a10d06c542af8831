"""FLUX.1 (dev): guidance-distilled teacher queried with its guidance embedding; 2x2-packed latents."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from senseflow_algos import flow
from senseflow_algos.models.families.base import (
    Conditioning,
    MethodDefaults,
    PackedShiftedFlowFamily,
)

__all__ = ['FluxFamily', 'FluxConditioner', 'without_guidance_embedding', 'pack_latents', 'unpack_latents']


#: FLUX's 2x2 patch tokens (:func:`senseflow_algos.flow.pack_latents`); kept importable from here.
pack_latents, unpack_latents = flow.pack_latents, flow.unpack_latents


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """Positional ids ``(h/2 * w/2, 3)`` of packed latent tokens: ``(0, row, col)``."""
    rows = torch.arange(h // 2, device=device, dtype=dtype)[:, None].expand(h // 2, w // 2)
    cols = torch.arange(w // 2, device=device, dtype=dtype)[None, :].expand(h // 2, w // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)


def without_guidance_embedding(teacher: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """A copy of a FLUX transformer whose config has ``guidance_embeds=False``, the guidance MLP dropped.

    Built on the meta device and filled with copies of the teacher's tensors, so a 12B model is never
    initialised twice.
    """
    from diffusers import FluxTransformer2DModel

    config = dict(teacher.config)
    config['guidance_embeds'] = False
    with torch.device('meta'):
        student = FluxTransformer2DModel.from_config(config)
    state = {
        k: v.detach().to(dtype or v.dtype, copy=True)
        for k, v in teacher.state_dict().items()
        if '.guidance_embedder.' not in k
    }
    student.load_state_dict(state, strict=True, assign=True)
    return student.train()


class FluxConditioner(nn.Module):
    """Frozen CLIP (pooled) + T5 (sequence) prompt encoder, through ``FluxPipeline.encode_prompt``.

    Args:
        text_encoder: CLIP text model. tokenizer: its tokenizer.
        text_encoder_2: T5 encoder. tokenizer_2: its tokenizer.
        max_sequence_length (int): T5 tokens (512 for FLUX.1-dev). Default: ``512``.
    """

    def __init__(self, text_encoder, tokenizer, text_encoder_2, tokenizer_2, max_sequence_length: int = 512):
        super().__init__()
        self.text_encoder = text_encoder.requires_grad_(False)
        self.text_encoder_2 = text_encoder_2.requires_grad_(False)
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.max_sequence_length = max_sequence_length

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> Conditioning:
        from diffusers import FluxPipeline

        pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                            text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2, transformer=None)
        device = next(self.text_encoder.parameters()).device
        embeds, pooled, _ = pipe.encode_prompt(list(prompts), device=device,
                                               max_sequence_length=self.max_sequence_length)
        return {'prompt_embeds': embeds, 'pooled_prompt_embeds': pooled}


class FluxFamily(PackedShiftedFlowFamily):
    """FLUX.1: anchors are the uniform anchors under FLUX's resolution-dependent time shift.

    Args:
        base_seq_len, max_seq_len, base_shift, max_shift: FLUX's scheduler shift parameters (default
            :data:`~senseflow_algos.flow.FLUX_SHIFT`, FLUX.1-dev's: 256, 4096, 0.5, 1.15). At 1024x1024 they give
            anchors {1, .9045, .7595, .5128}, the sigmas FluxPipeline's default 4 steps use; their indices on the
            0..1000 grid are the reference's hard-coded ``[1000, 904, 759, 512]`` (its constants are the shifted values
            truncated to the grid).
        max_sequence_length (int): T5 prompt tokens. Default: ``512``.
        adversarial_weighting (str): Per-anchor GAN weight. Only ``signal_power``, ``(1 - sigma)^2``, as the
            reference FLUX code and the paper. Default: ``signal_power``.
        anchors (list[int], optional): Anchor indices (sigma = index / 1000) instead of the shifted uniform ones.
    """

    name = 'flux'
    network_class = 'FluxTransformer2DModel'
    pipeline_class = 'FluxPipeline'
    text_components = ('text_encoder', 'tokenizer', 'text_encoder_2', 'tokenizer_2')
    # The reference FLUX code: guidance embedding c ~ U(1, 8) for the DMD real score and ISG's teacher step; margin 20.
    defaults = MethodDefaults(dmd_guidance=(1.0, 8.0), isg_guidance=(1.0, 8.0), isg_margin=20)
    uses_cfg = False
    lora_base_overrides = {'guidance_embeds': False}

    def __init__(self, base_seq_len: int = flow.FLUX_SHIFT.base_seq_len, max_seq_len: int = flow.FLUX_SHIFT.max_seq_len,
                 base_shift: float = flow.FLUX_SHIFT.base_shift, max_shift: float = flow.FLUX_SHIFT.max_shift,
                 max_sequence_length: int = 512, adversarial_weighting: str = 'signal_power',
                 anchors: Optional[Sequence[int]] = None):
        self._set_shift(base_seq_len, max_seq_len, base_shift, max_shift)
        self.max_sequence_length = max_sequence_length
        self._set_adversarial_weighting(adversarial_weighting)
        self._set_anchors(anchors)

    # -- loading ------------------------------------------------------------------------------------------------------

    def check_teacher(self, teacher, where):
        if not teacher.config.guidance_embeds:
            raise ValueError(f'{where}: the FLUX teacher has no guidance embedding (guidance_embeds=false); a '
                             'guidance-distilled FLUX.1-dev teacher is expected.')

    def student_from_teacher(self, teacher, dtype=None):
        return without_guidance_embedding(teacher, dtype)

    def make_conditioner(self, modules, max_sequence_length=None):
        return FluxConditioner(modules['text_encoder'], modules['tokenizer'], modules['text_encoder_2'],
                               modules['tokenizer_2'], max_sequence_length=max_sequence_length or
                               self.max_sequence_length)

    def tiny_pipeline(self, seed=0):
        from senseflow_algos.models.tiny import build_tiny_flux_pipeline

        return build_tiny_flux_pipeline(seed=seed)

    def _tiny_sequence_length(self, pipe):
        return pipe.tokenizer_2.model_max_length

    # Schedule, export scheduler and re-noise layout: PackedShiftedFlowFamily's (FLUX's shift parameters).

    # -- networks -----------------------------------------------------------------------------------------------------

    def velocity(self, net, x, sigma, cond, guidance=None):
        b, c, h, w = x.shape
        dtype = next(net.parameters()).dtype
        embeds = cond['prompt_embeds']
        has_guidance = bool(net.config.guidance_embeds)
        if has_guidance and guidance is None:
            raise ValueError('this FLUX network has a guidance embedding: pass guidance (teacher queries)')
        if guidance is not None and not has_guidance:
            raise ValueError('guidance given to a FLUX network without guidance embedding (generator / fake score)')
        out = net(
            hidden_states=pack_latents(x).to(dtype),
            encoder_hidden_states=embeds.to(dtype),
            pooled_projections=cond['pooled_prompt_embeds'].to(dtype),
            # float32 timestep and guidance, as FluxPipeline passes them; the transformer itself casts both to its
            # hidden states' dtype before embedding them, in the pipeline and here alike.
            timestep=self._as_sigma(sigma, x),
            img_ids=image_ids(h, w, x.device, dtype),
            txt_ids=torch.zeros(embeds.shape[1], 3, device=x.device, dtype=dtype),
            guidance=None if guidance is None else guidance.to(device=x.device, dtype=torch.float32),
            return_dict=False,
        )[0]
        return unpack_latents(out.float(), c, h, w)

    def latent_shape(self, vae, resolution):
        factor = 2**(len(vae.config.block_out_channels) - 1)
        side = 2 * (resolution // (factor * 2))
        return (vae.config.latent_channels, side, side)

    # -- export -------------------------------------------------------------------------------------------------------

    def build_pipeline(self, net, vae, conditioner, scheduler):
        from senseflow_algos.models.families.base import ExportError

        if getattr(net.config, 'guidance_embeds', False):
            raise ExportError('the FLUX student has a guidance embedding (guidance_embeds=true); the generator should '
                              'be built with without_guidance_embedding')
        return super().build_pipeline(net, vae, conditioner, scheduler)

    # -- planner ------------------------------------------------------------------------------------------------------

    def planner_text_lengths(self, max_sequence_length):
        return {'text_encoder': 77, 'text_encoder_2': max_sequence_length}  # CLIP (pooled only), T5

    def planner_conditioning(self, teacher_config, lengths, batch, dtype):
        return {'prompt_embeds': torch.empty(batch, lengths['text_encoder_2'], teacher_config.joint_attention_dim,
                                             dtype=dtype, device='meta'),
                'pooled_prompt_embeds': torch.empty(batch, teacher_config.pooled_projection_dim, dtype=dtype,
                                                    device='meta')}
