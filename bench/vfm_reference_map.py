"""Shapes-world comparison of the VFM heads' reference-image map: per location (the released code) vs pooled.

    nice python bench/vfm_reference_map.py [--batches 600] [--seeds 17,18] [--parallel 1] [override ...]

Full SenseFlow on ``yamls/shapes.yaml`` (the ``senseflow`` variant of ``bench/shapes_ablation.py``: same seeds, data,
optimizer and batches), once with ``algorithms.vfm_discriminator.reference_map=per_location`` and once with
``=pooled``. Runs go to ``runs/shapes_ablation/vfm_ref_<form>/seed<seed>`` (a run whose report exists is not rerun);
the student rows (FD-T, FD-R, attribute accuracy per seed) are written to
``bench/results/vfm_reference_map.{md,json}``. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parent))

import shapes_ablation as sa  # noqa: E402  (the sibling bench script: run_variant, teacher cache, row statistics)

FORMS = ('per_location', 'pooled')
LABELS = {'per_location': 'per location (released code)', 'pooled': 'pooled (one vector per sample)'}


def variant(form: str) -> str:
    """Register the full-SenseFlow variant with ``reference_map=form`` in the ablation's table; return its name."""
    name = f'vfm_ref_{form}'
    sa.VARIANTS[name] = [*sa.VARIANTS['senseflow'], f'algorithms.vfm_discriminator.reference_map={form}']
    sa.LABELS[name] = f'SenseFlow, reference map {LABELS[form]}'
    return name


def write_results(reports: dict[str, dict[int, dict]], batches: int, command: str) -> None:
    """``reports[form][seed]`` -> ``bench/results/vfm_reference_map.{md,json}``."""
    import numpy as np

    stats = {form: sa._student_stats(runs) for form, runs in reports.items()}
    seeds = sorted({s for runs in reports.values() for s in runs})
    first = next(iter(next(iter(reports.values())).values()))
    teacher = first['rows']['teacher 50-step Euler']
    lines = [f'# VFM reference-image map: per location vs pooled (shapes world, full SenseFlow, {batches} batches, '
             f'training seeds {seeds})', '',
             f'Command: `{command}`', '',
             f'Each row is `yamls/shapes.yaml` (the `senseflow` variant of bench/shapes_ablation.py) with '
             f'`algorithms.vfm_discriminator.reference_map` set; the student is the 4-step generator, evaluated on '
             f'{first["n"]} prompts. FD-T is against the teacher\'s 50-step samples (teacher noise floor '
             f'{teacher["fd_t"]:.3f}); lower FD is better, higher accuracy is better. One run at a time, one thread.',
             '', '| reference map | seed | FD-T | FD-R | acc single | acc two | acc all |', '|---|---|---|---|---|---|---|']
    keys = ('fd_t', 'fd_r', 'acc_single', 'acc_two', 'acc_all')
    for form, st in stats.items():
        for i, seed in enumerate(st['seeds']):
            lines.append(f'| {form} | {seed} | ' + ' | '.join(f'{st["per_seed"][k][i]:.3f}' for k in keys) + ' |')
        lines.append(f'| **{form}** | mean | ' + ' | '.join(f'**{st["mean"][k]:.3f}**' for k in keys) + ' |')
    if set(stats) == set(FORMS):
        # Seed noise: the spread between the two seeds of one form, next to the gap between the forms.
        lines += ['', '| metric | mean per_location - pooled | seed spread per_location | seed spread pooled |',
                  '|---|---|---|---|']
        within = []
        for k in keys:
            a, b = stats['per_location']['per_seed'][k], stats['pooled']['per_seed'][k]
            lines.append(f'| {k} | {np.mean(a) - np.mean(b):+.4f} | {np.ptp(a):.3f} | {np.ptp(b):.3f} |')
            within.append(abs(np.mean(a) - np.mean(b)) < max(np.ptp(a), np.ptp(b)))
        lines += ['', ('Every gap between the forms is smaller than the spread between the seeds of one form: no '
                       'difference beyond seed noise.') if all(within) else
                  'Some gaps exceed the seed spread: ' + ', '.join(k for k, w in zip(keys, within) if not w) + '.']
    sa.RESULTS.mkdir(parents=True, exist_ok=True)
    (sa.RESULTS / 'vfm_reference_map.md').write_text('\n'.join(lines) + '\n')
    (sa.RESULTS / 'vfm_reference_map.json').write_text(json.dumps(
        {'command': command, 'batches': batches, 'seeds': seeds, 'teacher_50_step': teacher,
         'students': {form: {'label': LABELS[form], **st} for form, st in stats.items()}}, indent=1, default=float))
    print('\n'.join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--batches', type=int, default=600)
    p.add_argument('--parallel', type=int, default=1, help='runs at a time (one thread each)')
    p.add_argument('--seeds', default='17,18', help='training seeds (comma-separated)')
    p.add_argument('--forms', default=','.join(FORMS), help=f'reference maps to run, from {list(FORMS)}')
    p.add_argument('overrides', nargs='*', help='extra dotted.key=value overrides for every run')
    a = p.parse_args(argv)
    forms = [f for f in a.forms.split(',') if f]
    if any(f not in FORMS for f in forms):
        p.error(f'--forms: choose from {list(FORMS)}, got {forms}')
    seeds = [int(x) for x in a.seeds.split(',') if x]
    sa.prefill_teacher_cache()
    names = {form: variant(form) for form in forms}
    with ThreadPoolExecutor(max_workers=a.parallel) as pool:
        # Seed-major order: both forms of seed 17 finish first, so a partial result already compares them.
        futures = {(f, s): pool.submit(sa.run_variant, names[f], s, a.batches, a.overrides) for s in seeds for f in forms}
        reports = {f: {s: futures[(f, s)].result() for s in seeds} for f in forms}
    write_results(reports, a.batches, 'nice python ' + ' '.join(sys.argv))
    return 0


if __name__ == '__main__':
    sys.exit(main())
