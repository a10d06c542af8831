"""Heads of the VFM (vision-foundation-model) discriminator, method notes §4.

* :class:`DiscriminatorHead`: a small spectral-norm conv head on one feature map, conditioned on a text embedding
  and on the same backbone's features of a reference image (added per location, as the released code does, or
  pooled to one vector); emits one logit per output location.
* :class:`VFMDiscriminatorHeads`: one head per feature map, logits concatenated to ``(B, N)``.

Only the heads are optimised (§4.4). The frozen backbone whose feature maps they judge is in
:mod:`senseflow_algos.algorithms.vfm_discriminator.backbone`; the hinge losses live in
:mod:`senseflow_algos.algorithms.vfm_discriminator.losses` and the augmentation in
:mod:`senseflow_algos.algorithms.vfm_discriminator.diffaug`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from senseflow_algos.limits import REFERENCE_MAPS

if TYPE_CHECKING:
    from senseflow_algos.algorithms.vfm_discriminator.backbone import VFMBackbone

__all__ = [
    'REFERENCE_MAPS', 'DEFAULT_REFERENCE_MAP', 'fitting_downsamples', 'BatchNormLocal', 'DiscriminatorHead',
    'VFMDiscriminatorHeads'
]

DEFAULT_REFERENCE_MAP = 'per_location'


class BatchNormLocal(nn.Module):
    """Batch normalisation with batch statistics over small virtual groups ("local" / ghost batch norm).

    The batch is split into ``G`` equal groups of at most ``virtual_batch_size`` samples (``G`` is the smallest
    divisor of ``B`` that is at least ``ceil(B / virtual_batch_size)``), and each group is normalised with its own
    per-channel mean and (biased) variance over samples and spatial positions. Batch statistics are used in train and
    eval mode alike; there are no running statistics. Followed by a per-channel affine transform.

    Args:
        num_features (int): Channels ``C``.
        virtual_batch_size (int): Maximum group size.
        eps (float): Added to the variance.
        affine (bool): Learn a per-channel scale and shift.
    """

    def __init__(self, num_features: int, virtual_batch_size: int = 8, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__()
        if virtual_batch_size < 1:
            raise ValueError(f'virtual_batch_size must be >= 1, got {virtual_batch_size}')
        self.num_features = num_features
        self.virtual_batch_size = virtual_batch_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None

    def num_groups(self, batch_size: int) -> int:
        """Number of virtual groups used for a batch of ``batch_size`` samples."""
        groups = -(-batch_size // self.virtual_batch_size)
        while batch_size % groups:
            groups += 1
        return groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` of shape ``(B, C, *spatial)``."""
        b, c = x.shape[:2]
        g = self.num_groups(b)
        # Statistics in fp32 for stability under mixed precision.
        xg = x.reshape(g, b // g, c, -1).float()
        mean = xg.mean(dim=(1, 3), keepdim=True)
        var = xg.var(dim=(1, 3), keepdim=True, unbiased=False)
        out = ((xg - mean) * torch.rsqrt(var + self.eps)).reshape(x.shape).to(x.dtype)
        if self.weight is not None:
            shape = (1, c) + (1,) * (x.ndim - 2)
            out = out * self.weight.view(shape).to(out.dtype) + self.bias.view(shape).to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return f'{self.num_features}, virtual_batch_size={self.virtual_batch_size}, eps={self.eps}'


@contextmanager
def _no_power_iteration() -> Iterator[None]:
    """Skip spectral norm's initial power iterations (they only refine the ``u``/``v`` buffers).

    For heads built on the meta device (planning, parameter counts): there the iterations compute nothing but cost
    about 0.5-3 s per conv through PyTorch's Python meta kernels, minutes for the default-width heads.
    """
    cls = getattr(torch.nn.utils.parametrizations, '_SpectralNorm', None)
    if cls is None or not hasattr(cls, '_power_method'):
        yield
        return
    original = cls._power_method
    cls._power_method = lambda self, weight_mat, n_power_iterations: None
    try:
        yield
    finally:
        cls._power_method = original


def _sn_conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Module:
    """Spectral-norm conv with circular ("same") padding."""
    conv = nn.Conv2d(
        in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, padding_mode='circular'
    )
    if conv.weight.is_meta:
        with _no_power_iteration():
            return spectral_norm(conv)
    return spectral_norm(conv)


def _conv_block(in_channels: int, out_channels: int, kernel_size: int, virtual_batch_size: int) -> nn.Sequential:
    """SN conv -> BatchNormLocal -> LeakyReLU(0.2)."""
    return nn.Sequential(
        _sn_conv(in_channels, out_channels, kernel_size),
        BatchNormLocal(out_channels, virtual_batch_size),
        nn.LeakyReLU(0.2),
    )


class _Residual(nn.Module):
    """``(x + fn(x)) / sqrt(2)``, keeping the activation scale roughly constant."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.fn(x)) / math.sqrt(2.0)


def fitting_downsamples(side: int, num_downsample: int, min_resolution: int = 2) -> int:
    """How many of ``num_downsample`` stride-2 stages a map of side ``side`` goes through before its side would
    drop below ``min_resolution`` (the same rule :class:`_ConvTrunk` applies at run time)."""
    stages = 0
    while stages < num_downsample and (side + 1) // 2 >= min_resolution:  # stride-2 output side is ceil(side / 2)
        side = (side + 1) // 2
        stages += 1
    return stages


class _ConvTrunk(nn.Module):
    """The head's conv trunk: 1x1 conv block, then ``num_downsample`` stages of [residual 3x3 block] + stride-2 conv.

    Stage ``i`` is ``[Residual(3x3 block)] (for i > 0) -> stride-2 SN 3x3 conv``, so ``num_downsample=3`` gives the
    method notes' sequence: block, down, res, down, res, down. A stage is skipped, together with all later ones, when
    its output would have a side below ``min_resolution``; those stages' parameters then get no gradient (with DDP,
    size the head so that every stage runs, or enable ``find_unused_parameters``).
    """

    def __init__(
        self, in_channels: int, channels: int, num_downsample: int, virtual_batch_size: int, min_resolution: int
    ) -> None:
        super().__init__()
        self.min_resolution = min_resolution
        self.stem = _conv_block(in_channels, channels, 1, virtual_batch_size)
        stages = []
        for i in range(num_downsample):
            layers: list[nn.Module] = []
            if i > 0:
                layers.append(_Residual(_conv_block(channels, channels, 3, virtual_batch_size)))
            layers.append(_sn_conv(channels, channels, 3, stride=2))
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            if (min(x.shape[-2:]) + 1) // 2 < self.min_resolution:  # stride-2 output side is ceil(side / 2)
                break
            x = stage(x)
        return x


class DiscriminatorHead(nn.Module):
    """Discriminator head on one backbone feature map, conditioned on text and on a reference image (§4.2).

    * ``main``: :class:`_ConvTrunk` on the feature map; ``cls``: SN 1x1 conv to ``cmap_dim`` -> ``out`` per location.
    * ``cmapper``: ``Linear(c_dim, cmap_dim)`` on the pooled text embedding -> ``cmap``, one vector per sample.
    * ``refmapper``: the same trunk structure (own weights) on the reference image's feature map, SN 1x1 conv to
      ``cmap_dim`` -> ``refmap``. With ``reference_map='per_location'`` (the released code) ``refmap`` stays
      spatial and is added location by location, so the reference map must have the judged map's grid. With
      ``'pooled'`` it is averaged over locations to one vector per sample first, so any reference grid works.

    Each location's logit is ``sum_c out_c * (cmap_c + refmap_c) / sqrt(cmap_dim)``; the output is flattened to
    ``(B, h * w)`` where ``(h, w)`` is the trunk output size.

    Args:
        channels (int): Channels of the input feature map (backbone ``embed_dim``).
        c_dim (int): Width of the text embedding (768 for CLIP ViT-L/14 text).
        cmap_dim (int): Width of the projection space (64).
        num_downsample (int): Stride-2 stages in each trunk (3 in the official head).
        hidden_channels (int, optional): Trunk width. Default ``channels`` (as in the projected-GAN style heads).
        virtual_batch_size (int): Group size of :class:`BatchNormLocal`.
        min_resolution (int): Skip downsampling stages whose output side would fall below this.
        use_ref (bool): Build ``refmapper`` and require reference features in ``forward``.
        reference_map (str): ``'per_location'`` or ``'pooled'`` (see above). Default :data:`DEFAULT_REFERENCE_MAP`.
    """

    def __init__(
        self,
        channels: int,
        c_dim: int = 768,
        cmap_dim: int = 64,
        num_downsample: int = 3,
        hidden_channels: Optional[int] = None,
        virtual_batch_size: int = 8,
        min_resolution: int = 2,
        use_ref: bool = True,
        reference_map: str = DEFAULT_REFERENCE_MAP,
    ) -> None:
        super().__init__()
        if num_downsample < 0:
            raise ValueError(f'num_downsample must be >= 0, got {num_downsample}')
        if reference_map not in REFERENCE_MAPS:
            raise ValueError(f'reference_map must be one of {list(REFERENCE_MAPS)}, got {reference_map!r}')
        hidden = hidden_channels or channels
        self.c_dim = c_dim
        self.cmap_dim = cmap_dim
        self.use_ref = use_ref
        self.reference_map = reference_map
        self.main = _ConvTrunk(channels, hidden, num_downsample, virtual_batch_size, min_resolution)
        self.cls = _sn_conv(hidden, cmap_dim, 1)
        self.cmapper = nn.Linear(c_dim, cmap_dim)
        self.refmapper = (
            nn.Sequential(
                _ConvTrunk(channels, hidden, num_downsample, virtual_batch_size, min_resolution),
                _sn_conv(hidden, cmap_dim, 1),
            )
            if use_ref
            else None
        )

    def forward(self, x: torch.Tensor, c: torch.Tensor, ref: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-location logits.

        Args:
            x (Tensor): Feature map ``(B, channels, H, W)`` of the judged images.
            c (Tensor): Text embedding ``(B, c_dim)``.
            ref (Tensor, optional): Feature map of the reference images; required iff ``use_ref``. Shape
                ``(B, channels, H, W)`` (the judged map's grid) for ``per_location``, any ``(B, channels, H', W')``
                for ``pooled``.

        Returns:
            Tensor: Logits ``(B, h * w)``.
        """
        b = x.shape[0]
        if c.shape != (b, self.c_dim):
            raise ValueError(f'text embedding must be ({b}, {self.c_dim}), got {tuple(c.shape)}')
        cond = self.cmapper(c)[:, :, None, None]
        if self.refmapper is not None:
            if ref is None:
                raise ValueError('this head was built with use_ref=True; pass the reference feature map')
            if ref.shape[0] != b:
                raise ValueError(f'reference batch size {ref.shape[0]} != image batch size {b}')
            per_location = self.reference_map == 'per_location'
            if per_location and ref.shape[-2:] != x.shape[-2:]:
                # Equal input grids give equal trunk output grids (the trunk is a function of the input size).
                raise ValueError(
                    f"reference_map='per_location' adds the reference map location by location, so the reference "
                    f'feature grid {tuple(ref.shape[-2:])} must equal the judged grid {tuple(x.shape[-2:])}: feed the '
                    'reference images through the backbone at its input_size, or set '
                    'algorithms.vfm_discriminator.reference_map: pooled')
            refmap = self.refmapper(ref)
            cond = cond + (refmap if per_location else refmap.mean(dim=(2, 3), keepdim=True))
        elif ref is not None:
            raise ValueError('this head was built with use_ref=False; got reference features')
        out = self.cls(self.main(x))
        logits = (out * cond).sum(dim=1) / math.sqrt(self.cmap_dim)
        return logits.flatten(1)


class VFMDiscriminatorHeads(nn.Module):
    """One :class:`DiscriminatorHead` per backbone feature map; logits concatenated.

    Args:
        feature_channels (Sequence[int]): Channels of each feature map, one entry per head.
        **head_kwargs: Passed to every :class:`DiscriminatorHead` (``c_dim``, ``cmap_dim``, ``num_downsample``,
            ``hidden_channels``, ``virtual_batch_size``, ``min_resolution``, ``use_ref``, ``reference_map``).
    """

    def __init__(self, feature_channels: Sequence[int], **head_kwargs: Any) -> None:
        super().__init__()
        feature_channels = list(feature_channels)
        if not feature_channels:
            raise ValueError('feature_channels must have at least one entry')
        self.heads = nn.ModuleList(DiscriminatorHead(ch, **head_kwargs) for ch in feature_channels)

    @classmethod
    def from_backbone(cls, backbone: VFMBackbone, **head_kwargs: Any) -> VFMDiscriminatorHeads:
        """Heads matching ``backbone``'s feature maps (``num_features_maps`` heads of ``embed_dim`` channels)."""
        return cls([backbone.embed_dim] * backbone.num_features_maps, **head_kwargs)

    def __len__(self) -> int:
        return len(self.heads)

    def forward(
        self,
        features: Sequence[torch.Tensor],
        text_embedding: torch.Tensor,
        ref_features: Optional[Sequence[torch.Tensor]] = None,
    ) -> torch.Tensor:
        """Logits of all heads.

        Args:
            features (Sequence[Tensor]): Feature maps of the judged images, one per head (backbone output).
            text_embedding (Tensor): ``(B, c_dim)``.
            ref_features (Sequence[Tensor], optional): Feature maps of the reference images, one per head; required
                when the heads use the reference.

        Returns:
            Tensor: ``(B, N_total)``, each head's flattened logits concatenated in order.
        """
        if len(features) != len(self.heads):
            raise ValueError(f'got {len(features)} feature maps for {len(self.heads)} heads')
        if ref_features is None:
            ref_features = [None] * len(self.heads)
        elif len(ref_features) != len(self.heads):
            raise ValueError(f'got {len(ref_features)} reference feature maps for {len(self.heads)} heads')
        logits = [head(f, text_embedding, r) for head, f, r in zip(self.heads, features, ref_features)]
        return torch.cat(logits, dim=1)
