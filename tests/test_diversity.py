"""The within-prompt diversity score against hand-computed distances."""

import math

import numpy as np
import pytest

from senseflow_algos.evaluation.diversity import diversity_ratio, within_prompt_diversity


def test_equilateral_triangle_and_collapsed_prompt():
    # Prompt 0: three points at the corners of an equilateral triangle of side 2 -> every pairwise distance is 2.
    # Prompt 1: three identical points (mode collapse) -> 0. Mean over prompts: 1.
    tri = np.array([[0.0, 0.0], [2.0, 0.0], [1.0, math.sqrt(3.0)]])
    same = np.ones((3, 2))
    assert within_prompt_diversity(np.stack([tri, same])) == pytest.approx(1.0, abs=1e-12)


def test_two_seeds_is_the_distance_and_scaling_cancels_in_the_ratio():
    a = np.array([[[0.0, 0.0, 0.0], [3.0, 4.0, 0.0]]])  # one prompt, two images 5 apart
    assert within_prompt_diversity(a) == pytest.approx(5.0)
    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(4, 8, 16))
    assert diversity_ratio(teacher, teacher) == pytest.approx(1.0)
    assert diversity_ratio(0.5 * teacher, teacher) == pytest.approx(0.5)  # half the spread: ratio 0.5


def test_needs_two_seeds_per_prompt():
    with pytest.raises(ValueError, match='seeds >= 2'):
        within_prompt_diversity(np.zeros((4, 1, 3)))
