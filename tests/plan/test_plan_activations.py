"""The planner's activation estimate (bytes autograd saves, measured on meta tensors with flash-style attention) against
the activation memory real passes take on the CPU.

The measured quantity is the peak increase of the resident memory of a fresh process (``VmHWM``, reset before the
pass) over the forward and loss, with glibc's mmap threshold fixed so that freed tensors leave resident memory at
once: at the end of the forward every tensor saved for backward is alive at the same time, which is the activation
term of the per-GPU peak; the peak also catches temporaries, so the estimate may only be below it by those. With
checkpointing the peak moves into the backward (a checkpointed block recomputes its internals there), so the
checkpointed VAE decode is measured over forward and backward (frozen weights: no parameter gradient is allocated).
CPU attention runs a flash kernel that saves what GPU flash attention saves (q, k, v, output, log-sum-exp).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from senseflow_algos.plan.memory import activation_peak
from senseflow_algos.plan.metarun import measure_pass
from senseflow_algos.plan.passes import _decoder_units
from tests.plan import activation_probe as probe

REPO = Path(__file__).resolve().parents[2]


def _estimate(build, run, grad_input: bool, units=None, checkpointed=False) -> int:
    net, shape = build('meta')
    x = probe.inputs(shape, lambda *s: torch.empty(*s, device='meta'))
    x['latents'].requires_grad_(grad_input)
    cost = measure_pass(lambda: run(net, x), checkpointed, [*net.parameters(), *net.buffers()],
                        units(net) if units else ())
    return activation_peak([(cost, checkpointed, 1)])


def test_activation_estimate_within_25_percent_of_measured_peak():
    env = {**os.environ, 'MALLOC_MMAP_THRESHOLD_': '65536', 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(REPO)}
    proc = subprocess.run([sys.executable, str(Path(probe.__file__))], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    estimates = {
        'transformer': _estimate(probe.transformer, probe.generator_step, False),
        'vae_decode': _estimate(probe.vae, probe.decode, True),
        'vae_decode_checkpointed': _estimate(probe.vae, probe.decode, True, _decoder_units, checkpointed=True),
    }
    for name, estimate in estimates.items():
        error = (estimate - measured[name]) / measured[name]
        print(f'{name}: estimate {estimate / 2**20:.1f} MiB, measured peak {measured[name] / 2**20:.1f} MiB '
              f'({error:+.1%})')
        assert measured[name] > 50 * 2**20, 'the probe must be large enough to stand out of allocator noise'
        assert abs(error) < 0.25, name
    # Checkpointing is what the estimate says it is: the decoder keeps far less than without it.
    assert estimates['vae_decode_checkpointed'] < 0.7 * estimates['vae_decode']
