"""The typed contract between the DMD model and its algorithms: ``state.outputs`` is a :class:`GeneratorStep`,
``model.phase`` a :class:`TrainingPhase`, and what the VFM discriminator shares between the phases of a batch lives
in the step's declared scratch area."""

from __future__ import annotations

import torch
from composer.core import Event

from senseflow_algos.algorithms.vfm_discriminator.vfm_discriminator import PIXELS_KEY, REFERENCE_KEY
from senseflow_algos.models import GeneratorStep, TrainingPhase
from tests.algorithms.conftest import EventRecorder, tiny_config
from tests.algorithms.test_vfm_discriminator import TINY_VFM


def test_algorithms_receive_a_generator_step_and_the_phase_enum(algo_trainer):
    cfg = tiny_config({'ida': {}, 'isg': {}, 'vfm_discriminator': TINY_VFM}, 'model.gen_every=2',
                      'trainer.max_duration=2ba')

    def record(event, state):
        # Callbacks run after the algorithms at an event: at AFTER_LOSS, ISG and the VFM discriminator have read
        # the step (by attribute) and the discriminator has filled its scratch entries.
        if event == Event.AFTER_LOSS:
            step = state.outputs
            return (state.model.phase, step, dict(step.scratch), int(state.model.batches_seen))
        return None

    recorder = EventRecorder(record)
    trainer = algo_trainer(cfg, callbacks=[recorder])
    trainer.fit()
    recs = recorder.records
    assert [(phase, batch) for phase, _, _, batch in recs] == [(TrainingPhase.GENERATOR, 0), (TrainingPhase.CRITIC, 0),
                                                              (TrainingPhase.CRITIC, 1)]
    for phase, step, scratch, _ in recs:
        assert isinstance(phase, TrainingPhase) and isinstance(step, GeneratorStep)
        assert step.phase is phase
        assert set(scratch) >= {REFERENCE_KEY}
    (_, gen_step, gen_scratch, _), (_, crit, crit_scratch, _), (_, alone, alone_scratch, _) = recs
    # Generator phase: gradient through the sample and its decoded pixels.
    assert gen_step.x0.requires_grad and gen_step.velocity.requires_grad and not gen_step.x_t.requires_grad
    assert gen_scratch[PIXELS_KEY].requires_grad
    # Critic phase of the same batch: the detached copy of that step, carrying the scratch entries over.
    assert crit is not gen_step and not crit.x0.requires_grad and torch.equal(crit.x0, gen_step.x0)
    assert crit.backward_simulation == gen_step.backward_simulation and torch.equal(crit.anchor_index, gen_step.anchor_index)
    assert crit_scratch[REFERENCE_KEY] is gen_scratch[REFERENCE_KEY]  # the reference features are computed once
    assert not crit_scratch[PIXELS_KEY].requires_grad and torch.equal(crit_scratch[PIXELS_KEY],
                                                                      gen_scratch[PIXELS_KEY])
    # A batch without a generator phase: a fresh step without gradient; nothing decoded ahead of the critic.
    assert not alone.x0.requires_grad and PIXELS_KEY not in alone_scratch
