"""IDA: the exact update, when it fires, and what it leaves alone."""

from __future__ import annotations

import pytest
import torch
from composer.core import Event
from torch import nn

from senseflow_algos.algorithms import ImplicitDistributionAlignment
from senseflow_algos.functional import align_fake_score
from senseflow_algos.optim import TrainingPhase
from tests.algorithms.conftest import EventRecorder, snapshot, tiny_config


def _pair(seed_a=0, seed_b=1):
    torch.manual_seed(seed_a)
    fake = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    torch.manual_seed(seed_b)
    gen = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    return fake, gen


@pytest.mark.parametrize('lam', [0.0, 0.5, 0.97, 1.0])
def test_formula_exact(lam):
    fake, gen = _pair()
    before, theta = snapshot(fake), snapshot(gen)
    align_fake_score(fake, gen, lam)
    for name, phi in fake.state_dict().items():
        torch.testing.assert_close(phi, lam * before[name] + (1 - lam) * theta[name], rtol=0, atol=1e-7)
    assert all(torch.equal(v, theta[k]) for k, v in gen.state_dict().items()), 'the generator must not change'


def test_frozen_fake_tensors_untouched():
    fake, gen = _pair()
    fake[0].weight.requires_grad_(False)
    frozen = fake[0].weight.detach().clone()
    align_fake_score(fake, gen, 0.5)
    assert torch.equal(fake[0].weight, frozen)
    assert not torch.equal(fake[2].weight, gen[2].weight) and not torch.equal(fake[2].weight, frozen)


def test_mismatch_names_the_parameter():
    fake, _ = _pair()
    gen = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 5))
    with pytest.raises(ValueError, match=r'2\.weight: fake score \(2, 3\) vs generator \(5, 3\)'):
        align_fake_score(fake, gen)
    with pytest.raises(ValueError, match=r'lam must be in \[0, 1\]'):
        ImplicitDistributionAlignment(lam=1.5)


def test_in_training_exact_after_generator_steps_noop_otherwise(algo_trainer):
    """gen_every=2 over 4 batches: IDA on batches 0 and 2 (exact formula), nothing on 1 and 3."""
    lam = 0.9
    cfg = tiny_config({'ida': {'lam': lam}}, 'model.gen_every=2', 'trainer.max_duration=4ba')

    def record(event, state):
        model = state.model
        if event == Event.AFTER_TRAIN_BATCH and model.phase is TrainingPhase.GENERATOR:
            return ('fake_before_ida', snapshot(model.fake_score))
        if event == Event.BEFORE_TRAIN_BATCH and model.phase is TrainingPhase.CRITIC:
            return ('critic_start', int(model.batches_seen), model.generator_stepped, snapshot(model.generator),
                    snapshot(model.fake_score))
        if event == Event.BATCH_END:
            return ('batch_end', snapshot(model.fake_score))
        return None

    recorder = EventRecorder(record)
    trainer = algo_trainer(cfg, callbacks=[recorder])
    teacher_before = snapshot(trainer.state.model.teacher)
    trainer.fit()

    records = recorder.records
    aligned, untouched = 0, 0
    for i, rec in enumerate(records):
        if rec[0] != 'critic_start':
            continue
        _, step, stepped, gen_now, fake_now = rec
        assert stepped == (step % 2 == 0)
        if stepped:
            fake_before = records[i - 1][1]
            assert records[i - 1][0] == 'fake_before_ida'
            for k, v in fake_now.items():
                torch.testing.assert_close(v, lam * fake_before[k] + (1 - lam) * gen_now[k], rtol=0, atol=1e-6)
            aligned += 1
        else:
            previous_end = [r for r in records[:i] if r[0] == 'batch_end'][-1][1]
            assert all(torch.equal(v, previous_end[k]) for k, v in fake_now.items())
            untouched += 1
    assert (aligned, untouched) == (2, 2)
    ida = [a for a in trainer.state.algorithms if isinstance(a, ImplicitDistributionAlignment)][0]
    assert ida.num_updates == 2
    teacher_after = snapshot(trainer.state.model.teacher)
    assert all(torch.equal(v, teacher_after[k]) for k, v in teacher_before.items())
