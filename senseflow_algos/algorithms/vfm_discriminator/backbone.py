"""Backbone of the VFM (vision-foundation-model) discriminator, method notes §4.

:class:`VFMBackbone`: a frozen timm ViT (DINOv2 ViT-L/14 by default) that turns images in ``[-1, 1]`` into a list of
2-D feature maps (the embedding output plus chosen block outputs, CLS token added to every patch token). Gradients flow
through it to the image; none of its parameters train. The trainable heads are in
:mod:`senseflow_algos.algorithms.vfm_discriminator.heads`.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ['DEFAULT_VFM_MODEL', 'DINOV2_VITL_BLOCK_INDICES', 'default_block_indices', 'VFMBackbone']

DEFAULT_VFM_MODEL = 'vit_large_patch14_dinov2.lvd142m'
# Blocks read by the official SenseFlow discriminator on the 24-block ViT-L (plus the embedding output = 8 maps).
DINOV2_VITL_BLOCK_INDICES = (2, 5, 8, 10, 14, 19, 23)
_NUM_DEFAULT_BLOCKS = 7
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
