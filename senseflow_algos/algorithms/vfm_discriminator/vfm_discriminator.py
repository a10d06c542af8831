"""The VFM discriminator as a Composer Algorithm: a hinge GAN on a frozen vision foundation model."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from torch import nn

from senseflow_algos import limits
from senseflow_algos.algorithms.utils import get_dmd_model
from senseflow_algos.algorithms.vfm_discriminator.backbone import DEFAULT_VFM_MODEL, VFMBackbone
from senseflow_algos.algorithms.vfm_discriminator.diffaug import diff_augment
from senseflow_algos.algorithms.vfm_discriminator.heads import (
    DEFAULT_REFERENCE_MAP,
    VFMDiscriminatorHeads,
    fitting_downsamples,
)
from senseflow_algos.algorithms.vfm_discriminator.losses import hinge_d_loss, hinge_g_loss
from senseflow_algos.models.dmd import DMDModel
from senseflow_algos.models.step import GeneratorStep
from senseflow_algos.optim import TrainingPhase

__all__ = ['VFMDiscriminator', 'discriminator_logits', 'reference_features', 'enable_decoder_checkpointing']

#: Names under which the discriminator joins the DMD model.
BACKBONE_ATTR, HEADS_ATTR = 'vfm_backbone', 'discriminator'
#: :attr:`GeneratorStep.scratch <senseflow_algos.models.step.GeneratorStep.scratch>` keys the discriminator shares
#: between the phases of a batch: the backbone features of the real images (computed once per batch) and the
#: generator sample decoded in the generator phase (the critic phase reuses it, detached).
REFERENCE_KEY, PIXELS_KEY = 'vfm_reference', 'vfm_pixels'


def discriminator_logits(backbone: VFMBackbone, heads: VFMDiscriminatorHeads, images: torch.Tensor,
                         text: torch.Tensor, ref_features: Sequence[torch.Tensor], augment: Optional[str] = None,
                         rng: Optional[torch.Generator] = None) -> torch.Tensor:
    """Logits ``(B, N)`` of the heads for ``images`` in [-1, 1], conditioned on ``text`` and reference features.

    ``images`` are DiffAugmented (if ``augment`` is a policy) and keep their gradient path through the frozen
    backbone. ``ref_features`` are the backbone's features of the paired real images, computed once per batch
    without gradient or augmentation (:func:`reference_features`).
    """
    if augment:
        images = diff_augment(images, augment, rng=rng)
    return heads(backbone(images), text, ref_features)


def enable_decoder_checkpointing(vae: nn.Module) -> None:
    """Gradient-checkpoint a diffusers VAE's blocks whenever it runs with gradient (the GAN term's decode).

    Uses diffusers' own block checkpointing (``enable_gradient_checkpointing``): the ``Decoder`` checkpoints its mid
    block and each up block (non-reentrant), and the mid block its resnets, only under ``torch.is_grad_enabled()``;
    decodes under ``torch.no_grad()`` (sampling, the critic's fakes) take the plain path. The switch stays on for the
    whole run: backward recomputes a block through the same code path, so the flag must not change between the
    forward pass and the backward pass.

    Raises:
        TypeError: If ``vae`` has no diffusers gradient checkpointing.
    """
    if not getattr(vae, '_supports_gradient_checkpointing', False):
        raise TypeError(f'algorithms.vfm_discriminator.decoder_grad_checkpointing: {type(vae).__name__} does not '
                        'support diffusers gradient checkpointing')
    vae.enable_gradient_checkpointing()


@torch.no_grad()
def reference_features(backbone: VFMBackbone, real: torch.Tensor) -> list[torch.Tensor]:
    """Backbone features of the real images that condition the heads (no gradient, no augmentation)."""
    return backbone(real)


class VFMDiscriminator(Algorithm):
    """Hinge-loss GAN whose critic is trainable heads on a frozen vision foundation model (SenseFlow, section 3.3).

    At ``Event.INIT`` the frozen backbone and the heads join the DMD model as children ``vfm_backbone`` and
    ``discriminator``; the heads get a ``discriminator`` param group in the one optimizer, so they are stepped in the
    critic phase of every batch, wrapped by FSDP and saved in checkpoints (the backbone is frozen and left out).

    * Generator phase (generator batches): the generator's x0 is decoded through the VAE with gradient, and
      ``lambda_G * mean(w * -mean D(fake))`` is added to the generator loss.
    * Critic phase (every batch): ``mean(w * relu(1 - D(real))) + mean(w * relu(1 + D(fake)))`` on the detached
      sample, added to the critic loss.

    ``w = model.family.adversarial_weight(sigma)`` at each sample's anchor (FLUX ``(1 - sigma)^2``, SD 3.5 the
    reference code's ``scheduler.sigmas[t_idx]^2``; ``model.family_kwargs.adversarial_weighting``). Heads are
    conditioned on the pooled CLIP text embedding and on the backbone features of the batch's real image
    (``batch['image']``), which the data must carry.

    Args:
        backbone (str): timm ViT name. Default: DINOv2 ViT-L/14 (``vit_large_patch14_dinov2.lvd142m``).
        pretrained (bool): Load the backbone's pretrained weights through timm. Default: ``True``.
        block_indices (Sequence[int], optional): Blocks read as feature maps (plus the embedding output).
            Default: the reference's 7 blocks for a 24-block ViT, evenly spread otherwise.
        input_size (int, optional): Side the images are resized to for the backbone (a multiple of its patch
            size). Default: the backbone's own size.
        backbone_kwargs (dict, optional): Extra ``timm.create_model`` kwargs (tiny test backbones).
        generator_weight (float): lambda_G. Default: ``2.0`` (FLUX; 0.1 for SD 3.5).
        augment (str): DiffAugment policy on the discriminator's inputs. Default: ``color,translation,cutout``.
        cmap_dim (int): Conditioning projection width of the heads. Default: ``64``.
        num_downsample (int): Stride-2 stages per head. Default: ``3``.
        hidden_channels (int, optional): Head trunk width. Default (``None``): the backbone width, as the reference's
            heads (1024 for ViT-L: about 773M head parameters over 8 heads; see the README for cheaper widths).
        grad_checkpointing (bool): Recompute backbone blocks in backward to save memory. Default: ``False``.
        reference_map (str): How each head adds the reference image's map to the text projection: ``per_location``
            (the released code) or ``pooled`` (averaged to one vector per sample). Default: ``per_location``.
        decoder_grad_checkpointing (bool): Checkpoint the VAE decoder's blocks in the generator term's
            differentiable decode. Default: ``False``.
    """

    def __init__(self, backbone: str = DEFAULT_VFM_MODEL, pretrained: bool = True,
                 block_indices: Optional[Sequence[int]] = None, input_size: Optional[int] = None,
                 backbone_kwargs: Optional[dict[str, Any]] = None, generator_weight: float = 2.0,
                 augment: str = 'color,translation,cutout', cmap_dim: int = 64, num_downsample: int = 3,
                 hidden_channels: Optional[int] = None, grad_checkpointing: bool = False,
                 reference_map: str = DEFAULT_REFERENCE_MAP, decoder_grad_checkpointing: bool = False):
        limits.check('algorithms.vfm_discriminator.generator_weight', generator_weight)
        limits.check('algorithms.vfm_discriminator.reference_map', reference_map)
        diff_augment(torch.zeros(1, 3, 8, 8), augment)  # reject an unknown policy now, not at the first batch
        self.backbone_name = backbone
        self.pretrained = pretrained
        self.block_indices = None if block_indices is None else list(block_indices)
        self.input_size = input_size
        self.backbone_kwargs = dict(backbone_kwargs or {})
        self.generator_weight = generator_weight
        self.augment = augment
        self.head_kwargs = dict(cmap_dim=cmap_dim, num_downsample=num_downsample, hidden_channels=hidden_channels,
                                reference_map=reference_map)
        self.grad_checkpointing = grad_checkpointing
        self.decoder_grad_checkpointing = decoder_grad_checkpointing

    def __repr__(self) -> str:
        return f'VFMDiscriminator(backbone={self.backbone_name!r}, generator_weight={self.generator_weight})'

    # -- events -------------------------------------------------------------------------------------------------------

    def match(self, event: Event, state: State) -> bool:
        if event == Event.INIT:
            return True
        if event != Event.AFTER_LOSS:
            return False
        phase = get_dmd_model(state, 'VFMDiscriminator').phase
        return phase is TrainingPhase.CRITIC or (phase is TrainingPhase.GENERATOR and self.generator_weight > 0)

    def apply(self, event: Event, state: State, logger: Logger) -> Optional[int]:
        model = get_dmd_model(state, 'VFMDiscriminator')
        if event == Event.INIT:
            self._attach(model, state)
            return None
        real = state.batch.get('image') if isinstance(state.batch, dict) else None
        if real is None:
            raise KeyError("VFMDiscriminator needs real images: the batch has no 'image' (prompt-only or "
                           'latent-only data). Use a dataset with images or remove algorithms.vfm_discriminator.')
        step: GeneratorStep = state.outputs
        weight = model.family.adversarial_weight(step.sigma.float())
        text = step.cond['pooled_prompt_embeds'].float()
        backbone, heads = getattr(model, BACKBONE_ATTR), getattr(model, HEADS_ATTR)
        real = real.float()
        # The reference features of a batch are computed once; the critic phase of a generator batch reuses them.
        if REFERENCE_KEY not in step.scratch:
            step.scratch[REFERENCE_KEY] = reference_features(backbone, real)
        ref = step.scratch[REFERENCE_KEY]
        if model.phase is TrainingPhase.GENERATOR:
            pixels = model.family.decode_latents(model.vae, step.x0)  # with gradient into the generator
            step.scratch[PIXELS_KEY] = pixels  # the critic phase of this batch reuses it, detached
            logits = discriminator_logits(backbone, heads, pixels, text, ref, self.augment, model.rng('vfm_generator'))
            model.add_loss_term(state.loss, 'generator/adversarial', hinge_g_loss(logits, weight),
                                self.generator_weight)
            return None
        if PIXELS_KEY in step.scratch:
            pixels = step.scratch[PIXELS_KEY].detach()
        else:
            with torch.no_grad():
                pixels = model.family.decode_latents(model.vae, step.x0.detach())
        rng = model.rng('vfm_discriminator')
        logits_fake = discriminator_logits(backbone, heads, pixels, text, ref, self.augment, rng)
        logits_real = discriminator_logits(backbone, heads, real, text, ref, self.augment, rng)
        model.add_loss_term(state.loss, 'discriminator/hinge', hinge_d_loss(logits_real, logits_fake, weight))
        return None

    # -- set-up -------------------------------------------------------------------------------------------------------

    def build_backbone(self) -> VFMBackbone:
        """The frozen backbone this configuration uses (on the current default device, e.g. ``meta`` to plan)."""
        return VFMBackbone(self.backbone_name, pretrained=self.pretrained, block_indices=self.block_indices,
                           input_size=self.input_size, model_kwargs=self.backbone_kwargs,
                           grad_checkpointing=self.grad_checkpointing)

    def build_heads(self, backbone: VFMBackbone, text_dim: int) -> VFMDiscriminatorHeads:
        """The trainable heads for ``backbone``'s feature maps and a pooled text embedding of width ``text_dim``.

        Only the downsampling stages the backbone's grid goes through are built: a stage that never runs would hold
        parameters with no gradient (and no optimizer state to checkpoint).
        """
        head_kwargs = dict(self.head_kwargs)
        head_kwargs['num_downsample'] = fitting_downsamples(min(backbone.grid_size), head_kwargs['num_downsample'])
        return VFMDiscriminatorHeads([backbone.embed_dim] * backbone.num_features_maps, c_dim=text_dim,
                                     **head_kwargs)

    def _attach(self, model: DMDModel, state: State) -> None:
        if hasattr(model, HEADS_ATTR):
            raise RuntimeError('the DMD model already has a discriminator; add VFMDiscriminator once')
        # The width of cond['pooled_prompt_embeds']: the family's when it says (Qwen-Image pools its sequence
        # embedding; its config's pooled_projection_dim is an unused leftover), else the transformer's.
        pooled_dim = getattr(model.family, 'pooled_text_dim', None)
        text_dim = int(pooled_dim(model.teacher.config) if pooled_dim else model.teacher.config.pooled_projection_dim)
        # Fixed seed: the heads' initial weights do not depend on what ran before INIT.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(model.seed)
            backbone = self.build_backbone()
            heads = self.build_heads(backbone, text_dim)
        backbone._fsdp_wrap = False  # frozen and small next to the transformers: replicated on every rank
        setattr(model, BACKBONE_ATTR, backbone.to(model.device))
        setattr(model, HEADS_ATTR, heads.to(model.device))
        model.frozen_modules.append(BACKBONE_ATTR)
        if self.decoder_grad_checkpointing:
            enable_decoder_checkpointing(model.vae)
        optimizer = state.optimizers[0]
        optimizer.add_param_group({'params': list(heads.parameters()), 'role': 'discriminator'})
