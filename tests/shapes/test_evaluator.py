"""The shipped shapes evaluator: near-perfect on renderer images, near chance on shuffled captions; FD sanity."""

import random

import numpy as np
import pytest
import torch

from senseflow_algos.evaluation.fid import fid_from_features as frechet_distance
from senseflow_algos.shapes.components import EVALUATOR_WEIGHTS
from senseflow_algos.shapes.evaluator import COMBOS, ShapesEvaluator
from senseflow_algos.shapes.train_evaluator import render_targets

pytestmark = pytest.mark.skipif(not EVALUATOR_WEIGHTS.exists(), reason='evaluator weights not shipped')

N = 300


@pytest.fixture(scope='module')
def evaluator():
    return ShapesEvaluator()


@pytest.fixture(scope='module')
def data():
    images, presence, centre, _, captions = render_targets(7000, N)
    return images, presence, centre, captions


def test_renderer_images_score_near_perfect(evaluator, data):
    images, _, _, captions = data
    s = evaluator.score(images, captions)
    assert s['single']['prompt'] >= 0.97, s['single']
    assert s['two']['prompt'] >= 0.93, s['two']
    for m in ('colour', 'shape', 'object'):
        assert s['all'][m] >= 0.97, (m, s['all'])


def test_detections_and_centres_match_ground_truth(evaluator, data):
    images, presence, centre, _ = data
    pred = evaluator.predict(images)
    exact = [evaluator.detect(pred['presence'][i], pred['centre'][i]) ==
             {COMBOS[k] for k in torch.nonzero(presence[i]).flatten().tolist()} for i in range(N)]
    assert np.mean(exact) > 0.97
    err = (pred['centre'] / 32 - centre).abs()[presence.bool()]
    assert err.mean() * 32 < 1.0  # pixels


def test_shuffled_captions_score_near_chance(evaluator, data):
    images, _, _, captions = data
    shuffled = list(captions)
    random.Random(1).shuffle(shuffled)
    s = evaluator.score(images, shuffled)
    assert s['all']['prompt'] < 0.1, s['all']
    assert s['single']['object'] < 0.25 and s['two']['relation'] < 0.2


def test_fd_is_small_between_renderer_sets_and_large_for_noise(evaluator, data):
    images = data[0]
    other = render_targets(7001, N)[0]
    same = evaluator.fd(images, other)
    noise = evaluator.fd(images, torch.randn_like(images).clamp(-1, 1) * 0.5)
    blank = evaluator.fd(images, torch.zeros_like(images))
    assert same * 10 < noise and same * 10 < blank, (same, noise, blank)


def test_frechet_distance_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    b = rng.normal(size=(4000, 3)) + np.array([1.0, 0.0, 0.0])
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, b) == pytest.approx(1.0, abs=0.15)
    assert len(COMBOS) == 18
