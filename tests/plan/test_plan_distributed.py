"""The planner's per-rank bytes of weights, gradients and optimizer state equal what Composer's FSDP really allocates
on 2 CPU processes (gloo), under FSDP2 and FSDP1, on every rank.

The tiny FLUX config is made to exercise the allocation rules: LoRA of rank 3 (only adapters train: FSDP1 still
allocates each unit's whole flat gradient, FSDP2 only the adapters'; rank-3 adapters split unevenly) and
discriminator heads of width 15 and conditioning width 7 (odd sizes: FSDP1's per-parameter alignment and FSDP2's
uneven dim-0 chunks pad). The worker (tests/distributed/plan_memory_worker.py) reads the allocated storages after
each phase's backward and after training.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from senseflow_algos.config import load_config
from senseflow_algos.plan.networks import build_meta_model
from senseflow_algos.plan.settings import read_run_settings
from senseflow_algos.plan.sharding import network_memory, resolve_sharding

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / 'tests' / 'distributed' / 'plan_memory_worker.py'
OVERRIDES = [
    'trainer.max_duration=1ba', 'trainer.progress_bar=false', 'callbacks=null', 'model.lora={rank: 3}',
    'algorithms.vfm_discriminator.hidden_channels=15', 'algorithms.vfm_discriminator.cmap_dim=7',
    'trainer.parallelism_config={fsdp: {state_dict_type: sharded, sharding_strategy: FULL_SHARD, use_orig_params: '
    'true, activation_checkpointing: true, activation_checkpointing_reentrant: false}}',
]
SHARDED = ('teacher', 'generator', 'fake_score', 'discriminator')


@pytest.fixture(scope='module')
def allocated(tmp_path_factory):
    out = tmp_path_factory.mktemp('plan_memory') / 'alloc'
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    proc = subprocess.run([sys.executable, '-m', 'composer.cli.launcher', '-n', '2', str(WORKER), str(out),
                           'yamls/tiny_flux.yaml', *OVERRIDES], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return {(v, r): json.loads(Path(f'{out}.fsdp{v}.rank{r}.json').read_text()) for v in (1, 2) for r in (0, 1)}


@pytest.mark.parametrize('version', [1, 2])
def test_planned_per_rank_bytes_equal_allocated(allocated, version):
    settings = read_run_settings(load_config(REPO / 'yamls' / 'tiny_flux.yaml', OVERRIDES))
    meta = build_meta_model(settings)
    sharding = resolve_sharding(settings, world=2, gpus_per_node=8, version=version)
    for rank in (0, 1):
        real = allocated[(version, rank)]
        for name in SHARDED:
            planned = network_memory(meta.network(name), sharding, rank, settings)
            assert planned.params == real['params'][name], (name, rank)
            assert planned.optimizer == real['optimizer'].get(name, 0), (name, rank)
            phase = 'generator' if name == 'generator' else 'critic'
            if name != 'teacher':
                assert planned.grads == real['grads'][phase][name], (name, rank)
        # A phase's gradients drop before the next phase's backward, except FSDP1's flat gradient of the generator,
        # which is freed at its next forward (not in the critic phase of a generator batch).
        lingering = real['grads']['critic']['generator']
        generator = network_memory(meta.network('generator'), sharding, rank, settings).grads
        assert lingering == (generator if version == 1 else 0)


def test_allocation_rules_are_not_the_naive_split(allocated):
    """The run exercises padding and FSDP1's whole-unit LoRA gradient: parameters / 2 would be wrong."""
    settings = read_run_settings(load_config(REPO / 'yamls' / 'tiny_flux.yaml', OVERRIDES))
    meta = build_meta_model(settings)
    heads = meta.network('discriminator')
    naive = sum(p.numel() * p.element_size() for p in heads.module.parameters()) // 2
    assert allocated[(1, 0)]['params']['discriminator'] != naive != allocated[(2, 0)]['params']['discriminator']
    generator = meta.network('generator')
    adapters = sum(p.numel() * p.element_size() for p in generator.module.parameters() if p.requires_grad)
    fsdp1, fsdp2 = (allocated[(v, 0)]['grads']['generator']['generator'] for v in (1, 2))
    assert fsdp2 < adapters < fsdp1  # FSDP2: a padded half of the adapters; FSDP1: half of every flat parameter
