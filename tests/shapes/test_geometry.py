"""The geometric shape check: fill ratios of hand-drawn masks, and the renderer's own images."""

import math

import numpy as np
import torch

from senseflow_algos.shapes.geometry import components, fill_ratio, geometry_accuracy, image_shapes, shape_of_fill
from senseflow_algos.shapes.report import prompt_suite, renderer_images
from senseflow_algos.shapes.world import BACKGROUND


def _canvas(mask: np.ndarray, colour=(0.86, 0.14, 0.14)) -> np.ndarray:
    image = np.empty((3, *mask.shape))
    for ch in range(3):
        image[ch] = np.where(mask, colour[ch], BACKGROUND[ch])
    return image


def test_fill_ratios_of_drawn_shapes():
    yy, xx = np.mgrid[0:32, 0:32]
    square = (abs(yy - 15) <= 5) & (abs(xx - 15) <= 5)  # 11 x 11, fills its box
    disc = (yy - 15.5)**2 + (xx - 15.5)**2 <= 7.0**2  # area ~ pi r^2 in a (2r)^2 box
    triangle = (yy >= 4) & (yy <= 27) & (abs(xx - 15.5) <= (yy - 4) / 2)  # apex up, half its box
    assert fill_ratio(components(square)[0]) == 1.0
    assert abs(fill_ratio(components(disc)[0]) - math.pi / 4) < 0.03
    assert abs(fill_ratio(components(triangle)[0]) - 0.5) < 0.06
    assert [image_shapes(_canvas(m), 1)[0] for m in (square, disc, triangle)] == ['square', 'circle', 'triangle']
    assert shape_of_fill(0.9) == 'square' and shape_of_fill(0.7) == 'circle' and shape_of_fill(0.6) == 'triangle'


def test_two_objects_are_two_components_largest_first():
    mask = np.zeros((32, 32), dtype=bool)
    mask[2:8, 2:8] = True  # 36 pixels
    mask[15:27, 15:27] = True  # 144 pixels
    parts = components(mask)
    assert [len(p) for p in parts] == [144, 36]


def test_renderer_images_pass_and_wrong_captions_fail():
    n = 128
    prompts, images = prompt_suite(n), renderer_images(n)
    acc = geometry_accuracy(images, prompts)
    assert acc['single'] >= 0.95 and acc['two'] >= 0.95
    # The same images under captions whose shapes are rotated (circle -> square -> triangle -> circle): near 0.
    rotate = {'circle': 'square', 'square': 'triangle', 'triangle': 'circle'}
    wrong = [' '.join(rotate.get(w, w) for w in p.split()) for p in prompts]
    assert geometry_accuracy(images, wrong)['single'] <= 0.1
    # Blank images (all background) match nothing.
    assert geometry_accuracy(torch.zeros(4, 3, 32, 32), prompts[:4])['all'] == 0.0
