"""PhasedAdamW: one closure and one update per phase, only that phase's roles, per-role clipping."""

from __future__ import annotations

import pytest
import torch
from optim_controller import Controller

from senseflow_algos.optim import Phase, PhasedAdamW

GEN, CRITIC = Phase('generator', ('generator',)), Phase('critic', ('fake_score', 'discriminator'))


def _setup(phases, max_grad_norm=None, unused=False, on_nonfinite='stop'):
    a = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(2))
    groups = [{'params': [a], 'role': 'generator'}, {'params': [b], 'role': 'fake_score'}]
    c = torch.nn.Parameter(torch.ones(4))
    if unused:
        groups.append({'params': [c], 'role': 'discriminator'})
    ctrl = Controller(phases)
    opt = PhasedAdamW(groups, controller=ctrl, lr=0.1, max_grad_norm=max_grad_norm, on_nonfinite=on_nonfinite)
    return a, b, c, ctrl, opt


def _closure(opt, a, b, scale_a=1.0, scale_b=1.0, calls=None):

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = scale_a * a.sum() + scale_b * b.sum()
        loss.backward()
        if calls is not None:
            calls.append(1)
        return loss.item()

    return closure


def test_each_phase_updates_only_its_roles_once():
    a, b, _, ctrl, opt = _setup([GEN, CRITIC])
    calls = []
    opt.step(_closure(opt, a, b, calls=calls))
    assert len(calls) == 2
    assert ctrl.log == [('begin', 'generator'), ('end', 'generator'), ('begin', 'critic'), ('end', 'critic'),
                        ('end_batch',)]
    # One AdamW step each (not two for `a`): decoupled decay (1 - lr*wd), then lr * g / (|g| + eps).
    one_step = (1 - 0.1 * 0.01) - 0.1
    torch.testing.assert_close(a.detach(), torch.full((3,), one_step), rtol=0, atol=1e-6)
    torch.testing.assert_close(b.detach(), torch.full((2,), one_step), rtol=0, atol=1e-6)
    assert float(opt.state[a]['step']) == 1 and float(opt.state[b]['step']) == 1


def test_critic_only_batch_leaves_generator_untouched():
    a, b, _, _, opt = _setup([CRITIC])
    opt.step(_closure(opt, a, b))
    assert torch.equal(a.detach(), torch.ones(3))
    assert not opt.state[a] or float(opt.state[a]['step']) == 0
    torch.testing.assert_close(b.detach(), torch.full((2,), (1 - 0.1 * 0.01) - 0.1), rtol=0, atol=1e-6)


def test_gradients_clipped_per_role(monkeypatch):
    a, b, _, _, opt = _setup([Phase('both', ('generator', 'fake_score'))], max_grad_norm=1.0)
    seen = {}

    def record(self):
        seen['a'], seen['b'] = a.grad.norm().item(), b.grad.norm().item()

    monkeypatch.setattr(torch.optim.AdamW, 'step', record)
    opt.step(_closure(opt, a, b, scale_a=100.0, scale_b=0.25))
    assert seen['a'] == pytest.approx(1.0, rel=1e-5)  # clipped from 100 * sqrt(3)
    assert seen['b'] == pytest.approx(0.25 * 2**0.5, rel=1e-6)  # below the threshold: untouched


def test_unused_parameters_get_empty_state_and_plain_step_without_closure():
    a, b, c, _, opt = _setup([GEN, CRITIC], unused=True)
    opt.step(_closure(opt, a, b))
    assert float(opt.state[c]['step']) == 0 and torch.equal(opt.state[c]['exp_avg'], torch.zeros(4))
    assert torch.equal(c.detach(), torch.ones(4))
    # torch's checkpoint utilities call step(None) with zero grads and lr 0: a plain, phase-less step.
    for g in opt.param_groups:
        g['lr'] = 0.0
    opt.step()


def test_groups_need_a_known_role():
    with pytest.raises(ValueError, match="needs a 'role'"):
        PhasedAdamW([{'params': [torch.nn.Parameter(torch.ones(1))]}], controller=Controller([]))


def test_nonfinite_stop_raises_before_any_update():
    from senseflow_algos.optim import NonFiniteGradientError

    a, b, _, _, opt = _setup([GEN, CRITIC])
    with pytest.raises(NonFiniteGradientError, match='generator phase'):
        opt.step(_closure(opt, a, b, scale_a=float('nan')))
    assert torch.equal(a.detach(), torch.ones(3)) and torch.equal(b.detach(), torch.ones(2))


def test_nonfinite_skip_drops_only_that_phase_and_counts():
    a, b, _, _, opt = _setup([GEN, CRITIC], on_nonfinite='skip')
    calls = []

    def closure():  # NaN only in the generator's loss; the critic's gradients stay finite
        opt.zero_grad(set_to_none=True)
        calls.append(1)
        loss = (float('inf') if len(calls) == 1 else 1.0) * a.sum() + b.sum()
        loss.backward()
        return loss.item()

    opt.step(closure)
    assert torch.equal(a.detach(), torch.ones(3)), 'the non-finite generator update was skipped'
    assert not torch.equal(b.detach(), torch.ones(2)), 'the critic update still happened'
    assert opt.param_groups[0]['nonfinite_skips'] == 1
    assert opt.state_dict()['param_groups'][0]['nonfinite_skips'] == 1  # saved with the optimizer
    with pytest.raises(ValueError, match='on_nonfinite'):
        _setup([GEN], on_nonfinite='ignore')
