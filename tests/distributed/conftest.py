"""One sharded training run per FSDP version, shared by the distributed tests that only read it (sharded resume,
CPU offload comparison, export from shards, the export callback under FSDP): each costs two training processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# As yamls/flux.yaml sets it (FSDP2 ignores the FSDP1-only keys with a warning).
FSDP = ('state_dict_type: sharded, sharding_strategy: FULL_SHARD, use_orig_params: true, '
        'activation_checkpointing: true, activation_checkpointing_reentrant: false')
ENTRY = {'2': 'tests/distributed/fsdp2_offload_probe.py', '1': 'tests/distributed/fsdp1_cpu_train.py'}
#: Batches of the shared run; it checkpoints after every one.
BATCHES = 3


def train_fsdp(folder: Path, *overrides: str, version: str = '2', fsdp: str = FSDP) -> str:
    """Train tiny FLUX (full SenseFlow) for :data:`BATCHES` batches on 2 gloo processes; returns rank 0's stdout."""
    env = {**os.environ, 'FSDP_VERSION': version, 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'composer.cli.launcher', '-n', '2', ENTRY[version], 'yamls/tiny_flux.yaml',
           f'trainer.max_duration={BATCHES}ba', 'model.gen_every=2', 'trainer.progress_bar=false',
           'trainer.save_interval=1ba', f'trainer.save_folder={folder}',
           f'trainer.parallelism_config={{fsdp: {{{fsdp}}}}}', *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.fixture(scope='session')
def straight(tmp_path_factory):
    """``straight(version)`` -> the run folder of an uninterrupted run with sharded checkpoints after every batch and
    the ``export_pipeline`` callback (its pipeline in ``<folder>/export``), trained once per version;
    ``straight.stdout[version]`` holds rank 0's output."""
    runs, stdouts = {}, {}

    def run(version: str) -> Path:
        if version not in runs:
            runs[version] = tmp_path_factory.mktemp(f'fsdp{version}') / 'straight'
            stdouts[version] = train_fsdp(runs[version], 'callbacks.export_pipeline={}', version=version)
        return runs[version]
    run.stdout = stdouts
    return run
