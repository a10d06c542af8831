"""Checkpoint and resume (fp32, CPU): an interrupted run continued from its batch-3 checkpoint reproduces the
uninterrupted run exactly, and checkpoints hold the trainable networks and both roles' Adam state, not the frozen
networks."""

import copy

import pytest
import torch

FROZEN_PREFIXES = ('teacher.', 'vae.', 'conditioner.')
BASE = ['model.gen_every=2']


def _snap(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _final(trainer, rec) -> dict:
    model = trainer.state.model
    return {
        'losses': rec.losses,
        'batches_seen_history': rec.batches_seen_history,
        'generator': _snap(model.generator),
        'fake_score': _snap(model.fake_score),
        'batches_seen': int(model.batches_seen),
        'optimizer': copy.deepcopy(trainer.state.optimizers[0].state_dict()),
        'roles': [g['role'] for g in trainer.state.optimizers[0].param_groups],
        'param_names': {id(p): n for n, p in model.named_parameters()},
        'groups': [[id(p) for p in g['params']] for g in trainer.state.optimizers[0].param_groups],
    }


@pytest.fixture(scope='module')
def runs(tmp_path_factory, make_trainer):
    """Run A: 6 batches, a checkpoint every batch. Run B: 3 batches, checkpoint at batch 3."""
    root = tmp_path_factory.mktemp('resume')
    out = {'root': root}
    trainer, rec = make_trainer(
        'tiny_flux', [*BASE, 'trainer.max_duration=6ba', f'trainer.save_folder={root / "a"}',
                      'trainer.save_interval=1ba'])
    trainer.fit()
    out['a'] = _final(trainer, rec)
    trainer.close()
    trainer, rec = make_trainer(
        'tiny_flux', [*BASE, 'trainer.max_duration=3ba', f'trainer.save_folder={root / "b"}',
                      'trainer.save_interval=3ba'])
    trainer.fit()
    out['b'] = _final(trainer, rec)
    trainer.close()
    return out


def _assert_same_state(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f'{what}: {k}'


def _assert_same_optimizer(a: dict, b: dict):
    assert a['param_groups'] == b['param_groups']
    assert a['state'].keys() == b['state'].keys()
    for i in a['state']:
        assert a['state'][i].keys() == b['state'][i].keys(), i
        for k in a['state'][i]:
            assert torch.equal(a['state'][i][k], b['state'][i][k]), (i, k)


def test_checkpoint_files(runs):
    names = {p.name for p in (runs['root'] / 'a').iterdir()}
    assert {f'ep0-ba{i}-rank0.pt' for i in range(1, 7)} <= names
    names = {p.name for p in (runs['root'] / 'b').iterdir()}
    assert 'ep0-ba3-rank0.pt' in names


def test_resume_matches_uninterrupted_run(runs, make_trainer):
    a, b = runs['a'], runs['b']
    # Same seed, same first three batches.
    assert b['losses'] == a['losses'][:3]
    trainer, rec = make_trainer(
        'tiny_flux', [*BASE, 'trainer.max_duration=6ba', f'trainer.load_path={runs["root"] / "b" / "ep0-ba3-rank0.pt"}'])
    model = trainer.state.model
    # The load already happened in the constructor: the trainable weights and the TTUR counter are batch 3's.
    assert int(model.batches_seen) == 3
    _assert_same_state(_snap(model.generator), b['generator'], 'generator after load')
    _assert_same_state(_snap(model.fake_score), b['fake_score'], 'fake_score after load')
    trainer.fit()
    c = _final(trainer, rec)
    trainer.close()
    assert c['batches_seen_history'] == [4, 5, 6]
    assert len(c['losses']) == 3
    assert c['losses'] == a['losses'][3:]
    assert c['batches_seen'] == a['batches_seen'] == 6
    _assert_same_state(c['generator'], a['generator'], 'generator')
    _assert_same_state(c['fake_score'], a['fake_score'], 'fake_score')
    assert c['roles'] == a['roles']
    _assert_same_optimizer(c['optimizer'], a['optimizer'])
    # Adam moments really are there: the generator stepped at batches_seen 0, 2, 4; the fake score every batch.
    opt = trainer.state.optimizers[0]
    for group in opt.param_groups:
        if group['role'] in ('generator', 'fake_score'):
            steps = {int(opt.state[p]['step']) for p in group['params']}
            assert steps == {3 if group['role'] == 'generator' else 6}, group['role']


def test_resume_from_checkpoint_with_the_old_counter_key(runs, make_trainer, tmp_path):
    """A checkpoint written before the batch counter was renamed (``ttur_step``) resumes exactly like a new one."""
    ckpt = torch.load(runs['root'] / 'b' / 'ep0-ba3-rank0.pt', map_location='cpu', weights_only=False)
    model_state = ckpt['state']['model']
    model_state['ttur_step'] = model_state.pop('batches_seen')
    old = tmp_path / 'ep0-ba3-rank0.pt'
    torch.save(ckpt, old)
    trainer, rec = make_trainer('tiny_flux', [*BASE, 'trainer.max_duration=6ba', f'trainer.load_path={old}'])
    assert int(trainer.state.model.batches_seen) == 3
    trainer.fit()
    c = _final(trainer, rec)
    trainer.close()
    assert c['batches_seen_history'] == [4, 5, 6]
    assert c['losses'] == runs['a']['losses'][3:]
    _assert_same_state(c['generator'], runs['a']['generator'], 'generator')


def test_checkpoint_contents(runs):
    path = runs['root'] / 'b' / 'ep0-ba3-rank0.pt'
    ckpt = torch.load(path, map_location='cpu', weights_only=False)
    model_state = ckpt['state']['model']
    assert not [k for k in model_state if k.startswith(FROZEN_PREFIXES)]
    gen = {k[len('generator.'):]: v for k, v in model_state.items() if k.startswith('generator.')}
    fake = {k[len('fake_score.'):]: v for k, v in model_state.items() if k.startswith('fake_score.')}
    _assert_same_state(gen, runs['b']['generator'], 'checkpointed generator')
    _assert_same_state(fake, runs['b']['fake_score'], 'checkpointed fake_score')
    assert int(model_state['batches_seen']) == 3
    optim = ckpt['state']['optimizers']['PhasedAdamW']
    roles = [g['role'] for g in optim['param_groups']]
    assert roles == runs['b']['roles'] and roles[:2] == ['generator', 'fake_score']
    live_names = runs['b']['param_names']
    for i, prefix in enumerate(('generator.', 'fake_score.')):
        group = optim['param_groups'][i]
        # The group lists exactly the role's parameters of the live optimizer, by name.
        expected = {live_names[pid] for pid in runs['b']['groups'][i]}
        assert expected and all(n.startswith(prefix) for n in expected)
        assert set(group['params']) == expected, prefix
        for name in expected:
            assert name in model_state, name
            entry = optim['state'][name]
            assert {'step', 'exp_avg', 'exp_avg_sq'} <= set(entry), name
    assert not [k for k in optim['state'] if k.startswith(FROZEN_PREFIXES)]
    gen_group = optim['param_groups'][0]
    assert all(int(optim['state'][k]['step']) == 2 for k in gen_group['params'])  # batches_seen 0 and 2
    fake_group = optim['param_groups'][1]
    assert all(int(optim['state'][k]['step']) == 3 for k in fake_group['params'])


def test_runs_are_reproducible_checkpoint_to_checkpoint(runs):
    """Run A's batch-3 checkpoint equals run B's: nothing in a run depends on more than (config, seed)."""
    a = torch.load(runs['root'] / 'a' / 'ep0-ba3-rank0.pt', map_location='cpu', weights_only=False)['state']
    b = torch.load(runs['root'] / 'b' / 'ep0-ba3-rank0.pt', map_location='cpu', weights_only=False)['state']
    _assert_same_state(a['model'], b['model'], 'model')
    _assert_same_optimizer(a['optimizers']['PhasedAdamW'], b['optimizers']['PhasedAdamW'])
