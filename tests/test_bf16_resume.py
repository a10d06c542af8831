"""bf16 trained weights with stochastic rounding through the real trainer: they train, keep fp32 Adam moments, and a
run resumed from a checkpoint continues bit-identically (the rounding bits come from the model's per-batch streams,
in the optimizer and in IDA)."""

from __future__ import annotations

import pytest
import torch

BASE = ['model.gen_every=2', 'model.tiny=false', 'model.dtype=bf16', 'model.teacher_dtype=bf16',
        'optimizer.stochastic_rounding=true', 'trainer.autoresume=false']


def _snap(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope='module')
def pipe(tmp_path_factory):
    from senseflow_algos.models.tiny import save_tiny_pipeline

    # model.dtype applies on the from_pretrained path (tiny models are built in fp32).
    return save_tiny_pipeline('flux', tmp_path_factory.mktemp('pipe') / 'flux', seed=0)


def test_bf16_stochastic_rounding_run_resumes_bit_identically(pipe, tmp_path, make_trainer):
    common = [*BASE, f'model.pretrained={pipe}']
    trainer, _ = make_trainer('tiny_flux', [*common, 'trainer.max_duration=4ba', f'trainer.save_folder={tmp_path}',
                                            'trainer.save_interval=2ba'])
    model = trainer.state.model
    start = _snap(model.generator)
    trainer.fit()
    straight = {'generator': _snap(model.generator), 'fake_score': _snap(model.fake_score)}
    opt = trainer.state.optimizers[0]
    trained = [p for g in opt.param_groups if g['role'] in ('generator', 'fake_score') for p in g['params']]
    assert trained and {p.dtype for p in trained} == {torch.bfloat16}
    assert {opt.state[p]['exp_avg'].dtype for p in trained} == {torch.float32}
    moved = [k for k in start if not torch.equal(start[k], straight['generator'][k])]
    assert len(moved) > len(start) // 2, 'the bf16 generator trained'
    trainer.close()

    trainer, _ = make_trainer('tiny_flux', [*common, 'trainer.max_duration=4ba',
                                            f'trainer.load_path={tmp_path / "ep0-ba2-rank0.pt"}'])
    model = trainer.state.model
    assert int(model.batches_seen) == 2
    opt = trainer.state.optimizers[0]
    loaded = [p for g in opt.param_groups if g['role'] == 'generator' for p in g['params']]
    assert {opt.state[p]['exp_avg'].dtype for p in loaded} == {torch.float32}, 'moments stay fp32 through a load'
    trainer.fit()  # batch 2 is a generator batch: optimizer rounding and IDA rounding both run again
    for name in ('generator', 'fake_score'):
        resumed = _snap(getattr(model, name))
        different = [k for k in resumed if not torch.equal(resumed[k], straight[name][k])]
        assert not different, f'{name} differs after resuming in {different[:5]}'
    trainer.close()
