"""Compiled transformer blocks (``model.compile_blocks: true``) against eager on the CPU.

The same tiny FLUX run (``yamls/tiny_flux.yaml``: IDA, ISG and the VFM discriminator on) trains ``--batches`` batches
eagerly, then again with every transformer block of generator, fake score and teacher compiled (inductor), in one
process and from the same seed. Reported: each batch's logged losses both ways, their max absolute and relative
difference, each batch's wall time, the compile overhead (the compiled run's extra time over its first ``--warmup``
batches, where dynamo traces and inductor builds the C++ kernels) and the steady-state step time both ways (median
of the batches after the warm-up).

    python bench/compile_check.py [--batches 10] [--warmup 5] [--threads 1] [--warm-cache]

Inductor's kernel cache starts empty (a fresh ``TORCHINDUCTOR_CACHE_DIR``), so the compile time is a cold start's,
unless ``--warm-cache`` keeps the user's cache.

Writes ``bench/results/compile_check.md`` and ``bench/results/compile_check.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: Loss tolerance of compiled vs eager (tests/test_compile_blocks.py uses the same): inductor fuses and reorders float
#: reductions (layer norms, attention softmax, matmul epilogues), so fp32 losses agree to rounding, not bit for bit.
#: A few batches of training compound the differences through the weight updates; 1e-4 relative (plus 1e-6 absolute
#: for losses near zero) is ~1000x fp32 epsilon and far below any difference a wrong graph would give.
RTOL, ATOL = 1e-4, 1e-6


def run(batches: int, compile_blocks: bool) -> dict[str, Any]:
    """Train the tiny config ``batches`` batches; per-batch losses (name -> value) and wall seconds."""
    from composer.core import Callback

    from senseflow_algos.builders import build_trainer
    from senseflow_algos.config import load_config, validate_config

    class _Record(Callback):

        def __init__(self):
            self.losses, self.seconds, self._t = [], [], 0.0

        def batch_start(self, state, logger):
            self._t = time.perf_counter()

        def batch_end(self, state, logger):
            self.seconds.append(time.perf_counter() - self._t)
            self.losses.append({k: float(v) for k, v in sorted(state.total_loss_dict.items())})

    path = REPO / 'yamls' / 'tiny_flux.yaml'
    cfg = load_config(path, ['trainer.progress_bar=false', f'trainer.max_duration={batches}ba',
                             f'model.compile_blocks={str(compile_blocks).lower()}'])
    validate_config(cfg, source=str(path))
    torch._dynamo.reset()
    trainer = build_trainer(cfg)
    record = _Record()
    trainer.state.callbacks.append(record)
    trainer.fit()
    trainer.close()
    return {'losses': record.losses, 'seconds': record.seconds}


def differences(eager: list[dict[str, float]], compiled: list[dict[str, float]]) -> tuple[float, float]:
    """Max absolute and max relative difference over every logged loss of every batch."""
    abs_d, rel_d = 0.0, 0.0
    for a, b in zip(eager, compiled, strict=True):
        assert a.keys() == b.keys(), (a.keys(), b.keys())
        for k in a:
            d = abs(a[k] - b[k])
            abs_d, rel_d = max(abs_d, d), max(rel_d, d / max(abs(a[k]), 1e-12))
    return abs_d, rel_d


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--batches', type=int, default=10)
    p.add_argument('--warmup', type=int, default=5, help='batches counted as compile warm-up (both phases compiled)')
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--warm-cache', action='store_true', help="keep inductor's on-disk cache (default: a fresh one)")
    args = p.parse_args()
    if not args.warm_cache:  # read by inductor at each compile: set before the first one
        os.environ['TORCHINDUCTOR_CACHE_DIR'] = tempfile.mkdtemp(prefix='compile_check_inductor_')
    torch.set_num_threads(args.threads)
    eager = run(args.batches, compile_blocks=False)
    compiled = run(args.batches, compile_blocks=True)
    abs_d, rel_d = differences(eager['losses'], compiled['losses'])
    w = args.warmup
    compile_s = sum(compiled['seconds'][:w]) - sum(eager['seconds'][:w])
    steady = {k: statistics.median(r['seconds'][w:]) for k, r in (('eager', eager), ('compiled', compiled))}
    import composer
    import diffusers
    versions = {'python': platform.python_version(), 'torch': torch.__version__, 'composer': composer.__version__,
                'diffusers': diffusers.__version__, 'cpu': platform.processor() or platform.machine(),
                'threads': args.threads}
    command = (f'python bench/compile_check.py --batches {args.batches} --warmup {w} --threads {args.threads}'
               + (' --warm-cache' if args.warm_cache else ''))
    result = {'command': command, 'versions': versions, 'rtol': RTOL, 'atol': ATOL, 'eager': eager,
              'compiled': compiled, 'max_abs_diff': abs_d, 'max_rel_diff': rel_d,
              'within_tolerance': all(abs(a[k] - b[k]) <= ATOL + RTOL * abs(a[k])
                                      for a, b in zip(eager['losses'], compiled['losses']) for k in a),
              'inductor_cache': 'warm (user cache)' if args.warm_cache else 'cold (fresh cache dir)',
              'compile_overhead_s': compile_s, 'steady_step_s': steady}
    out = REPO / 'bench' / 'results'
    out.mkdir(parents=True, exist_ok=True)
    (out / 'compile_check.json').write_text(json.dumps(result, indent=1) + '\n')
    names = list(eager['losses'][0])
    lines = [
        '# Compiled transformer blocks vs eager (CPU, tiny FLUX, all algorithms)', '',
        f'Command: `{command}`', '',
        'Versions: ' + ', '.join(f'{k} {v}' for k, v in versions.items()), '',
        f'Max loss difference over {args.batches} batches: absolute {abs_d:.3g}, relative {rel_d:.3g} '
        f'(tolerance: rtol {RTOL:g}, atol {ATOL:g}; within: {result["within_tolerance"]}).', '',
        f'Compile overhead (compiled minus eager wall time of the first {w} batches, {result["inductor_cache"]} inductor cache): {compile_s:.1f} s. '
        f'Steady-state step (median of batches {w + 1}-{args.batches}): eager {steady["eager"]:.3f} s, compiled '
        f'{steady["compiled"]:.3f} s ({steady["eager"] / steady["compiled"]:.2f}x).', '',
        '| batch | ' + ' | '.join(f'{n} eager | {n} compiled' for n in names) + ' | s eager | s compiled |',
        '|---' * (2 * len(names) + 3) + '|',
    ]
    for i, (a, b) in enumerate(zip(eager['losses'], compiled['losses'])):
        cells = ' | '.join(f'{a.get(n, float("nan")):.6g} | {b.get(n, float("nan")):.6g}' for n in names)
        lines.append(f'| {i + 1} | {cells} | {eager["seconds"][i]:.2f} | {compiled["seconds"][i]:.2f} |')
    (out / 'compile_check.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
