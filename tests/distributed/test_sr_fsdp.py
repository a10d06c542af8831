"""Stochastic-rounding AdamW on sharded bf16 weights (2 CPU processes, gloo): FSDP2 DTensors and FSDP1
``use_orig_params`` views are updated in place, keep fp32 moments, and take the fp64 AdamW update in expectation."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name('sr_fsdp_worker.py')
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


# FSDP1 in CI; FSDP2 in `make test-slow`.
@pytest.mark.parametrize('version', [pytest.param('fsdp2', marks=pytest.mark.slow, id='fsdp2'), 'fsdp1'])
def test_sharded_bf16_weights_take_the_fp64_update(version):
    env = {**os.environ, 'PYTHONPATH': str(REPO), 'OMP_NUM_THREADS': '1'}
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port',
                           str(_free_port()), str(WORKER), version], capture_output=True, text=True, timeout=300,
                          env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    match = re.search(r'sharded=(\w+) held=(\d+) bf16=(\w+) moments_fp32=(\w+) moved=(\S+) taken=(\S+)', proc.stdout)
    assert match, proc.stdout
    assert match[1] == 'True' and int(match[2]) == 2  # each rank holds a piece of both units, not the whole
    assert match[3] == 'True' and match[4] == 'True'
    # As unsharded (tests/test_master_weights.py): the full update in expectation; plain bf16 takes about 0.1 of it.
    assert abs(float(match[6]) - 1) < 0.03
    assert float(match[5]) > 0.5
