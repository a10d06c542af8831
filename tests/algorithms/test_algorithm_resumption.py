"""Every algorithm (and all together) trains twice in a row, resumes from a checkpoint identically, and gives the
same result whatever its position in the YAML (as Composer's own algorithm tests require)."""

from __future__ import annotations

import pytest
import torch

from tests.algorithms.conftest import tiny_config
from tests.algorithms.test_vfm_discriminator import TINY_VFM

ALGORITHMS = {
    'ida': {'ida': {'lam': 0.9}},
    'isg': {'isg': {'weight': 1.0}},
    'vfm_discriminator': {'vfm_discriminator': TINY_VFM},
    'all': {'ida': {'lam': 0.9}, 'isg': {'weight': 1.0}, 'vfm_discriminator': TINY_VFM},
}


def _final_state(trainer) -> dict:
    state = trainer.state
    return {
        'model': {k: v.detach().clone() for k, v in state.model.state_dict().items()},
        'optimizer': state.optimizers[0].state_dict(),
        'algorithms': [a.state_dict() for a in state.algorithms],
    }


def _assert_same(a, b, path='state'):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f'{path}.{k}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f'{path}[{i}]')
    elif torch.is_tensor(a):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


@pytest.mark.parametrize('name', list(ALGORITHMS))
def test_trains_twice_in_a_row(name, algo_trainer):
    trainer = algo_trainer(tiny_config(ALGORITHMS[name], 'model.gen_every=2', 'trainer.max_duration=2ba'))
    trainer.fit()
    trainer.fit(duration='1ba')
    assert int(trainer.state.timestamp.batch) == 3
    assert int(trainer.state.model.batches_seen) == 3


@pytest.mark.parametrize('name', list(ALGORITHMS))
def test_resumes_identically(name, algo_trainer, tmp_path):
    cfg = tiny_config(ALGORITHMS[name], 'model.gen_every=2', 'trainer.max_duration=4ba')
    full = algo_trainer(cfg, save_folder=str(tmp_path / 'full'), save_interval='1ba')
    full.fit()
    resumed = algo_trainer(cfg, load_path=str(tmp_path / 'full' / 'ep0-ba2-rank0.pt'))
    assert int(resumed.state.timestamp.batch) == 2 and int(resumed.state.model.batches_seen) == 2
    resumed.fit()
    _assert_same(_final_state(full), _final_state(resumed))


def test_yaml_order_does_not_matter(algo_trainer):
    forward = dict(ALGORITHMS['all'])
    backward = dict(reversed(list(forward.items())))
    a = algo_trainer(tiny_config(forward, 'model.gen_every=2', 'trainer.max_duration=3ba'))
    b = algo_trainer(tiny_config(backward, 'model.gen_every=2', 'trainer.max_duration=3ba'))
    assert [type(x).__name__ for x in a.state.algorithms] != [type(x).__name__ for x in b.state.algorithms]
    a.fit()
    b.fit()
    model_a, model_b = a.state.model.state_dict(), b.state.model.state_dict()
    _assert_same(model_a, model_b)
