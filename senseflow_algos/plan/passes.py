"""The network passes of one DMD iteration, each run once on meta tensors at the per-device micro-batch.

Every pass calls the project's own code on the meta model: the family's ``velocity`` (FLUX guidance embedding, SD 3.5
batched CFG), ``flow`` losses, the family's ``decode_latents`` / ``encode_images``, the VFM discriminator's
``discriminator_logits`` and hinge losses. :mod:`senseflow_algos.plan.flops` multiplies them by how often one TTUR
cycle runs each.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

from senseflow_algos.models.blocks import transformer_blocks
from senseflow_algos.plan.metarun import PassCost, measure_pass
from senseflow_algos.plan.networks import MetaModel
from senseflow_algos.plan.settings import RunSettings

__all__ = ['PassCosts', 'measure_passes', 'text_lengths']


@dataclass
class PassCosts:
    """Measured passes at micro-batch ``batch``. ``None`` where the run has no such pass."""
    batch: int
    generator: PassCost  # forward + backward of the generator (or fake score: same network) with its loss
    teacher: PassCost  # guided teacher forward, no grad (SD 3.5: the CFG batch of 2b)
    vae_decode: Optional[PassCost] = None  # decode with gradient to the latents
    vae_encode: Optional[PassCost] = None
    text_encoders: Optional[dict[str, PassCost]] = None  # per encoder, one forward (per prompt set)
    backbone: Optional[PassCost] = None  # DiffAugment + backbone, gradient to the pixels
    heads_generator: Optional[PassCost] = None  # heads with gradient to the features and to their parameters
    heads_critic: Optional[PassCost] = None  # heads with gradient to their parameters only


def text_lengths(meta: MetaModel, settings: RunSettings) -> dict[str, int]:
    """Token count each text encoder is run at (the family's ``planner_text_lengths`` at the conditioner's
    ``max_sequence_length``)."""
    family = meta.model.family
    conditioner = meta.model.conditioner
    length = conditioner.max_sequence_length if conditioner is not None else family.max_sequence_length
    return family.planner_text_lengths(length)


def _conditioning(meta: MetaModel, settings: RunSettings, b: int) -> dict[str, torch.Tensor]:
    """Meta conditioning tensors shaped as the text encoders (or the precomputed data) deliver them."""
    return meta.model.family.planner_conditioning(meta.model.teacher.config, text_lengths(meta, settings), b,
                                                  meta.encoder_dtype)


def _decoder_units(vae: nn.Module) -> list[nn.Module]:
    """What diffusers' VAE gradient checkpointing wraps: the decoder's mid block and each up block."""
    return [vae.decoder.mid_block, *vae.decoder.up_blocks]


@contextlib.contextmanager
def _unwrapped_vae(vae: nn.Module) -> Iterator[None]:
    """Switch diffusers' gradient checkpointing of the VAE off for the block (the VFM discriminator may have switched
    it on), and back."""
    was = bool(getattr(vae, 'is_gradient_checkpointing', False))
    if was:
        vae.disable_gradient_checkpointing()
    try:
        yield
    finally:
        if was:
            vae.enable_gradient_checkpointing()


def _parameters(model: nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


def measure_passes(meta: MetaModel, settings: RunSettings, batch: int) -> PassCosts:
    """Measure every pass of the run once at micro-batch ``batch``, with the networks cast to their compute dtypes
    (:func:`senseflow_algos.plan.planner.cast_to_compute`)."""
    from senseflow_algos import flow
    from senseflow_algos.algorithms.isg import isg_loss

    model, family = meta.model, meta.model.family
    exclude = _parameters(model)
    c, h, w = model.latent_shape
    b = batch

    def latents(requires_grad=False):
        return torch.empty(b, c, h, w, device='meta', requires_grad=requires_grad)

    sigma = torch.empty(b, device='meta')
    cond = _conditioning(meta, settings, b)

    def generator_step():
        x_t = latents()
        v = family.velocity(model.generator, x_t, sigma, cond)
        x0 = flow.x0_from_velocity(x_t, v, sigma)
        loss = flow.dmd_loss(x0, latents(), latents())
        if settings.isg:
            loss = loss + isg_loss(x_t, v, sigma, sigma, latents())
        return loss

    costs = PassCosts(
        batch=b,
        generator=measure_pass(generator_step, True, exclude, transformer_blocks(model.generator)),
        teacher=measure_pass(lambda: family.velocity(model.teacher, latents(), sigma, cond,
                                                     torch.empty(b, device='meta')), False, exclude))
    side = settings.resolution
    pixels_shape = (b, 3, side, side)
    with _unwrapped_vae(model.vae):  # measured unwrapped; checkpointing is accounted from the block attribution
        if meta.vfm is not None:
            costs.vae_decode = measure_pass(lambda: family.decode_latents(model.vae, latents(True)), True, exclude,
                                            _decoder_units(model.vae))
            costs.backbone, costs.heads_generator, costs.heads_critic = _vfm_passes(meta, pixels_shape, exclude)
        if getattr(model.vae, 'encoder', None) is not None:
            costs.vae_encode = measure_pass(
                lambda: family.encode_images(model.vae, torch.empty(pixels_shape, device='meta')), False, exclude)
    if model.conditioner is not None:
        costs.text_encoders = {}
        for name, length in text_lengths(meta, settings).items():
            encoder = getattr(model.conditioner, name)
            ids = torch.zeros(b, length, dtype=torch.long, device='meta')
            with _meta_autocast_off():
                costs.text_encoders[name] = measure_pass(lambda encoder=encoder, ids=ids: encoder(ids)[0], False,
                                                         exclude)
    return costs


def _vfm_passes(meta: MetaModel, pixels_shape, exclude) -> tuple[PassCost, PassCost, PassCost]:
    """Backbone (with DiffAugment) and heads passes of the VFM discriminator."""
    from senseflow_algos.algorithms.vfm_discriminator.diffaug import diff_augment

    model, vfm = meta.model, meta.vfm
    backbone, heads = model.vfm_backbone, model.discriminator
    was = backbone.grad_checkpointing
    backbone.grad_checkpointing = False  # measured unwrapped; checkpointing is accounted from the block attribution
    b = pixels_shape[0]

    def backbone_pass():
        pixels = torch.empty(pixels_shape, device='meta', requires_grad=True)
        images = diff_augment(pixels, vfm.augment) if vfm.augment else pixels
        return torch.cat([f.flatten() for f in backbone(images)])

    try:
        backbone_cost = measure_pass(backbone_pass, True, exclude, list(backbone.model.blocks))
        with torch.no_grad():
            feats = backbone(torch.empty(pixels_shape, device='meta'))
    finally:
        backbone.grad_checkpointing = was
    text = torch.empty(b, model.family.pooled_text_dim(model.teacher.config), device='meta')  # as the heads are sized

    def heads_pass(input_grad: bool):
        from senseflow_algos.algorithms.vfm_discriminator.losses import hinge_g_loss

        def run():
            features = [torch.empty_like(f, requires_grad=input_grad) for f in feats]
            return hinge_g_loss(heads(features, text, feats))
        return run

    return (backbone_cost, measure_pass(heads_pass(True), True, exclude),
            measure_pass(heads_pass(False), True, exclude))


@contextlib.contextmanager
def _meta_autocast_off():
    """``torch.autocast(device_type='meta', enabled=False)`` as a no-op inside the block: torch has no autocast dtype
    for the meta device and raises, while a disabled autocast changes nothing (Qwen2.5-VL's rotary embedding opens
    one around its cos / sin)."""
    real = torch.autocast

    class _Autocast(real):
        def __init__(self, device_type, *args, **kwargs):
            self._noop = device_type == 'meta'
            if not self._noop:
                super().__init__(device_type, *args, **kwargs)

        def __enter__(self):
            return None if self._noop else super().__enter__()

        def __exit__(self, *exc):
            return None if self._noop else super().__exit__(*exc)

    torch.autocast = _Autocast
    try:
        yield
    finally:
        torch.autocast = real
