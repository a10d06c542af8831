"""IDA under FSDP2 (2 CPU processes, gloo): the shard-local lerp equals the full-parameter formula."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name('ida_fsdp_worker.py')
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def test_ida_shard_local_matches_full_formula():
    env = {**os.environ, 'PYTHONPATH': str(REPO), 'OMP_NUM_THREADS': '1'}
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port',
                           str(_free_port()), str(WORKER)], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    match = re.search(r'IDA_FSDP params=(\d+) changed=(\d+) max_abs_err=(\S+)', proc.stdout)
    assert match, proc.stdout
    params, changed, err = int(match[1]), int(match[2]), float(match[3])
    assert changed > params // 2  # every rank holds a shard of most tensors
    assert err < 1e-6
