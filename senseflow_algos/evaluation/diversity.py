"""Within-prompt diversity: how different a generator's images of one prompt are (mode collapse shows as a drop).

The score is the mean, over prompts, of the mean pairwise Euclidean distance between the features of the images made
for that prompt from different noise seeds. It is reported as a ratio to the teacher's score on the same prompts and
seeds, so the feature space's scale cancels: 1 is the teacher's diversity, below 1 a student that collapsed modes.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ['within_prompt_diversity', 'diversity_ratio']


def within_prompt_diversity(features: np.ndarray | torch.Tensor) -> float:
    """Mean over prompts of the mean pairwise distance between one prompt's image features.

    Args:
        features: ``(P, K, D)``: ``K >= 2`` images (seeds) of each of ``P`` prompts, ``D`` features each.

    Returns:
        float: ``mean_p mean_{i<j} ||f[p, i] - f[p, j]||``.
    """
    f = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    if f.ndim != 3 or f.shape[1] < 2:
        raise ValueError(f'features must be (prompts, seeds >= 2, dims), got shape {tuple(f.shape)}')
    k = f.shape[1]
    distances = torch.cdist(f, f)  # (P, K, K)
    pairs = distances.sum(dim=(1, 2)) / (k * (k - 1))  # each unordered pair counted twice, the diagonal is 0
    return float(pairs.mean())


def diversity_ratio(features: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor) -> float:
    """:func:`within_prompt_diversity` of ``features`` over that of ``reference`` (same prompts and seeds)."""
    return within_prompt_diversity(features) / within_prompt_diversity(reference)
