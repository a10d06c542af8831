"""Fréchet distance between feature sets (FID-T, Patch FID-T), computed with numpy, and patch cropping."""

from __future__ import annotations

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


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))`` between two Gaussians.

    ``tr((S1 S2)^(1/2))`` is the sum of the square roots of the eigenvalues of the symmetric ``S1^(1/2) S2 S1^(1/2)``
    (the same eigenvalues as ``S1 S2``). That is exact also for singular covariances (fewer samples than dimensions,
    low-rank features), where the reference code's ``sqrtm(S1 S2)`` with an ``eps * I`` offset is biased: a set
    against itself in the shapes evaluator's rank-36 128-d features scores -2.6e-4 that way, -1e-7 this way.

    Raises:
        ValueError: On mismatched shapes.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f'feature statistics differ in shape: {mu1.shape} vs {mu2.shape}, {sigma1.shape} vs '
                         f'{sigma2.shape}')
    diff = mu1 - mu2
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


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
        rng = torch.Generator().manual_seed(seed * 1_000_003 + int(idx))
        for _ in range(per_image):
            top = int(torch.randint(h - patch_size + 1, (1,), generator=rng))
            left = int(torch.randint(w - patch_size + 1, (1,), generator=rng))
            out.append(img[:, top:top + patch_size, left:left + patch_size])
    return torch.stack(out)
