"""ISG: target construction, gradient path, zero loss on agreement, segment ends, the added loss term."""

from __future__ import annotations

import pytest
import torch

from senseflow_algos import flow
from senseflow_algos.algorithms import IntraSegmentGuidance
from senseflow_algos.algorithms.isg import mid_sigma
from senseflow_algos.functional import isg_loss, isg_target
from senseflow_algos.models.families import FluxFamily, SD35Family
from senseflow_algos.optim import TrainingPhase
from tests.algorithms.conftest import LossRecorder, tiny_config


def _segment(b=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 4, 8, 8, generator=g)
    sigma = torch.tensor([1.0, 0.75, 0.5])[:b]
    sigma_next = torch.tensor([0.75, 0.5, 0.0])[:b]
    sigma_mid = (sigma + sigma_next) / 2
    return x, sigma, sigma_mid, sigma_next


@pytest.mark.parametrize('loss_type', ['charbonnier', 'l2'])
def test_zero_when_teacher_and_generator_agree(loss_type):
    x, sigma, sigma_mid, sigma_next = _segment()
    field = torch.randn_like(x)  # the same constant velocity field for teacher and generator
    target = isg_target(lambda y, s: field, lambda y, s: field, x, sigma, sigma_mid, sigma_next)
    # Two Euler steps along a constant field land where the direct step does (up to float rounding).
    assert isg_loss(x, field, sigma, sigma_next, target, loss_type).item() == pytest.approx(0.0, abs=1e-9)
    # A different teacher makes it positive.
    target = isg_target(lambda y, s: field + 1, lambda y, s: field, x, sigma, sigma_mid, sigma_next)
    assert isg_loss(x, field, sigma, sigma_next, target, loss_type).item() > 1e-3


def test_target_is_teacher_then_generator_euler():
    x, sigma, sigma_mid, sigma_next = _segment()
    teacher = lambda y, s: 2 * y + s.view(-1, 1, 1, 1)  # noqa: E731
    student = lambda y, s: -y  # noqa: E731
    x_mid = x + (sigma_mid - sigma).view(-1, 1, 1, 1) * teacher(x, sigma)
    expected = x_mid + (sigma_next - sigma_mid).view(-1, 1, 1, 1) * student(x_mid, sigma_mid)
    target = isg_target(teacher, student, x, sigma, sigma_mid, sigma_next)
    torch.testing.assert_close(target, expected)
    assert not target.requires_grad


def test_gradient_only_through_direct_step():
    x, sigma, _, sigma_next = _segment()
    v = torch.randn_like(x, requires_grad=True)
    target = torch.randn_like(x, requires_grad=True)  # even a target with grad gets none
    c = 1e-3
    loss = isg_loss(x, v, sigma, sigma_next, target, 'charbonnier', c)
    loss.backward()
    d = flow.euler_step(x, v.detach(), sigma, sigma_next) - target.detach()
    expected = (sigma_next - sigma).view(-1, 1, 1, 1) * d / torch.sqrt(d**2 + c * c) / d.numel()
    torch.testing.assert_close(v.grad, expected)
    assert target.grad is None


#: Per family: the reference's anchor indices then 0 (method notes 1.7), the ISG margin (notes 3.1) and the
#: index -> sigma map, by hand (FLUX t / 1000; SD 3.5 shift3((t + 1) / 1000), and index 0 of the end point is sigma 0).
SEGMENTS = {
    'flux': (FluxFamily(), [1000, 904, 759, 512, 0], 20, lambda t: t / 1000),
    'sd35': (SD35Family(), [999, 749, 499, 249, 0], 50, lambda t: 3 * (t + 1) / 1000 / (1 + 2 * (t + 1) / 1000)),
}


@pytest.mark.parametrize('name', list(SEGMENTS))
def test_mid_point_inside_segment_last_ends_at_zero(name):
    family, indices, margin, to_sigma = SEGMENTS[name]
    anchors = flow.append_zero(family.anchors((128, 128)))
    assert anchors[-1] == 0.0
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        cur, nxt = anchors[i].repeat(500), anchors[i + 1].repeat(500)
        mid = mid_sigma(family, cur, nxt, g)
        lo, hi = to_sigma(indices[i + 1] + margin), to_sigma(indices[i] - margin)
        assert (mid >= lo - 1e-9).all() and (mid <= hi + 1e-9).all(), (i, float(mid.min()), float(mid.max()), lo, hi)
        assert ((mid > nxt) & (mid < cur)).all()
        assert mid.unique().numel() > 10, 'uniform over the index grid, not a constant'


def test_training_adds_weighted_term_and_generator_grad_forward_once(algo_trainer):
    weight = 2.0
    cfg = tiny_config({'isg': {'weight': weight}}, 'model.gen_every=2', 'trainer.max_duration=3ba')
    losses = LossRecorder()
    trainer = algo_trainer(cfg, callbacks=[losses])
    model = trainer.state.model
    calls = []
    model.generator.register_forward_hook(lambda m, i, o: calls.append((model.phase, torch.is_grad_enabled())))
    model.teacher.register_forward_hook(lambda m, i, o: calls.append(('teacher', torch.is_grad_enabled())))
    trainer.fit()

    gen_batches = [entry for entry in losses.losses if 'loss/train/generator/isg' in entry]
    assert len(gen_batches) == 2  # batches 0 and 2
    for entry in gen_batches:
        expected = (entry['loss/train/generator/dmd'] + weight * entry['loss/train/generator/isg'] +
                    entry['loss/train/fake_score/flow_matching'])
        assert entry['loss/train/total'] == pytest.approx(expected, rel=1e-5)
        assert entry['loss/train/generator/isg'] > 0
    assert 'loss/train/generator/isg' not in losses.losses[1]
    # Exactly one generator forward with gradient per generator phase; the teacher never builds a graph.
    assert sum(1 for phase, grad in calls if phase is TrainingPhase.GENERATOR and grad) == 2
    assert not any(grad for who, grad in calls if who == 'teacher')
    assert sum(1 for who, _ in calls if who == 'teacher') == 4  # DMD real score + ISG step, per generator batch


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match='loss_type'):
        IntraSegmentGuidance(loss_type='l1')
    with pytest.raises(ValueError, match='guidance'):
        IntraSegmentGuidance(guidance=[1.0])
