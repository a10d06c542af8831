"""DMDModel: frozen networks, FLUX guidance embedding, TTUR phases through the real Composer Trainer, seeded noise
streams and the critic's reuse of the generator sample."""

import pytest
import torch

from senseflow_algos.data import SyntheticCaptionedImages
from senseflow_algos.models import GeneratorStep
from senseflow_algos.models.dmd import CRITIC_PHASE, GENERATOR_PHASE, DMDModel
from senseflow_algos.models.factory import build_dmd_model
from senseflow_algos.optim import PhasedAdamW, TrainingPhase

FROZEN = ('teacher', 'vae', 'conditioner')


@pytest.fixture(scope='module', params=['flux', 'sd35'])
def model(request) -> DMDModel:
    """A tiny model per family, built once; tests using it must not change its weights."""
    return build_dmd_model(family=request.param, tiny=True, resolution=32, seed=0)


@pytest.fixture(scope='module')
def flux_model() -> DMDModel:
    return build_dmd_model(family='flux', tiny=True, resolution=32, seed=0)


def _batch(n=2, resolution=32):
    data = SyntheticCaptionedImages(16, resolution, seed=0)
    items = [data[i] for i in range(n)]
    return {'image': torch.stack([it['image'] for it in items]), 'prompt': [it['prompt'] for it in items]}


def _equal_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _snap(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------------------
# Frozen networks and checkpoint state


def test_frozen_networks(model):
    for name in FROZEN:
        net = getattr(model, name)
        params = list(net.parameters())
        assert params, name
        assert not any(p.requires_grad for p in params), name
    model.train()
    try:
        assert model.training and model.generator.training and model.fake_score.training
        for name in FROZEN:
            assert not any(m.training for m in getattr(model, name).modules()), name
    finally:
        model.eval()
    # Only generator and fake-score tensors are trainable and handed to the optimizer.
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    expected = {id(p) for p in [*model.generator.parameters(), *model.fake_score.parameters()]}
    assert trainable == expected
    groups = model.param_groups()
    assert [g['role'] for g in groups] == ['generator', 'fake_score']
    assert {id(p) for g in groups for p in g['params']} == expected


def test_state_dict_drops_frozen(model):
    state = model.state_dict()
    assert not [k for k in state if k.startswith(tuple(f'{n}.' for n in FROZEN))]
    gen_keys = {f'generator.{k}' for k in model.generator.state_dict()}
    fake_keys = {f'fake_score.{k}' for k in model.fake_score.state_dict()}
    assert set(state) == gen_keys | fake_keys | {'batches_seen'}
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_load_state_dict_restores_trainable_weights():
    a = build_dmd_model(family='sd35', tiny=True, resolution=32, seed=0)
    b = build_dmd_model(family='sd35', tiny=True, resolution=32, seed=1)
    teacher_b = _snap(b.teacher)
    b.batches_seen.fill_(7)
    b.load_state_dict(a.state_dict(), strict=True)
    assert _equal_state(b.generator.state_dict(), a.generator.state_dict())
    assert _equal_state(b.fake_score.state_dict(), a.fake_score.state_dict())
    assert int(b.batches_seen) == 0
    assert _equal_state(b.teacher.state_dict(), teacher_b)  # frozen nets are not touched by a load
    # strict loading still rejects a missing trainable key.
    broken = a.state_dict()
    broken.pop(next(k for k in broken if k.startswith('generator.')))
    with pytest.raises(RuntimeError, match='Missing key'):
        b.load_state_dict(broken, strict=True)


def test_state_dict_with_the_old_batch_counter_key_loads():
    """Checkpoints written before ``batches_seen`` was renamed hold ``ttur_step``: it loads, strictly, into
    ``batches_seen`` (also under a prefix, as in a DDP-wrapped model)."""
    a = build_dmd_model(family='sd35', tiny=True, resolution=32, seed=0)
    b = build_dmd_model(family='sd35', tiny=True, resolution=32, seed=1)
    old = a.state_dict()
    del old['batches_seen']
    old['ttur_step'] = torch.tensor(5)
    result = b.load_state_dict(old, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert int(b.batches_seen) == 5 and 'ttur_step' in old  # the caller's dict is left as it was
    assert _equal_state(b.generator.state_dict(), a.generator.state_dict())
    wrapper = torch.nn.Module()
    wrapper.module = b
    wrapped = {f'module.{k}': v for k, v in old.items()}
    wrapped['module.ttur_step'] = torch.tensor(9)
    result = wrapper.load_state_dict(wrapped, strict=False)  # (the frozen-key allowance expects no prefix)
    assert not result.unexpected_keys and 'module.batches_seen' not in result.missing_keys
    assert int(b.batches_seen) == 9


def test_phase_is_the_enum_and_the_step_a_record():
    m = build_dmd_model(family='flux', tiny=True, resolution=32, seed=0)
    assert m.phase is TrainingPhase.CRITIC
    assert GENERATOR_PHASE.kind is TrainingPhase.GENERATOR and CRITIC_PHASE.kind is TrainingPhase.CRITIC
    m.begin_phase(GENERATOR_PHASE)
    assert m.phase is TrainingPhase.GENERATOR
    step = m(_batch())
    assert isinstance(step, GeneratorStep) and step.phase is TrainingPhase.GENERATOR and step.x0.requires_grad
    step.scratch['tensor'], step.scratch['other'] = step.x0 * 2, [step.x0]
    m.begin_phase(CRITIC_PHASE)
    critic = m(_batch())  # the cached generator step, detached
    assert critic.phase is TrainingPhase.CRITIC and critic is not step
    for name in ('x_t', 'sigma', 'sigma_next', 'anchor_index', 'velocity', 'x0'):
        assert not getattr(critic, name).requires_grad and torch.equal(getattr(critic, name), getattr(step, name))
    assert critic.cond is step.cond and critic.backward_simulation == step.backward_simulation
    assert not critic.scratch['tensor'].requires_grad and critic.scratch['other'] is step.scratch['other']
    assert critic.scratch is not step.scratch
    m.end_batch()
    assert m.phase is TrainingPhase.CRITIC
    assert str(TrainingPhase.GENERATOR) == 'generator' and str(TrainingPhase.CRITIC) == 'critic'


def test_flux_guidance_embedding(flux_model):
    m = flux_model
    assert m.teacher.config.guidance_embeds is True
    assert hasattr(m.teacher.time_text_embed, 'guidance_embedder')
    for name in ('generator', 'fake_score'):
        net = getattr(m, name)
        assert net.config.guidance_embeds is False, name
        assert not hasattr(net.time_text_embed, 'guidance_embedder'), name
        assert not any('guidance_embedder' in k for k in net.state_dict()), name
    teacher = m.teacher.state_dict()
    gen = m.generator.state_dict()
    assert set(gen) == {k for k in teacher if '.guidance_embedder.' not in k}
    for k, v in gen.items():
        assert torch.equal(v, teacher[k]), k
        assert v.data_ptr() != teacher[k].data_ptr(), k  # a copy, not shared storage
    assert _equal_state(m.fake_score.state_dict(), gen)


def test_generator_and_fake_start_from_teacher(model):
    teacher = model.teacher.state_dict()
    gen = model.generator.state_dict()
    assert set(gen) <= set(teacher)
    if model.family.name == 'sd35':
        assert set(gen) == set(teacher)
    for k in gen:
        assert torch.equal(gen[k], teacher[k]), k
    assert _equal_state(model.fake_score.state_dict(), gen)


# ---------------------------------------------------------------------------------------------------------------------
# Noise streams


def test_rng_streams():
    m = build_dmd_model(family='sd35', tiny=True, resolution=32, seed=0)
    first = torch.randn(8, generator=m.rng('x'))
    assert m.rng('x') is m.rng('x')  # one stream per purpose within a batch
    other = torch.randn(8, generator=m.rng('y'))
    assert not torch.equal(first, other)
    shared = torch.randn(8, generator=m.rng('x', per_rank=False))
    assert not torch.equal(first, shared)
    m.end_batch()  # batches_seen 0 -> 1 and streams dropped
    assert int(m.batches_seen) == 1
    next_batch = torch.randn(8, generator=m.rng('x'))
    assert not torch.equal(first, next_batch)
    m.end_batch()
    m.batches_seen.fill_(0)  # same (seed, rank, batches_seen, purpose) -> same draws, whatever the order of purposes
    assert m.rng('x') is not m.rng('y')
    assert torch.equal(torch.randn(8, generator=m.rng('y')), other)
    assert torch.equal(torch.randn(8, generator=m.rng('x')), first)
    # Another model with the same seed draws the same; a different seed does not.
    m2 = build_dmd_model(family='sd35', tiny=True, resolution=32, seed=0)
    assert torch.equal(torch.randn(8, generator=m2.rng('x')), first)
    m3 = DMDModel(m2.family, _components_of(m2), resolution=32, seed=1)
    assert not torch.equal(torch.randn(8, generator=m3.rng('x')), first)


def _components_of(m):
    from senseflow_algos.models.families import Components

    return Components(teacher=m.teacher, student=m.generator, vae=m.vae, conditioner=m.conditioner,
                      scheduler_config=m.scheduler_config)


# ---------------------------------------------------------------------------------------------------------------------
# Phases driven by PhasedAdamW with a hand-written closure


def test_critic_reuses_generator_sample():
    m = build_dmd_model(family='flux', tiny=True, resolution=32, seed=0, gen_every=2)
    m.train()
    opt = PhasedAdamW(m.param_groups(), controller=m, lr=1e-3)
    batch = _batch()
    calls, fake_inputs, phases = [], [], []
    orig_pass, orig_fake = m.generator_pass, m.fake_score_loss

    def generator_pass(batch, with_grad):
        out = orig_pass(batch, with_grad)
        calls.append((with_grad, out.x0.detach().clone()))
        return out

    def fake_score_loss(x0, cond):
        fake_inputs.append(x0.detach().clone())
        return orig_fake(x0, cond)

    m.generator_pass, m.fake_score_loss = generator_pass, fake_score_loss

    def closure():
        opt.zero_grad(set_to_none=True)
        phases.append(m.phase)
        out = m(batch)
        loss = m.loss(out, batch)
        assert out.phase == m.phase
        loss['total'].backward()
        return loss['total'].item()

    # Batch 0: generator batch -> generator phase, then critic on the same (pre-update) sample.
    assert m.training_phases() == [GENERATOR_PHASE, CRITIC_PHASE]
    gen_before = _snap(m.generator)
    opt.step(closure)
    assert phases == [TrainingPhase.GENERATOR, TrainingPhase.CRITIC]
    assert len(calls) == 1 and calls[0][0] is True  # the critic did not run the generator again
    assert len(fake_inputs) == 1 and torch.equal(fake_inputs[0], calls[0][1])
    assert not _equal_state(_snap(m.generator), gen_before)  # the generator did step before the critic ran
    assert int(m.batches_seen) == 1 and m._sample_cache == []

    # Batch 1: critic only -> one generator pass without grad feeds the fake score.
    assert m.training_phases() == [CRITIC_PHASE]
    gen_before = _snap(m.generator)
    opt.step(closure)
    assert phases == [TrainingPhase.GENERATOR, TrainingPhase.CRITIC, TrainingPhase.CRITIC]
    assert len(calls) == 2 and calls[1][0] is False
    assert torch.equal(fake_inputs[1], calls[1][1])
    assert _equal_state(_snap(m.generator), gen_before)
    assert int(m.batches_seen) == 2


def test_generator_phase_gradient_reaches_only_generator():
    m = build_dmd_model(family='sd35', tiny=True, resolution=32, seed=0)
    m.train()
    batch = _batch()
    # Frozen networks run without building a graph (their parameters never require grad, so a grad check on them
    # would check nothing): record whether autograd was on during each of their forwards.
    grad_mode = []
    for name, net in (('teacher', m.teacher), ('vae', m.vae.encoder), ('conditioner', m.conditioner.text_encoder)):
        net.register_forward_hook(lambda mod, i, o, name=name: grad_mode.append((name, torch.is_grad_enabled())))
    m.begin_phase(GENERATOR_PHASE)
    out = m(batch)
    m.loss(out, batch)['total'].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.generator.parameters())
    assert all(p.grad is None for p in m.fake_score.parameters())
    ran = {'teacher', 'conditioner'} | (set() if out.backward_simulation else {'vae'})  # the VAE encodes real images
    assert {name for name, _ in grad_mode} == ran
    assert not any(enabled for _, enabled in grad_mode), grad_mode
    m.zero_grad(set_to_none=True)
    m.begin_phase(CRITIC_PHASE)
    out = m(batch)  # reuses the cached generator sample
    assert out.phase is TrainingPhase.CRITIC and not out.x0.requires_grad
    m.loss(out, batch)['total'].backward()
    assert all(p.grad is None for p in m.generator.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.fake_score.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# TTUR through the real Composer Trainer


@pytest.mark.parametrize('yaml_name', ['tiny_flux', 'tiny_sd35'])
def test_ttur_with_composer_trainer(make_trainer, yaml_name):
    trainer, rec = make_trainer(yaml_name, ['trainer.max_duration=4ba', 'model.gen_every=2'],
                                snapshot=('generator', 'fake_score', 'teacher', 'vae'))
    trainer.fit()
    model = trainer.state.model
    assert rec.batches_seen_history == [1, 2, 3, 4]
    prev = rec.initial
    for step, snap in enumerate(rec.snapshots):  # batches_seen of this batch = step
        gen_batch = step % 2 == 0
        assert _equal_state(snap['generator'], prev['generator']) is not gen_batch, step
        assert not _equal_state(snap['fake_score'], prev['fake_score']), step
        assert _equal_state(snap['teacher'], rec.initial['teacher']), step
        assert _equal_state(snap['vae'], rec.initial['vae']), step
        assert ('loss/train/generator/dmd' in rec.losses[step]) is gen_batch, step
        assert 'loss/train/fake_score/flow_matching' in rec.losses[step]
        assert all(torch.isfinite(torch.tensor(v)) for v in rec.losses[step].values())
        prev = snap
    # Adam moments: the generator stepped on 2 batches, the fake score on all 4.
    opt = trainer.state.optimizers[0]
    for group in [g for g in opt.param_groups if g['role'] in ('generator', 'fake_score')]:
        steps = {int(opt.state[p]['step']) for p in group['params']}
        assert steps == {2 if group['role'] == 'generator' else 4}, group['role']
    assert int(model.batches_seen) == 4
    trainer.close()


@pytest.mark.parametrize('yaml_name', ['tiny_flux', 'tiny_sd35'])
def test_frozen_networks_unchanged_by_training_and_outside_the_optimizer(make_trainer, yaml_name):
    """Teacher, VAE, text encoders and the VFM backbone: bit-identical after real batches (generator and critic
    phases, with IDA, ISG and the discriminator), and in no optimizer param group nor optimizer state."""
    frozen = (*FROZEN, 'vfm_backbone')
    trainer, rec = make_trainer(yaml_name, ['trainer.max_duration=2ba', 'model.gen_every=1'],
                                snapshot=(*frozen, 'generator'))
    trainer.fit()
    model, opt = trainer.state.model, trainer.state.optimizers[0]
    for name in frozen:
        assert _equal_state(rec.snapshots[-1][name], rec.initial[name]), name
    assert not _equal_state(rec.snapshots[-1]['generator'], rec.initial['generator'])  # training did happen
    frozen_ids = {id(p) for name in frozen for p in getattr(model, name).parameters()}
    assert frozen_ids and len(frozen_ids) > 100
    assert not frozen_ids & {id(p) for g in opt.param_groups for p in g['params']}
    assert not frozen_ids & {id(p) for p in opt.state}
    trainer.close()


def test_same_seed_same_run_different_seed_differs(make_trainer):
    runs = []
    for seed in (17, 17, 18):
        trainer, rec = make_trainer('tiny_sd35', ['trainer.max_duration=2ba', 'model.gen_every=2', f'seed={seed}'])
        trainer.fit()
        m = trainer.state.model
        runs.append((rec.losses, _snap(m.generator), _snap(m.fake_score)))
        trainer.close()
    (la, ga, fa), (lb, gb, fb), (lc, gc, fc) = runs
    assert la == lb
    assert _equal_state(ga, gb) and _equal_state(fa, fb)
    assert la != lc
    assert not _equal_state(ga, gc) and not _equal_state(fa, fc)


def test_model_seed_alone_changes_the_noise():
    """Same weights, different ``seed``: different losses (the noise streams depend on the seed)."""
    batch = _batch()
    results = []
    for seed in (0, 0, 1):
        m = build_dmd_model(family='sd35', tiny=True, resolution=32, seed=0)
        m.seed = seed
        m.begin_phase(CRITIC_PHASE)
        out = m(batch)
        results.append((float(m.loss(out, batch)['total']), out.x0))
    assert results[0][0] == results[1][0] and torch.equal(results[0][1], results[1][1])
    assert results[0][0] != results[2][0] and not torch.equal(results[0][1], results[2][1])
