"""Faults: a run killed with SIGKILL resumes exactly; NaN/Inf never reaches weights or checkpoints; an interrupted
checkpoint write leaves no partial file and `latest` on the previous complete one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from composer.core import Callback

from senseflow_algos.builders import build_trainer
from senseflow_algos.config import load_config
from senseflow_algos.optim import NonFiniteGradientError

REPO = Path(__file__).resolve().parents[1]
BASE = ['trainer.progress_bar=false', 'trainer.save_interval=1ba', 'trainer.autoresume=true',
        'trainer.max_duration=8ba', 'model.gen_every=2', 'algorithms.vfm_discriminator=null']


def _train_cmd(folder: Path, run_name: str) -> list[str]:
    return [sys.executable, 'train.py', 'yamls/tiny_flux.yaml', *BASE, f'run_name={run_name}',
            f'trainer.save_folder={folder}']


def _model_state(path: Path) -> dict:
    return torch.load(path, map_location='cpu', weights_only=False)['state']['model']


@pytest.mark.slow  # ~100 s: two training processes; the atomic-write test below covers the file-level fault in CI
def test_sigkill_then_autoresume_matches_uninterrupted(tmp_path):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    straight, killed = tmp_path / 'straight', tmp_path / 'killed'
    subprocess.run(_train_cmd(straight, 'straight'), cwd=REPO, env=env, check=True, capture_output=True, timeout=600)

    proc = subprocess.Popen(_train_cmd(killed, 'killed'), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / 'ep0-ba3-rank0.pt').exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in killed.glob('ep0-ba*-rank0.pt'))
    assert 'ep0-ba8-rank0.pt' not in done, 'the run must have been killed mid-training'

    subprocess.run(_train_cmd(killed, 'killed'), cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
    a, b = _model_state(straight / 'ep0-ba8-rank0.pt'), _model_state(killed / 'ep0-ba8-rank0.pt')
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), 'resumed weights differ from the uninterrupted run'
    assert int(b['batches_seen']) == 8


def _nan_cfg(tmp_path, mode: str) -> dict:
    return load_config(REPO / 'yamls' / 'tiny_flux.yaml',
                       [*BASE, 'trainer.autoresume=false', 'trainer.max_duration=3ba', f'optimizer.on_nonfinite={mode}',
                        f'trainer.save_folder={tmp_path}'])


def _poison_fake_score_loss(model, at_step: int):
    original = model.fake_score_loss

    def poisoned(x0, cond):
        loss = original(x0, cond)
        return loss * float('nan') if int(model.batches_seen) == at_step else loss

    model.fake_score_loss = poisoned


def test_nan_stop_raises_and_checkpoints_stay_finite(tmp_path):
    trainer = build_trainer(_nan_cfg(tmp_path, 'stop'))
    _poison_fake_score_loss(trainer.state.model, at_step=1)
    with pytest.raises(NonFiniteGradientError, match='critic phase'):
        trainer.fit()
    trainer.close()
    saved = sorted(p.name for p in tmp_path.glob('ep0-ba*-rank0.pt'))
    assert saved == ['ep0-ba1-rank0.pt'], 'the failed batch was not checkpointed'
    state = _model_state(tmp_path / 'ep0-ba1-rank0.pt')
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_nan_skip_counts_and_keeps_weights_finite(tmp_path):
    trainer = build_trainer(_nan_cfg(tmp_path, 'skip'))
    model = trainer.state.model
    _poison_fake_score_loss(model, at_step=1)
    fake_after = {}

    class Snap(Callback):

        def batch_end(self, state, logger):
            fake_after[int(model.batches_seen)] = {k: v.clone() for k, v in model.fake_score.state_dict().items()}

    trainer.state.callbacks.append(Snap())
    trainer.fit()
    trainer.close()
    assert trainer.state.optimizers[0].param_groups[0]['nonfinite_skips'] == 1
    assert all(torch.equal(v, fake_after[2][k]) for k, v in fake_after[1].items()), 'batch 1 update skipped'
    for path in tmp_path.glob('ep0-ba*-rank0.pt'):
        state = _model_state(path)
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_interrupted_checkpoint_write_leaves_latest_on_previous(tmp_path, monkeypatch):
    import composer.utils.checkpoint as composer_checkpoint

    cfg = load_config(REPO / 'yamls' / 'tiny_flux.yaml', [*BASE, 'trainer.max_duration=3ba',
                                                            'algorithms.isg=null', f'trainer.save_folder={tmp_path}'])
    trainer = build_trainer(cfg)  # installs the atomic writer
    atomic = composer_checkpoint._write_checkpoint_file
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        if 'ba2' in str(getattr(f, 'name', f)):
            f.write(b'half a checkpoint')
            raise KeyboardInterrupt('killed mid-write')
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, 'save', dying_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    trainer.close()
    assert composer_checkpoint._write_checkpoint_file is atomic
    names = sorted(p.name for p in tmp_path.iterdir())
    assert 'ep0-ba2-rank0.pt' not in names and not [n for n in names if n.startswith('.partial-')]
    assert os.readlink(tmp_path / 'latest-rank0.pt') == 'ep0-ba1-rank0.pt'
