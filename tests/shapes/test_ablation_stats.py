"""The ablation benchmark's statistics (bench/shapes_ablation.py): mean, sample std, and the 2x-spread mark, against
hand-computed values."""

import importlib.util
import math
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / 'bench' / 'shapes_ablation.py'
_spec = importlib.util.spec_from_file_location('shapes_ablation', _PATH)
ablation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ablation)


def test_seed_stats_is_the_sample_standard_deviation():
    # [1, 2, 4]: mean 7/3; squared deviations 16/9, 1/9, 25/9 sum to 42/9; / (3 - 1) = 7/3.
    got = ablation.seed_stats([1.0, 2.0, 4.0])
    assert got['mean'] == pytest.approx(7 / 3)
    assert got['std'] == pytest.approx(math.sqrt(7 / 3))
    assert math.isnan(ablation.seed_stats([3.0])['std'])


@pytest.mark.parametrize('b_values, beyond', [([4.0, 5.0, 6.0], True), ([2.5, 3.5, 4.5], False)])
def test_difference_marked_only_beyond_twice_the_pooled_spread(b_values, beyond):
    # Both rows have std 1 (spread 1, threshold 2): means 2 -> 5 differ by 3 (marked), 2 -> 3.5 by 1.5 (not).
    a, b = ablation.seed_stats([1.0, 2.0, 3.0]), ablation.seed_stats(b_values)
    got = ablation.compare(a, b)
    assert got['spread'] == pytest.approx(1.0)
    assert got['diff'] == pytest.approx(sum(b_values) / 3 - 2.0)
    assert got['beyond_2x_spread'] is beyond


def test_pooled_spread_of_unequal_rows():
    # std 0 and std 2: pooled sqrt((0 + 4) / 2) = sqrt(2); a difference of 2.9 is beyond 2 sqrt(2) = 2.83.
    a, b = ablation.seed_stats([1.0, 1.0, 1.0]), ablation.seed_stats([1.9, 3.9, 5.9])
    got = ablation.compare(a, b)
    assert got['spread'] == pytest.approx(math.sqrt(2))
    assert got['beyond_2x_spread'] is True


def test_stress_runs_keep_the_number_of_generator_updates():
    # Main recipe: gen_every 5 over 600 batches = 120 generator updates; TTUR 1 needs 120 batches for as many.
    assert ablation.batches_of('senseflow', 600) == 600
    assert ablation.batches_of('ttur1_dmd_ida', 600) == 120
    assert 'model.gen_every=1' in ablation.VARIANTS['ttur1_dmd']
    assert 'algorithms.ida=null' in ablation.VARIANTS['ttur1_dmd']
    assert 'algorithms.ida=null' not in ablation.VARIANTS['ttur1_dmd_ida']
