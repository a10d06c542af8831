"""The small interface every teacher family implements (FLUX, SD 3.5, ...).

A family knows how to load its diffusers components, how its prompts become conditioning tensors, how to
query one of its networks for a velocity at ``(x_t, sigma)`` (with or without teacher guidance), its four
anchors, how its 0..1000 timestep indices map to sigma, and how latents go to and from pixels. Everything
else (DMD, ISG, backward simulation, samplers) is family-agnostic and works on unpacked ``(B, C, h, w)``
latents with the helpers in :mod:`senseflow_algos.flow`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

__all__ = ['Components', 'ModelFamily', 'Conditioning', 'UNIFORM_ANCHORS', 'DEFAULT_NUM_STEPS', 'drop_vae_encoder']

#: Student sampling steps (= anchors) when none are named: the paper's 4.
DEFAULT_NUM_STEPS = 4

#: The four generator timesteps before each family's shift (``flow.uniform_times(4)``; other step counts: that).
UNIFORM_ANCHORS = (1.0, 0.75, 0.5, 0.25)

#: Conditioning tensors by name, e.g. ``prompt_embeds`` and ``pooled_prompt_embeds``.
Conditioning = dict[str, torch.Tensor]


@dataclass
class Components:
    """Everything a DMD run builds from one teacher.

    Attributes:
        teacher: The frozen teacher network (FLUX keeps its guidance embedding).
        student: The network generator and fake score are copied from (FLUX: without guidance embedding).
        vae: The frozen autoencoder.
        conditioner: Frozen text encoders and tokenizers as one module: ``conditioner(prompts) -> Conditioning``;
            ``None`` when built without text encoders (training on precomputed embeddings).
        scheduler_config: The teacher scheduler's config (for export).
    """
    teacher: nn.Module
    student: nn.Module
    vae: nn.Module
    conditioner: Optional[nn.Module]
    scheduler_config: dict


def drop_vae_encoder(vae: nn.Module) -> nn.Module:
    """Remove the encoder half of an ``AutoencoderKL`` (training on precomputed latents needs only the decoder)."""
    vae.encoder = None
    if getattr(vae, 'quant_conv', None) is not None:
        vae.quant_conv = None
    return vae


class ModelFamily(abc.ABC):
    """Family-specific behaviour. Subclasses are stateless apart from their config.

    Args:
        teacher_guidance_embedded (bool): The teacher takes guidance through an embedding (FLUX-dev), not CFG.
    """

    #: Registry name used in YAML (``model.family``).
    name: str = ''
    #: Margin (in 0..1000 index units) that ISG keeps from both ends of a segment.
    isg_margin: int = 20

    # -- loading ------------------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def load_components(self, pretrained: str, torch_dtype: torch.dtype = torch.float32,
                        teacher_dtype: Optional[torch.dtype] = None, revision: Optional[str] = None,
                        text_encoders: bool = True, vae_encoder: bool = True,
                        encoder_dtype: Optional[torch.dtype] = None, transformers_on_meta: bool = False) -> Components:
        """Load every component with ``from_pretrained`` from a hub id or a local diffusers folder.

        ``torch_dtype`` is the student's (generator and fake score), ``teacher_dtype`` the teacher's (default: the
        student's) and ``encoder_dtype`` that of the VAE and text encoders (default: the teacher's).
        ``text_encoders=False`` loads no text encoder (``conditioner=None``); ``vae_encoder=False`` drops the VAE's
        encoder: for training on precomputed embeddings and latents. ``transformers_on_meta=True`` reads no
        transformer weight: teacher and student are built on the meta device from the transformer's config, to be
        filled by FSDP from global rank 0 (the lean start, :func:`~senseflow_algos.models.fsdp.lean_start`).
        """

    @abc.abstractmethod
    def tiny_components(self, seed: int = 0, text_encoders: bool = True, vae_encoder: bool = True) -> Components:
        """Random-weight tiny components of the same classes, for CPU tests and demos (flags as above)."""

    def load_encoders(self, pretrained: str, torch_dtype: torch.dtype = torch.float32,
                      revision: Optional[str] = None) -> tuple[nn.Module, nn.Module]:
        """Only the conditioner and the VAE (``data_prep/precompute.py``), no transformer."""
        return self._load_conditioner(pretrained, torch_dtype, revision), self._load_vae(pretrained, torch_dtype,
                                                                                         revision)

    def _load_conditioner(self, pretrained: str, torch_dtype: torch.dtype, revision: Optional[str]) -> nn.Module:
        """The family's frozen text encoders and tokenizers from a pipeline folder or hub id."""
        raise NotImplementedError(f'{type(self).__name__} does not implement _load_conditioner (needed to precompute)')

    @staticmethod
    def _load_transformer(model_class: type, pretrained: str, torch_dtype: torch.dtype, revision: Optional[str],
                          on_meta: bool = False) -> nn.Module:
        """The teacher transformer of class ``model_class`` (eval mode) with its weights, or ``on_meta`` without.

        On meta it is built from the same ``transformer/config.json`` as ``from_pretrained`` reads, so parameters and
        buffers have the names, shapes and dtypes of the loaded network while taking no memory.
        """
        kw = dict(subfolder='transformer', revision=revision)
        if not on_meta:
            return model_class.from_pretrained(pretrained, torch_dtype=torch_dtype, **kw)
        if getattr(model_class, '_keep_in_fp32_modules', None):  # from_pretrained would keep those in fp32
            raise NotImplementedError(f'{model_class.__name__} keeps modules in fp32: a meta build would not match')
        with torch.device('meta'):
            net = model_class.from_config(model_class.load_config(pretrained, **kw))
        net.register_to_config(_name_or_path=pretrained)  # as from_pretrained records it
        return nn.Module.to(net, torch_dtype).eval()  # nn.Module's: diffusers' .to() warns about fp32 modules

    @staticmethod
    def _load_vae(pretrained: str, torch_dtype: torch.dtype, revision: Optional[str]) -> nn.Module:
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(pretrained, subfolder='vae', torch_dtype=torch_dtype, revision=revision)

    def tiny_encoders(self, seed: int = 0) -> tuple[nn.Module, nn.Module]:
        """The conditioner and VAE of :meth:`tiny_components` (same weights for the same seed)."""
        components = self.tiny_components(seed=seed)
        return components.conditioner, components.vae

    # -- schedule -----------------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def anchors(self, latent_hw: tuple[int, int], num_steps: int = DEFAULT_NUM_STEPS) -> torch.Tensor:
        """The generator's ``num_steps`` sigmas (float64, descending, first is 1) for latents of size ``latent_hw``.

        They are :func:`~senseflow_algos.flow.uniform_times` (``[1, .75, .5, .25]`` for 4 steps) through the family's
        time shift, as the reference derives its 4 anchors.
        """

    @abc.abstractmethod
    def index_to_sigma(self, index: torch.Tensor | int) -> torch.Tensor:
        """Map a 0..1000 timestep index to sigma the way this family's scheduler does."""

    @abc.abstractmethod
    def sigma_to_index(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """Inverse of :meth:`index_to_sigma` onto the integer grid, as the family's reference code (sigma 0 maps to 0)."""

    @abc.abstractmethod
    def dmd_sigma(self, n: int, rng: torch.Generator, device=None) -> torch.Tensor:
        """Sigmas at which the DMD loss compares teacher and fake score."""

    @abc.abstractmethod
    def fake_score_sigma(self, n: int, rng: torch.Generator, device=None) -> torch.Tensor:
        """Sigmas for the fake score's flow-matching loss (logit-normal, family-shifted)."""

    #: Per-anchor GAN weightings this family offers (``model.family_kwargs.adversarial_weighting``).
    adversarial_weightings: tuple[str, ...] = ('signal_power',)
    #: The weighting in use; families set it from their ``adversarial_weighting`` argument.
    adversarial_weighting: str = 'signal_power'

    def _set_adversarial_weighting(self, weighting: str) -> None:
        if weighting not in self.adversarial_weightings:
            raise ValueError(f'model.family_kwargs.adversarial_weighting={weighting!r} is not available for family '
                             f'{self.name!r}; choose one of {list(self.adversarial_weightings)}')
        self.adversarial_weighting = weighting

    def adversarial_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """Per-sample GAN weight at each sample's anchor ``sigma`` (both the generator and the discriminator term).

        ``signal_power``: ``(1 - sigma)^2``, the paper's alpha_t^2 and the reference FLUX code. Families may offer
        others (SD 3.5: ``scheduler_sigma_squared``, the reference SD 3.5 code). Either way GAN feedback matters more
        toward the clean end.
        """
        if self.adversarial_weighting == 'signal_power':
            return (1 - sigma)**2
        return self._adversarial_weight(sigma)

    def _adversarial_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f'{type(self).__name__} has no {self.adversarial_weighting!r} weighting')

    # -- networks -----------------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def velocity(self, net: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning,
                 guidance: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Velocity of ``net`` at ``(x, sigma)`` in float32, ``x`` unpacked ``(B, C, h, w)``, ``sigma`` ``(B,)``.

        Args:
            guidance: Per-sample teacher guidance ``(B,)``: the embedded guidance value (FLUX) or the CFG scale
                (SD 3.5, using ``cond['negative_*']`` as the unconditional branch). ``None`` queries the network
                plainly, as for the generator and the fake score.
        """

    @abc.abstractmethod
    def latent_shape(self, vae: nn.Module, resolution: int) -> tuple[int, int, int]:
        """``(C, h, w)`` of the latents of a square image of side ``resolution``."""

    def encode_images(self, vae: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] to normalised latents ``(z - shift) * scale`` (posterior mean)."""
        vae_dtype = next(vae.parameters()).dtype
        z = vae.encode(pixels.to(vae_dtype)).latent_dist.mode()
        return ((z.float() - self._shift(vae)) * vae.config.scaling_factor)

    def decode_latents(self, vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents to pixels in about [-1, 1] (differentiable)."""
        vae_dtype = next(vae.parameters()).dtype
        z = latents / vae.config.scaling_factor + self._shift(vae)
        return vae.decode(z.to(vae_dtype)).sample.float()

    @staticmethod
    def _shift(vae: nn.Module) -> float:
        return float(getattr(vae.config, 'shift_factor', None) or 0.0)

    # -- helpers shared by families -----------------------------------------------------------------------------------

    @staticmethod
    def _as_sigma(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0]).to(torch.float32)

    def isg_mid_sigma(self, sigma_cur: torch.Tensor, sigma_next: torch.Tensor, rng: torch.Generator,
                      margin: Optional[int] = None) -> torch.Tensor:
        """A random intermediate sigma inside each segment, uniform on the integer index grid.

        Draws ``t_mid`` uniformly in ``[t_next + m, t_cur - m]`` (``m`` = ``margin``, default :attr:`isg_margin`),
        per sample, and maps it to sigma with :meth:`index_to_sigma`.
        """
        margin = self.isg_margin if margin is None else margin
        lo = self.sigma_to_index(sigma_next) + margin
        hi = self.sigma_to_index(sigma_cur) - margin
        if (hi < lo).any():
            raise ValueError(f'ISG margin {margin} leaves no room inside a segment '
                             f'(index ranges {lo.tolist()}..{hi.tolist()})')
        u = torch.rand(lo.shape, generator=rng, dtype=torch.float64, device=rng.device).to(lo.device)
        t_mid = lo + torch.floor(u * (hi - lo + 1))
        return self.index_to_sigma(t_mid)


def shifted_anchors(shift_fn, num_steps: int = DEFAULT_NUM_STEPS) -> torch.Tensor:
    """Apply a family's time shift to the ``num_steps`` uniform pre-shift times (:func:`flow.uniform_times`)."""
    from senseflow_algos import flow

    return shift_fn(flow.uniform_times(num_steps))

