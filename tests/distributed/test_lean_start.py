"""The lean start on gloo CPU processes under Composer's FSDP1 and FSDP2, for FLUX (and SD 3.5, slow) loaded from
saved pipeline folders: every rank but rank 0 builds the teacher, generator and fake score on the meta device, rank 0
loads them, and every parameter and buffer of the model (frozen networks, SD3's ``pos_embed``, non-persistent buffers,
the VFM backbone and heads, ``batches_seen``) equals the old start's, on every rank, right after wrapping and after a
training batch, with full sharding and (slow) with hybrid sharding on 2 x 2 ranks. The teacher, the VAE and CLIP also
equal the tensors in the folder's safetensors files, and SD3's ``pos_embed`` the one diffusers computes when it loads
the transformer itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from senseflow_algos.models.tiny import save_tiny_pipeline

REPO = Path(__file__).resolve().parents[2]
FSDP = ('use_orig_params: true, activation_checkpointing: true, activation_checkpointing_reentrant: false, '
        'state_dict_type: sharded')
# Teacher and encoders in bf16, the trained networks in fp32 (as the production configs): the meta build must match
# the loaded dtypes. ISG and IDA only add compute here; the VFM discriminator stays (frozen backbone, wrapped heads).
COMMON = ('model.tiny=false', 'trainer.max_duration=1ba', 'model.gen_every=1', 'trainer.progress_bar=false',
          'model.teacher_dtype=bf16', 'model.encoder_dtype=bf16', 'algorithms.isg=null', 'algorithms.ida=null')
YAMLS = {'flux': 'tiny_flux.yaml', 'sd35': 'tiny_sd35.yaml'}
# (family, processes, FSDP sharding): FULL_SHARD on 2 ranks; hybrid sharding as the 64-GPU run files, 2 "nodes" of 2
# ranks, where torch's FSDP1 syncs buffers within each node only (from a meta-device rank on the second node).
SETUPS = [
    ('flux', 2, 'sharding_strategy: FULL_SHARD'),
    pytest.param(('sd35', 2, 'sharding_strategy: FULL_SHARD'), marks=pytest.mark.slow, id='sd35'),
    pytest.param(('sd35', 4, 'sharding_strategy: HYBRID_SHARD, data_parallel_replicate_degree: 2'),
                 marks=pytest.mark.slow, id='sd35-hybrid'),
]


@pytest.fixture(scope='module', params=SETUPS, ids=lambda setup: setup[0] if isinstance(setup, tuple) else None)
def runs(request, tmp_path_factory):
    """One family and sharding, both FSDP versions, old and lean start: one launch (FLUX on 2 processes: about 1 min on
    2 idle cores). SD 3.5, whose transformer has a buffer (``pos_embed``), is the slow check."""
    family, processes, sharding = request.param
    root = tmp_path_factory.mktemp(f'lean-{family}')
    folder = save_tiny_pipeline(family, root / 'pipeline', seed=11)
    out = root / 'out'
    out.mkdir()
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    env.pop('FSDP_VERSION', None)
    cmd = [sys.executable, '-m', 'composer.cli.launcher', '-n', str(processes),
           'tests/distributed/lean_start_worker.py', str(out), family, f'yamls/{YAMLS[family]}',
           f'model.pretrained={folder}', f'dataset.global_batch_size={processes}', *COMMON,
           f'trainer.parallelism_config={{fsdp: {{{sharding}, {FSDP}}}}}']
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert 'lean start: global rank 0 loads the teacher, generator and fake score' in proc.stdout
    assert 'setting trainer.parallelism_config.fsdp.sync_module_states=true' in proc.stdout  # FSDP1
    return family, processes, root


def _load(root: Path, family: str, version: str, start: str, rank: int) -> dict:
    return torch.load(root / 'out' / f'{family}-fsdp{version}-{start}-rank{rank}.pt', weights_only=False)


def _different(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]


@pytest.mark.parametrize('version', ['1', '2'])
def test_lean_start_equals_old_start(runs, version):
    family, processes, root = runs
    for rank in range(processes):
        old, lean = _load(root, family, version, 'old', rank), _load(root, family, version, 'lean', rank)
        assert set(old['built_on_meta'].values()) == {False}
        assert set(lean['built_on_meta'].values()) == {rank > 0}, (rank, lean['built_on_meta'])
        for stage in ('wrapped', 'trained'):
            different = _different(old[stage], lean[stage])
            assert not different, f'rank {rank}, {stage}: {different[:5]}'
        state = lean['wrapped']
        networks = {k.split('.')[0] for k in state}
        assert {'teacher', 'generator', 'fake_score', 'vae', 'conditioner', 'vfm_backbone', 'discriminator'} <= networks
        assert any(k.startswith('buffer:vfm_backbone.') for k in state) and 'buffer:batches_seen' in state
        for net in ('generator', 'fake_score'):
            assert any(not torch.equal(state[k], lean['trained'][k]) for k in state if k.startswith(f'{net}.')), net


@pytest.mark.parametrize('version', ['1', '2'])
def test_lean_start_weights_are_the_saved_pipeline(runs, version):
    """Independent of our loaders: the folder's own files, read with safetensors, cast to the configured dtypes."""
    family, processes, root = runs
    folder = root / 'pipeline'
    for rank in range(processes):
        state = _load(root, family, version, 'lean', rank)['wrapped']
        teacher = load_file(folder / 'transformer' / 'diffusion_pytorch_model.safetensors')
        vae = load_file(folder / 'vae' / 'diffusion_pytorch_model.safetensors')
        clip = load_file(folder / 'text_encoder' / 'model.safetensors')
        for prefix, files in (('teacher', teacher), ('vae', vae), ('conditioner.text_encoder', clip)):
            for key, value in files.items():
                got = state[f'{prefix}.{key}']
                assert got.dtype == torch.bfloat16 and torch.equal(got, value.to(torch.bfloat16)), f'{prefix}.{key}'
        if family == 'sd35':  # a buffer: diffusers computes it at construction
            from diffusers import SD3Transformer2DModel

            reference = SD3Transformer2DModel.from_pretrained(folder, subfolder='transformer',
                                                              torch_dtype=torch.bfloat16)
            for net in ('teacher', 'generator', 'fake_score'):
                got = state[f'buffer:{net}.pos_embed.pos_embed']
                assert torch.equal(got.float(), reference.pos_embed.pos_embed.float()), net
