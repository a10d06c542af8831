"""Networks of the VFM (vision-foundation-model) discriminator, method notes §4.

* :class:`VFMBackbone`: a frozen timm ViT (DINOv2 ViT-L/14 by default) that turns images in ``[-1, 1]`` into a list
  of 2-D feature maps (the embedding output plus chosen block outputs, CLS token added to every patch token).
  Gradients flow through it to the image; none of its parameters train.
* :class:`DiscriminatorHead`: a small spectral-norm conv head on one feature map, conditioned on a text embedding
  and on the same backbone's features of a reference image (added per location, as the released code does, or
  pooled to one vector); emits one logit per output location.
* :class:`VFMDiscriminatorHeads`: one head per feature map, logits concatenated to ``(B, N)``.

Only the heads are optimised (§4.4). The hinge losses live in
:mod:`senseflow_algos.algorithms.vfm_discriminator.losses` and the augmentation in
:mod:`senseflow_algos.algorithms.vfm_discriminator.diffaug`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence

import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm
from torch.utils.checkpoint import checkpoint

__all__ = [
    'DEFAULT_VFM_MODEL',
    'REFERENCE_MAPS',
    'DEFAULT_REFERENCE_MAP',
    'fitting_downsamples',
    'DINOV2_VITL_BLOCK_INDICES',
    'default_block_indices',
    'VFMBackbone',
    'BatchNormLocal',
    'DiscriminatorHead',
    'VFMDiscriminatorHeads',
]

DEFAULT_VFM_MODEL = 'vit_large_patch14_dinov2.lvd142m'
# Blocks read by the official SenseFlow discriminator on the 24-block ViT-L (plus the embedding output = 8 maps).
DINOV2_VITL_BLOCK_INDICES = (2, 5, 8, 10, 14, 19, 23)
_NUM_DEFAULT_BLOCKS = 7
#: How a head combines the reference image's map with the text projection: ``per_location`` adds the spatial
#: reference map location by location (the released code); ``pooled`` averages it to one vector per sample first.
REFERENCE_MAPS = ('per_location', 'pooled')
DEFAULT_REFERENCE_MAP = 'per_location'
_REQUIRED_VIT_ATTRS = ('patch_embed', '_pos_embed', 'patch_drop', 'norm_pre', 'blocks', 'num_prefix_tokens')


def default_block_indices(depth: int, num: int = _NUM_DEFAULT_BLOCKS) -> tuple[int, ...]:
    """Blocks whose outputs the backbone reads by default.

    Args:
        depth (int): Number of transformer blocks.
        num (int): How many blocks to read (at most ``depth``).

    Returns:
        tuple[int, ...]: The official ``(2, 5, 8, 10, 14, 19, 23)`` for a 24-block model with ``num == 7``;
        otherwise ``min(num, depth)`` evenly spread, strictly increasing indices ending at the last block.
    """
    if depth < 1:
        raise ValueError(f'depth must be >= 1, got {depth}')
    if depth == 24 and num == _NUM_DEFAULT_BLOCKS:
        return DINOV2_VITL_BLOCK_INDICES
    n = min(num, depth)
    # Block k of n ends at fraction (k + 1) / n of the depth; round half up, then shift to 0-based.
    return tuple(int(math.floor((k + 1) * depth / n + 0.5)) - 1 for k in range(n))


def _validate_block_indices(indices: Sequence[int], depth: int) -> tuple[int, ...]:
    """Check that ``indices`` is a non-empty, strictly increasing list of block indices in ``[0, depth)``."""
    indices = tuple(indices)
    if not indices:
        raise ValueError('block_indices must name at least one block')
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int):
            raise ValueError(f'block_indices must be ints, got {i!r} in {list(indices)}')
        if not 0 <= i < depth:
            raise ValueError(f'block index {i} out of range for a ViT with {depth} blocks (valid: 0..{depth - 1})')
    if any(b <= a for a, b in zip(indices, indices[1:])):
        raise ValueError(f'block_indices must be strictly increasing (no duplicates), got {list(indices)}')
    return indices


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    """``int -> (int, int)``; a 2-sequence is passed through."""
    if isinstance(size, int):
        return size, size
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise ValueError(f'expected an int or an (H, W) pair, got {size}')
    return size


class VFMBackbone(nn.Module):
    """Frozen timm ViT that maps images to a list of 2-D feature maps for the discriminator heads.

    The feature maps are read at the embedding output (patch embedding + position embedding, i.e. after
    ``pos_drop``) and after each block in ``block_indices``. In each map the first prefix token (CLS) is added to the
    patch tokens, which are then laid out as ``(B, C, Hp, Wp)``. Blocks after the last chosen one are not run.

    The wrapped model never trains: its parameters have ``requires_grad=False`` and it stays in eval mode even when
    ``.train()`` is called. The forward pass is *not* wrapped in ``no_grad``, so gradients reach the input image
    (needed for the generator's adversarial loss); wrap the call in ``torch.no_grad()`` yourself for the reference
    image or the discriminator step's detached fakes.

    Args:
        model_name (str): timm model name. Any timm ``VisionTransformer`` (``.patch_embed``, ``.blocks``,
            prefix / CLS tokens) works; default DINOv2 ViT-L/14.
        pretrained (bool): Load timm's pretrained weights (needs the weights locally or network access).
        block_indices (Sequence[int], optional): 0-based blocks to read, strictly increasing. Default:
            :func:`default_block_indices` of the model depth (the official 7 blocks for a 24-block ViT).
        input_size (int | tuple[int, int], optional): ``(H, W)`` the image is resized to before the ViT; each side
            must be a multiple of the patch size. Default: the model's own image size (518 for DINOv2, a 37x37
            grid). The official 1024-px setup feeds the image unresized (a 73x73 grid, i.e. 1022 px): use
            ``input_size=1022`` for that.
        model_kwargs (dict, optional): Extra ``timm.create_model`` kwargs (e.g. ``img_size``, ``depth``,
            ``embed_dim`` for tiny test models); they override ``num_classes=0, dynamic_img_size=True``.
        grad_checkpointing (bool): Recompute block activations in backward (non-reentrant checkpointing), trading
            compute for memory at high resolution.

    Raises:
        TypeError: If the timm model lacks the ViT attributes this wrapper uses.
        ValueError: On invalid ``block_indices`` or an ``input_size`` that is not a multiple of the patch size.
    """

    def __init__(
        self,
        model_name: str = DEFAULT_VFM_MODEL,
        pretrained: bool = True,
        block_indices: Optional[Sequence[int]] = None,
        input_size: Optional[int | Sequence[int]] = None,
        model_kwargs: Optional[dict[str, Any]] = None,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        kwargs: dict[str, Any] = {'num_classes': 0, 'dynamic_img_size': True}
        kwargs.update(model_kwargs or {})
        model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
        missing = [a for a in _REQUIRED_VIT_ATTRS if not hasattr(model, a)]
        if missing:
            raise TypeError(f'{model_name!r} ({type(model).__name__}) is not a timm ViT this wrapper supports; missing {missing}')
        model.requires_grad_(False)
        model.eval()
        self.model = model
        self.model_name = model_name
        self.grad_checkpointing = grad_checkpointing

        depth = len(model.blocks)
        self.block_indices = _validate_block_indices(
            default_block_indices(depth) if block_indices is None else block_indices, depth
        )
        self.patch_size = _pair(model.patch_embed.patch_size)
        if input_size is None:
            input_size = model.patch_embed.img_size or model.pretrained_cfg['input_size'][-2:]
        self.input_size = _pair(input_size)
        if any(s <= 0 or s % p for s, p in zip(self.input_size, self.patch_size)):
            raise ValueError(f'input_size {self.input_size} must be positive multiples of the patch size {self.patch_size}')

        cfg = model.pretrained_cfg or {}
        mean = cfg.get('mean', IMAGENET_DEFAULT_MEAN)
        std = cfg.get('std', IMAGENET_DEFAULT_STD)
        # Non-persistent: follow .to(device) but stay out of checkpoints.
        self.register_buffer('mean', torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    @property
    def embed_dim(self) -> int:
        """Channels of every feature map."""
        return int(self.model.embed_dim)

    @property
    def num_features_maps(self) -> int:
        """Number of feature maps returned: the embedding output plus one per chosen block."""
        return 1 + len(self.block_indices)

    @property
    def grid_size(self) -> tuple[int, int]:
        """Spatial size ``(Hp, Wp)`` of every feature map."""
        return self.input_size[0] // self.patch_size[0], self.input_size[1] // self.patch_size[1]

    def train(self, mode: bool = True) -> VFMBackbone:
        """Set the wrapper's mode; the wrapped ViT always stays in eval mode (no dropout / drop-path)."""
        super().train(mode)
        self.model.eval()
        return self

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """``[-1, 1]`` images -> ``[0, 1]`` -> resized to ``input_size`` -> ImageNet mean/std normalised.

        Args:
            x (Tensor): Images ``(B, 3, H, W)`` in ``[-1, 1]``, any size.

        Returns:
            Tensor: ``(B, 3, *input_size)``, differentiable w.r.t. ``x``.
        """
        if x.ndim != 4:
            raise ValueError(f'expected images (B, C, H, W), got shape {tuple(x.shape)}')
        x = (x + 1.0) / 2.0
        if tuple(x.shape[-2:]) != self.input_size:
            # Antialiasing matters when shrinking 1024 px to DINOv2's 518 px; it is differentiable.
            x = F.interpolate(x, size=self.input_size, mode='bilinear', align_corners=False, antialias=True)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def _to_map(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Tokens ``(B, P + Hp*Wp, C)`` -> CLS added to patches -> ``(B, C, Hp, Wp)``."""
        num_prefix = self.model.num_prefix_tokens
        patches = tokens[:, num_prefix:]
        if num_prefix > 0:
            patches = patches + tokens[:, :1]
        b, n, c = patches.shape
        if n != grid[0] * grid[1]:
            raise RuntimeError(f'expected {grid[0]}x{grid[1]} patch tokens, got {n}')
        return patches.transpose(1, 2).reshape(b, c, grid[0], grid[1])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of a batch of images.

        Args:
            x (Tensor): Images ``(B, 3, H, W)`` in ``[-1, 1]``.

        Returns:
            list[Tensor]: ``num_features_maps`` tensors of shape ``(B, embed_dim, *grid_size)``: embedding output
            first, then the chosen blocks in order.
        """
        m = self.model
        x = self.preprocess(x).to(m.patch_embed.proj.weight.dtype)
        grid = self.grid_size
        tokens = m._pos_embed(m.patch_embed(x))  # ends in pos_drop
        feats = [self._to_map(tokens, grid)]
        tokens = m.norm_pre(m.patch_drop(tokens))
        wanted = set(self.block_indices)
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        for i in range(self.block_indices[-1] + 1):
            block = m.blocks[i]
            tokens = checkpoint(block, tokens, use_reentrant=False) if use_ckpt else block(tokens)
            if i in wanted:
                feats.append(self._to_map(tokens, grid))
        return feats


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
