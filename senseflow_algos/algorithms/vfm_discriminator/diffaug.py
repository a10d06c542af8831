"""Differentiable augmentation (DiffAugment, Zhao et al. 2020) for the VFM discriminator's inputs.

The same random transform family is applied to real and generated images before the discriminator sees them, and
every operation is differentiable so the generator still receives gradients through it. Images are expected in
``[-1, 1]`` (as the decoded VAE output is), laid out ``(B, C, H, W)``.

All random numbers come from the ``rng`` argument (which must live on ``x``'s device), so a run is
reproducible from a seed; with ``rng=None`` torch's global RNG is used.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ['DIFF_AUGMENT_POLICIES', 'diff_augment', 'rand_color', 'rand_translation', 'rand_cutout']

_TRANSLATION_RATIO = 1.0 / 8.0  # maximum shift, as a fraction of each side
_CUTOUT_RATIO = 0.5  # side of the erased square, as a fraction of each side


def _uniform(x: torch.Tensor, rng: Optional[torch.Generator]) -> torch.Tensor:
    """One U[0, 1) draw per sample, shaped ``(B, 1, 1, 1)`` to broadcast against ``x``."""
    return torch.rand(x.shape[0], 1, 1, 1, generator=rng, device=x.device, dtype=x.dtype)


def _randint(high: int, n: int, device: torch.device, rng: Optional[torch.Generator]) -> torch.Tensor:
    """``n`` integers uniform in ``[0, high)``."""
    return torch.randint(0, high, (n,), generator=rng, device=device)


def rand_color(x: torch.Tensor, rng: Optional[torch.Generator] = None) -> torch.Tensor:
    """Per-sample brightness, saturation and contrast jitter (in that order).

    * brightness: add ``U[-0.5, 0.5)``;
    * saturation: scale the deviation from the per-pixel channel mean by ``U[0, 2)``;
    * contrast: scale the deviation from the per-image mean by ``U[0.5, 1.5)``.

    Args:
        x (Tensor): Images ``(B, C, H, W)`` in ``[-1, 1]``.
        rng (torch.Generator, optional): Source of randomness, on ``x``'s device.

    Returns:
        Tensor: Jittered images, same shape (values may leave ``[-1, 1]``; they are not clamped).
    """
    x = x + (_uniform(x, rng) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_uniform(x, rng) * 2.0) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (_uniform(x, rng) + 0.5) + mean
    return x


def rand_translation(
    x: torch.Tensor, rng: Optional[torch.Generator] = None, ratio: float = _TRANSLATION_RATIO
) -> torch.Tensor:
    """Shift each image by a random integer offset of up to ``ratio`` of its side; vacated pixels become 0.

    Implemented as a gather from a zero-padded copy, so gradients flow to every pixel that stays in view.

    Args:
        x (Tensor): Images ``(B, C, H, W)``.
        rng (torch.Generator, optional): Source of randomness, on ``x``'s device.
        ratio (float): Maximum shift as a fraction of the height / width.

    Returns:
        Tensor: Translated images, same shape.
    """
    b, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    if sh == 0 and sw == 0:
        return x
    # Offsets in [-s, s]; out[i, j] = x[i - dy, j - dx], read from the padded copy at (i - dy + sh, j - dx + sw).
    dy = _randint(2 * sh + 1, b, x.device, rng) - sh
    dx = _randint(2 * sw + 1, b, x.device, rng) - sw
    padded = F.pad(x, [sw, sw, sh, sh])
    rows = torch.arange(h, device=x.device)[None, :] - dy[:, None] + sh  # (B, H)
    cols = torch.arange(w, device=x.device)[None, :] - dx[:, None] + sw  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    # Advanced indices split by a slice put the indexed dims first: result is (B, H, W, C).
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)


def rand_cutout(
    x: torch.Tensor, rng: Optional[torch.Generator] = None, ratio: float = _CUTOUT_RATIO
) -> torch.Tensor:
    """Zero a square of ``ratio`` times each side, centred at a uniformly random pixel (clipped at the border).

    Args:
        x (Tensor): Images ``(B, C, H, W)``.
        rng (torch.Generator, optional): Source of randomness, on ``x``'s device.
        ratio (float): Side of the erased region as a fraction of the height / width.

    Returns:
        Tensor: Images with one erased rectangle each, same shape.
    """
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    if ch == 0 or cw == 0:
        return x
    top = _randint(h, b, x.device, rng) - ch // 2
    left = _randint(w, b, x.device, rng) - cw // 2
    rows = torch.arange(h, device=x.device)[None, :]
    cols = torch.arange(w, device=x.device)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + ch)  # (B, H)
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + cw)  # (B, W)
    keep = ~(in_rows[:, :, None] & in_cols[:, None, :])  # (B, H, W)
    return x * keep[:, None].to(x.dtype)


DIFF_AUGMENT_POLICIES: dict[str, Callable[[torch.Tensor, Optional[torch.Generator]], torch.Tensor]] = {
    'color': rand_color,
    'translation': rand_translation,
    'cutout': rand_cutout,
}


def _parse_policy(policy: str | Sequence[str] | None) -> list[str]:
    """Split ``'color,translation'`` (or a list of names) into names, rejecting unknown ones up front."""
    if policy is None:
        return []
    names = policy.split(',') if isinstance(policy, str) else list(policy)
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in DIFF_AUGMENT_POLICIES]
    if unknown:
        raise ValueError(f'unknown DiffAugment policy {unknown!r}; known: {sorted(DIFF_AUGMENT_POLICIES)}')
    return names


def diff_augment(
    x: torch.Tensor,
    policy: str | Sequence[str] | None = 'color,translation,cutout',
    rng: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Apply DiffAugment to a batch of images, differentiably.

    Args:
        x (Tensor): Images ``(B, C, H, W)`` in ``[-1, 1]``.
        policy (str | Sequence[str] | None): Comma-separated names (or a list) applied in order, from ``'color'``,
            ``'translation'`` and ``'cutout'``. Empty / ``None`` returns ``x`` unchanged.
        rng (torch.Generator, optional): Source of every random draw; must be on ``x``'s device.
            ``None`` uses torch's global RNG.

    Returns:
        Tensor: Augmented images, same shape and dtype as ``x``.

    Raises:
        ValueError: If ``x`` is not 4-D or ``policy`` names an unknown augmentation.
    """
    names = _parse_policy(policy)
    if x.ndim != 4:
        raise ValueError(f'diff_augment expects (B, C, H, W) images, got shape {tuple(x.shape)}')
    for name in names:
        x = DIFF_AUGMENT_POLICIES[name](x, rng)
    return x.contiguous()
