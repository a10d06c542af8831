"""Composer FSDP2 on 2 CPU processes (gloo): full SenseFlow trains sharded, sharded checkpoints leave out the frozen
networks, and a run resumed from a sharded checkpoint ends with the same weights as the uninterrupted run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

REPO = Path(__file__).resolve().parents[2]
FROZEN = ('teacher.', 'vae.', 'conditioner.', 'vfm_backbone.')


def _train(folder: Path, *overrides: str) -> None:
    env = {**os.environ, 'FSDP_VERSION': '2', 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'composer.cli.launcher', '-n', '2', 'train.py', 'yamls/tiny_flux.yaml',
           'trainer.max_duration=3ba', 'model.gen_every=2', 'trainer.progress_bar=false', 'trainer.save_interval=1ba',
           f'trainer.save_folder={folder}', 'trainer.parallelism_config={fsdp: {state_dict_type: sharded}}', *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _model_state(sharded_dir: Path, tmp: Path) -> dict:
    out = tmp / f'{sharded_dir.parent.name}-{sharded_dir.name}.pt'
    dcp_to_torch_save(sharded_dir, out)
    return torch.load(out, weights_only=False)['state']['model']


def test_fsdp2_trains_checkpoints_and_resumes_exactly(tmp_path):
    _train(tmp_path / 'straight')
    _train(tmp_path / 'resumed', f'trainer.load_path={tmp_path / "straight" / "ep0-ba1"}')
    a = _model_state(tmp_path / 'straight' / 'ep0-ba3', tmp_path)
    b = _model_state(tmp_path / 'resumed' / 'ep0-ba3', tmp_path)
    assert not [k for k in a if k.startswith(FROZEN)], 'frozen networks must not be in sharded checkpoints'
    assert any(k.startswith('discriminator.') for k in a) and int(a['ttur_step']) == 3
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f'resumed run differs in {different[:5]}'
    first = _model_state(tmp_path / 'straight' / 'ep0-ba1', tmp_path)
    assert any(not torch.equal(first[k], a[k]) for k in a if k.startswith('generator.')), 'the generator trained'
