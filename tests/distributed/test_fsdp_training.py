"""Composer's FSDP2 and FSDP1 on 2 CPU processes (gloo): full SenseFlow trains sharded, sharded checkpoints leave out
the frozen networks, a run resumed from a sharded checkpoint ends with the same weights as the uninterrupted run, and
parameter CPU offload (FSDP2) puts every FSDP unit under the offload policy, keeps the trained shards and optimizer
state on the CPU between steps and changes no weight. FSDP1 runs through fsdp1_cpu_train.py, since Composer hands
FSDP1 a CUDA device id; FSDP2 through fsdp2_offload_probe.py, train.py plus a report of where FSDP2 keeps the trained
state after every step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from senseflow_algos.builders import build_model
from senseflow_algos.config import load_config
from tests.distributed.conftest import FSDP
from tests.distributed.conftest import train_fsdp as _train

REPO = Path(__file__).resolve().parents[2]
FROZEN = ('teacher.', 'vae.', 'conditioner.', 'vfm_backbone.')


def _model_state(sharded_dir: Path, tmp: Path) -> dict:
    out = tmp / f'{sharded_dir.parent.name}-{sharded_dir.name}.pt'
    dcp_to_torch_save(sharded_dir, out)
    return torch.load(out, weights_only=False)['state']['model']


def _offload_reports(stdout: str) -> list[dict]:
    """Rank 0's per-batch ``OFFLOAD_REPORT`` lines of fsdp2_offload_probe.py."""
    return [json.loads(line.split(' ', 1)[1]) for line in stdout.splitlines() if line.startswith('OFFLOAD_REPORT ')]


# The FSDP2 resume in `make test-slow` (its straight run stays in CI, for the offload test).
@pytest.mark.parametrize('version', [pytest.param('2', marks=pytest.mark.slow, id='2'), '1'])
def test_fsdp_trains_checkpoints_and_resumes_exactly(version, straight, tmp_path):
    folder = straight(version)
    _train(tmp_path / 'resumed', f'trainer.load_path={folder / "ep0-ba1"}', version=version)
    a = _model_state(folder / 'ep0-ba3', tmp_path)
    b = _model_state(tmp_path / 'resumed' / 'ep0-ba3', tmp_path)
    assert not [k for k in a if k.startswith(FROZEN)], 'frozen networks must not be in sharded checkpoints'
    assert any(k.startswith('discriminator.') for k in a) and int(a['batches_seen']) == 3
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f'resumed run differs in {different[:5]}'
    first = _model_state(folder / 'ep0-ba1', tmp_path)
    assert any(not torch.equal(first[k], a[k]) for k in a if k.startswith('generator.')), 'the generator trained'


def test_fsdp2_cpu_offload_shards_every_unit_and_changes_no_weight(straight, tmp_path):
    plain_folder = straight('2')
    stdout = _train(tmp_path / 'offload', fsdp=FSDP + ', cpu_offload: true')
    model = build_model(load_config(REPO / 'yamls' / 'tiny_flux.yaml')['model'], seed=17)
    blocks = sum(len(getattr(getattr(model, net), kind)) for net in ('generator', 'fake_score', 'teacher')
                 for kind in ('transformer_blocks', 'single_transformer_blocks'))
    roots = 4  # generator, fake score, teacher and the discriminator heads; the small frozen networks stay unwrapped
    assert f'of {blocks + roots} sharded modules are kept in CPU memory' in stdout
    # FSDP2's own state after every step: each unit's param group has the CPU offload policy and each of its
    # parameters offload_to_cpu (so its shard is copied to the compute device for the all-gather, and the gradient
    # and the optimizer step stay on the CPU); the trained shards and the Adam moments are CPU tensors between steps.
    # (On these CPU processes a device check alone would prove nothing; on a GPU bench/gpu_step.py --cpu-offload
    # also asserts that compute ran on CUDA.) The same run without offload: no group offloads.
    reports, plain = _offload_reports(stdout), _offload_reports(straight.stdout['2'])
    assert len(reports) == len(plain) == 3
    for report in reports:
        assert report['fsdp_groups'] == blocks + roots == report['offloading_groups']
        assert report['fsdp_params'] == report['offloaded_params'] > 0
        assert set(report['shards']) == set(report['optimizer_state']) == {'cpu'}
        assert report['optimizer_state']['cpu'] == 2 * report['shards']['cpu']  # exp_avg, exp_avg_sq of each
        assert set(report['grads']) <= {'cpu'}
    for report in plain:
        assert report['fsdp_groups'] == blocks + roots and report['offloading_groups'] == report['offloaded_params'] == 0
    a = _model_state(plain_folder / 'ep0-ba3', tmp_path)
    b = _model_state(tmp_path / 'offload' / 'ep0-ba3', tmp_path)
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])]
