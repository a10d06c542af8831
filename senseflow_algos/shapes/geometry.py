"""A second shape check, from pixel geometry alone: each object's area against its bounding box.

The evaluator CNN (:mod:`senseflow_algos.shapes.evaluator`) is lenient with blobs: it scores a lumpy rounded square as
a circle. This check knows nothing learned. An object is a 4-connected component of pixels away from the grey
background; its fill ratio (pixels / bounding-box pixels) is about 1 for the world's axis-aligned squares, pi/4 = 0.785
for circles and 0.5 for its upright triangles, and the nearest of the three names the shape. Blobs land between the
values and are named by where they land.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Sequence

import numpy as np
import torch

from senseflow_algos.shapes.world import BACKGROUND, parse_caption

__all__ = ['FILL_RATIOS', 'foreground_mask', 'components', 'fill_ratio', 'shape_of_fill', 'image_shapes',
           'geometry_accuracy']

#: Fill ratio of each shape's pixels in its bounding box (ideal, before anti-aliasing).
FILL_RATIOS = {'square': 1.0, 'circle': math.pi / 4, 'triangle': 0.5}
#: A pixel is foreground when its RGB distance to the background exceeds this (images in [0, 1]).
THRESHOLD = 0.2
#: Components smaller than this many pixels are noise, not objects (the world's smallest shape has about 50).
MIN_PIXELS = 8


def foreground_mask(image: np.ndarray) -> np.ndarray:
    """``(H, W)`` bool: pixels of a ``(3, H, W)`` image in [0, 1] farther than :data:`THRESHOLD` from the background."""
    background = np.asarray(BACKGROUND, dtype=np.float64).reshape(3, 1, 1)
    return np.sqrt(((np.asarray(image, dtype=np.float64) - background)**2).sum(0)) > THRESHOLD


def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of ``mask`` with at least :data:`MIN_PIXELS` pixels, largest first: ``(n, 2)`` (row,
    column) arrays."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    found = []
    for r0, c0 in zip(*np.nonzero(mask)):
        if seen[r0, c0]:
            continue
        seen[r0, c0] = True
        queue, pixels = deque([(r0, c0)]), []
        while queue:
            r, c = queue.popleft()
            pixels.append((r, c))
            for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    queue.append((rr, cc))
        if len(pixels) >= MIN_PIXELS:
            found.append(np.asarray(pixels))
    return sorted(found, key=len, reverse=True)


def fill_ratio(pixels: np.ndarray) -> float:
    """Pixels of a component over the pixels of its bounding box."""
    rows, cols = pixels[:, 0], pixels[:, 1]
    return len(pixels) / float((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1))


def shape_of_fill(ratio: float) -> str:
    """The shape whose ideal fill ratio (:data:`FILL_RATIOS`) is nearest."""
    return min(FILL_RATIOS, key=lambda s: abs(FILL_RATIOS[s] - ratio))


def image_shapes(image: np.ndarray, count: int) -> list[str]:
    """Shapes of the ``count`` largest objects of a ``(3, H, W)`` image in [0, 1] (fewer if fewer were found)."""
    return [shape_of_fill(fill_ratio(c)) for c in components(foreground_mask(image))[:count]]


def geometry_accuracy(images: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
    """Fraction of images whose objects have the caption's shapes by geometry: ``single`` (one-shape captions: the
    largest object), ``two`` (two-shape captions: the two largest objects, as a multiset) and ``all``.

    Args:
        images: ``(N, 3, H, W)`` in [-1, 1] (as the generators return them).
        prompts: The captions.
    """
    pictures = ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2).numpy()
    hits: dict[str, list[bool]] = {'single': [], 'two': []}
    for picture, prompt in zip(pictures, prompts):
        wanted = sorted(shape for _, shape in parse_caption(prompt)['objects'])
        got = sorted(image_shapes(picture, len(wanted)))
        hits['single' if len(wanted) == 1 else 'two'].append(got == wanted)
    every = hits['single'] + hits['two']
    return {k: float(np.mean(v)) if v else float('nan') for k, v in (*hits.items(), ('all', every))}
