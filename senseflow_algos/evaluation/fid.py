"""Fréchet distance between feature sets (FID-T, Patch FID-T), computed with numpy / scipy, and patch cropping."""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch

__all__ = ['feature_statistics', 'frechet_distance', 'fid_from_features', 'random_patches']


def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of ``(N, D)`` features; ``N >= 2``."""
    feats = np.asarray(features.detach().cpu() if torch.is_tensor(features) else features, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f'FID needs features of shape (N >= 2, D), got {feats.shape}')
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` between two Gaussians.

    As in the reference FID code: when ``S1 S2`` is singular (fewer samples than dimensions) ``eps * I`` is added to
    both covariances; a numerically complex square root with negligible imaginary diagonal is made real.

    Raises:
        ValueError: On mismatched shapes or a square root with a large imaginary part.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f'feature statistics differ in shape: {mu1.shape} vs {mu2.shape}, {sigma1.shape} vs '
                         f'{sigma2.shape}')
    diff = mu1 - mu2
    with warnings.catch_warnings(record=True) as caught:  # scipy warns on a singular product
        warnings.simplefilter('always')
        covmean = linalg.sqrtm(sigma1 @ sigma2)
    if caught or not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f'matrix square root has an imaginary part of {np.abs(covmean.imag).max():.3g}')
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Fréchet distance between two ``(N, D)`` feature sets."""
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


def random_patches(images: torch.Tensor, indices: Sequence[int], patch_size: int, per_image: int = 1,
                   seed: int = 0) -> torch.Tensor:
    """Crop ``per_image`` square patches of ``patch_size`` from each full-resolution image.

    Positions depend only on ``(seed, image index)`` and the image size, so image ``i`` of the teacher set and of the
    student set are cropped at the same places.

    Args:
        images (Tensor): ``(B, 3, H, W)``.
        indices: The dataset index of each image (seeds its crop positions).
        patch_size (int): Patch side in pixels (299 for Inception at full resolution).
        per_image (int): Patches per image.
        seed (int): Seed of the crop positions.

    Returns:
        Tensor: ``(B * per_image, 3, patch_size, patch_size)``.

    Raises:
        ValueError: If the images are smaller than ``patch_size``.
    """
    _, _, h, w = images.shape
    if patch_size > min(h, w):
        raise ValueError(f'patch size {patch_size} is larger than the images ({h}x{w})')
    out = []
    for img, idx in zip(images, indices):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + int(idx))
        for _ in range(per_image):
            top = int(torch.randint(h - patch_size + 1, (1,), generator=gen))
            left = int(torch.randint(w - patch_size + 1, (1,), generator=gen))
            out.append(img[:, top:top + patch_size, left:left + patch_size])
    return torch.stack(out)
