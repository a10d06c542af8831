"""Hinge GAN losses for the VFM discriminator (method notes §1.5 and §4.4).

Logits come as ``(B, N)`` (all heads' per-location logits, concatenated) or any ``(B, ...)`` shape. Each sample's
logits are first averaged, then the per-sample values are weighted by ``weight`` (the anchor weight ω(t), one per
sample) and averaged over the batch::

    L_D = mean_b(w_b * mean_n relu(1 - D_real[b, n])) + mean_b(w_b * mean_n relu(1 + D_fake[b, n]))
    L_G = mean_b(w_b * -mean_n D_fake[b, n])

The generator's adversarial scale λ_G is not applied here.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ['hinge_d_loss', 'hinge_g_loss']


def _per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dim but the first: ``(B, ...) -> (B,)``."""
    if x.ndim == 0:
        raise ValueError('logits need a leading batch dimension, got a scalar')
    return x.reshape(x.shape[0], -1).mean(dim=1)


def _weighted_batch_mean(per_sample: torch.Tensor, weight: Optional[torch.Tensor | float]) -> torch.Tensor:
    """``mean_b(weight_b * per_sample_b)``; ``weight`` is ``(B,)``, a scalar, or ``None`` (all ones)."""
    if weight is None:
        return per_sample.mean()
    weight = torch.as_tensor(weight, dtype=per_sample.dtype, device=per_sample.device)
    if weight.ndim > 0:
        weight = weight.reshape(-1)
        if weight.shape[0] != per_sample.shape[0]:
            raise ValueError(f'weight has {weight.shape[0]} entries but the logits have batch size {per_sample.shape[0]}')
    return (per_sample * weight).mean()


def hinge_d_loss(
    logits_real: torch.Tensor,
    logits_fake: torch.Tensor,
    weight: Optional[torch.Tensor | float] = None,
) -> torch.Tensor:
    """Discriminator hinge loss, per-sample weighted.

    Args:
        logits_real (Tensor): Discriminator logits on real images, ``(B, ...)``.
        logits_fake (Tensor): Discriminator logits on generated images, ``(B, ...)``.
        weight (Tensor | float, optional): Per-sample weight ``(B,)`` (or a scalar) applied to both terms.

    Returns:
        Tensor: Scalar loss ``mean(w * mean relu(1 - real)) + mean(w * mean relu(1 + fake))``.
    """
    loss_real = _weighted_batch_mean(_per_sample_mean(F.relu(1.0 - logits_real)), weight)
    loss_fake = _weighted_batch_mean(_per_sample_mean(F.relu(1.0 + logits_fake)), weight)
    return loss_real + loss_fake


def hinge_g_loss(logits_fake: torch.Tensor, weight: Optional[torch.Tensor | float] = None) -> torch.Tensor:
    """Generator hinge (adversarial) loss, per-sample weighted.

    Args:
        logits_fake (Tensor): Discriminator logits on generated images, ``(B, ...)``, with grad to the generator.
        weight (Tensor | float, optional): Per-sample weight ``(B,)`` (or a scalar).

    Returns:
        Tensor: Scalar loss ``mean(w * -mean logits_fake)``.
    """
    return _weighted_batch_mean(-_per_sample_mean(logits_fake), weight)
