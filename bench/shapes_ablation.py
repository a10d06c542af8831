"""Shapes-world ablation: vanilla DMD, DMD + IDA, DMD + IDA + ISG and full SenseFlow from the shipped teacher, over
three training seeds, plus a stress regime (TTUR 1) with and without IDA.

    python bench/shapes_ablation.py [--batches 600] [--seeds 17,18,19] [--parallel 2] [--only senseflow,dmd] [override ...]

Every variant runs ``composer train.py yamls/shapes.yaml`` with the same seeds, data, optimizer and number of
batches; only ``algorithms:`` differs. The stress variants (``ttur1_*``) update the generator on every batch
(``model.gen_every=1``) for the same number of generator updates as the main recipe (``batches / 5`` batches), so
the fake score gets 5x fewer updates per generator step: the regime where the paper says IDA keeps the fake score
tracking the generator. Each run ends with the shapes report (FD-T against the teacher's 50-step samples, FD-R
against the renderer, attribute accuracy, shape by geometry, diversity), which this script collects into
``bench/results/shapes_ablation.{json,md}`` (mean and standard deviation over the seeds; differences between rows
that exceed twice the seed spread are marked) and ``bench/results/shapes_ablation_losses.png``. Runs go to
``runs/shapes_ablation/<variant>/seed<seed>``; a variant whose report exists is not rerun (delete the folder to rerun).
Each run uses one intra-op thread (OMP_NUM_THREADS=1), ``--parallel`` runs at a time. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / 'bench' / 'results'
RUNS = REPO / 'runs' / 'shapes_ablation'

_NO_VFM, _NO_ISG, _NO_IDA = 'algorithms.vfm_discriminator=null', 'algorithms.isg=null', 'algorithms.ida=null'
#: The stress regime: the generator steps on every batch (TTUR 1); its runs take ``batches / STRESS_TTUR_OF_MAIN``
#: batches, so that the generator gets as many updates as in the main recipe.
STRESS_TTUR_OF_MAIN = 5
VARIANTS = {
    'dmd': [_NO_IDA, _NO_ISG, _NO_VFM],
    'dmd_ida': [_NO_ISG, _NO_VFM],
    'dmd_ida_isg': [_NO_VFM],
    'senseflow': [],
    'ttur1_dmd': [_NO_IDA, _NO_ISG, _NO_VFM, 'model.gen_every=1'],
    'ttur1_dmd_ida': [_NO_ISG, _NO_VFM, 'model.gen_every=1'],
}
LABELS = {'dmd': 'vanilla DMD', 'dmd_ida': 'DMD + IDA', 'dmd_ida_isg': 'DMD + IDA + ISG',
          'senseflow': 'SenseFlow (DMD + IDA + ISG + VFM)', 'ttur1_dmd': 'stress, TTUR 1: vanilla DMD',
          'ttur1_dmd_ida': 'stress, TTUR 1: DMD + IDA'}
#: Row pairs whose differences are tested against the seed spread: each ingredient added, the whole method, and IDA
#: in the stress regime.
COMPARISONS = [('dmd', 'dmd_ida'), ('dmd_ida', 'dmd_ida_isg'), ('dmd_ida_isg', 'senseflow'), ('dmd', 'senseflow'),
               ('ttur1_dmd', 'ttur1_dmd_ida')]
#: Metric key -> (column title, True when lower is better).
METRICS = {'fd_t': ('FD-T', True), 'fd_r': ('FD-R', True), 'acc_single': ('acc single', False),
           'acc_two': ('acc two', False), 'relation': ('relation', False), 'geometry_single': ('geometry single', False),
           'geometry_two': ('geometry two', False), 'diversity_ratio': ('diversity (x teacher)', False)}


def batches_of(name: str, batches: int) -> int:
    """Batches a variant trains for: the stress runs keep the main recipe's number of generator updates."""
    return batches // STRESS_TTUR_OF_MAIN if name.startswith('ttur1_') else batches


def run_variant(name: str, seed: int, batches: int, extra: list[str]) -> dict:
    folder = RUNS / name / f'seed{seed}'
    report = folder / 'shapes_report' / 'report.json'
    tag = f'{name} seed {seed}'
    if report.exists():
        print(f'[{tag}] report exists, not rerun', flush=True)
        return json.loads(report.read_text())
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    cmd = [shutil.which('composer') or 'composer', 'train.py', 'yamls/shapes.yaml', f'seed={seed}',
           f'run_name=shapes_ablation_{name}_s{seed}', f'trainer.max_duration={batches_of(name, batches)}ba',
           'trainer.progress_bar=false',
           f'callbacks.shapes_report.folder={folder / "shapes_report"}',
           f'callbacks.export_pipeline.folder={folder / "export"}', *VARIANTS[name], *extra]
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    t = time.time()
    print(f'[{tag}] {" ".join(cmd[1:])}', flush=True)
    with open(folder / 'train.log', 'w') as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f'{tag} failed ({proc.returncode}); see {folder / "train.log"}')
    print(f'[{tag}] done in {(time.time() - t) / 60:.1f} min', flush=True)
    return json.loads(report.read_text())


def prefill_teacher_cache(num_prompts: int = 512, cache: str = 'runs/shapes_cache') -> None:
    """Sample the teacher's 50-step reference sets (FD-T's two noise seeds and the diversity score's seeds) once: the
    runs' report callbacks then read them from the cache instead of each sampling them."""
    import torch

    from senseflow_algos.shapes import components as C
    from senseflow_algos.shapes.report import (
        DIVERSITY_PROMPTS,
        DIVERSITY_SEED,
        DIVERSITY_SEEDS,
        TeacherSampler,
        cached_teacher_images,
        fingerprint,
        prompt_suite,
        teacher_cache_path,
    )

    torch.set_num_threads(1)
    pipe = C.load_teacher()
    key, prompts = fingerprint(pipe.transformer), prompt_suite(num_prompts)
    sampler = TeacherSampler.from_pipeline(pipe)
    few = prompt_suite(DIVERSITY_PROMPTS)
    sets = [(prompts, seed) for seed in (0, 1)] + [(few, DIVERSITY_SEED + s) for s in range(DIVERSITY_SEEDS)]
    for chosen, seed in sets:
        path = teacher_cache_path(REPO / cache, key, C.DEFAULT_STEPS, C.DEFAULT_GUIDANCE, len(chosen), seed)
        if not path.exists():
            t = time.time()
            cached_teacher_images(sampler, chosen, C.DEFAULT_STEPS, C.DEFAULT_GUIDANCE, seed, path)
            print(f'teacher reference, {len(chosen)} prompts, seed {seed}: {time.time() - t:.0f}s -> {path}', flush=True)


def _fmt(v, digits=3):
    return f'{v:.{digits}f}' if isinstance(v, (int, float)) and not math.isnan(v) else '-'


def row_metrics(row: dict) -> dict[str, float]:
    """A report row's values of :data:`METRICS` (NaN where the run did not measure one)."""
    acc, geometry = row['acc'], row.get('geometry', {})
    return {'fd_t': row['fd_t'], 'fd_r': row['fd_r'], 'acc_single': acc['single']['prompt'],
            'acc_two': acc['two']['prompt'], 'relation': acc['two']['relation'],
            'geometry_single': geometry.get('single', float('nan')), 'geometry_two': geometry.get('two', float('nan')),
            'diversity_ratio': row.get('diversity_ratio', float('nan'))}


def seed_stats(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (``n - 1``; NaN for one seed)."""
    return {'mean': statistics.fmean(values), 'std': statistics.stdev(values) if len(values) > 1 else float('nan')}


def compare(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Difference of means ``b - a``, the seed spread (the two rows' standard deviations pooled: ``sqrt((sa^2 +
    sb^2) / 2)``) and whether the difference exceeds twice that spread."""
    diff = b['mean'] - a['mean']
    spread = math.sqrt((a['std']**2 + b['std']**2) / 2)
    return {'diff': diff, 'spread': spread, 'beyond_2x_spread': bool(abs(diff) > 2 * spread)}


def _student_stats(runs: dict[int, dict]) -> dict:
    """Per-seed values, mean and std of a variant's student row, and its training wall time."""
    per_seed = {}
    for seed, rep in runs.items():
        student = next(k for k in rep['rows'] if k.startswith('student'))
        per_seed[seed] = {**row_metrics(rep['rows'][student]), 'train_wall_s': rep.get('train_wall_s', float('nan'))}
    keys = [*METRICS, 'train_wall_s']
    return {'seeds': list(per_seed), 'per_seed': {k: [v[k] for v in per_seed.values()] for k in keys},
            'stats': {k: seed_stats([v[k] for v in per_seed.values()]) for k in keys}}


def write_results(reports: dict[str, dict[int, dict]], batches: int, command: str = '') -> None:
    """``reports[variant][seed]`` -> ``bench/results/shapes_ablation.{md,json}`` and the loss-curve PNG."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    first = next(iter(next(iter(reports.values())).values()))
    teacher = {k: row_metrics(v) for k, v in first['rows'].items() if k.startswith('teacher')}
    seeds = sorted({s for runs in reports.values() for s in runs})
    stats = {name: _student_stats(runs) for name, runs in reports.items()}
    header = '| method | ' + ' | '.join(t for t, _ in METRICS.values()) + ' | train wall (min) |'
    lines = [f'# Shapes-world ablation ({batches} batches of {first.get("global_batch_size") or 16} each, training seeds '
             f'{seeds}, {first["n"]} prompts, FD-T vs the teacher\'s 50-step samples at guidance '
             f'{first["guidance"]:g})', '',
             f'Command: `{command}`', '',
             'Teacher rows: its 50-step samples from other noise (the FD-T noise floor) and 4-step Euler. Student rows: '
             'the 4-step generator, mean +- sample standard deviation over the training seeds. Stress rows: TTUR 1 '
             f'(`model.gen_every=1`) for {batches // STRESS_TTUR_OF_MAIN} batches, the same number of generator '
             'updates as the main rows with 5x fewer fake-score updates per generator step. Two runs at a time on 2 '
             'cores, one thread each: wall times depend on which run shared the machine.', '',
             header, '|---' * (len(METRICS) + 2) + '|']
    for name, row in teacher.items():
        lines.append(f'| {name} | ' + ' | '.join(_fmt(row[k]) for k in METRICS) + ' | - |')
    for name, st in stats.items():
        cells = [f'{_fmt(st["stats"][k]["mean"])} +- {_fmt(st["stats"][k]["std"])}' for k in METRICS]
        wall = st['stats']['train_wall_s']['mean'] / 60
        lines.append(f'| {LABELS[name]} | ' + ' | '.join(cells) + f' | {_fmt(wall, 1)} |')
    comparisons = {}
    pairs = [(a, b) for a, b in COMPARISONS if a in stats and b in stats]
    if pairs:
        lines += ['', '## Differences between rows (later minus earlier; **bold**: beyond twice the seed spread, '
                  'the spread being the two rows\' standard deviations pooled)', '',
                  '| comparison | ' + ' | '.join(t for t, _ in METRICS.values()) + ' |', '|---' * (len(METRICS) + 1) + '|']
        for a, b in pairs:
            got = {k: compare(stats[a]['stats'][k], stats[b]['stats'][k]) for k in METRICS}
            comparisons[f'{a} -> {b}'] = got

            def cell(c, lower_better):
                text = f'{c["diff"]:+.3f} (2s {2 * c["spread"]:.3f})' if not math.isnan(c['diff']) else '-'
                if c['beyond_2x_spread']:
                    better = (c['diff'] < 0) == lower_better
                    return f'**{text} {"better" if better else "worse"}**'
                return text

            lines.append(f'| {LABELS[a]} -> {LABELS[b]} | ' +
                         ' | '.join(cell(got[k], METRICS[k][1]) for k in METRICS) + ' |')
    (RESULTS / 'shapes_ablation.md').write_text('\n'.join(lines) + '\n')
    (RESULTS / 'shapes_ablation.json').write_text(json.dumps(
        {'command': command, 'batches': batches, 'seeds': seeds, 'teacher': teacher,
         'students': {n: {'label': LABELS[n], **st} for n, st in stats.items()}, 'comparisons': comparisons},
        indent=1, default=float))
    _plot_losses(reports)
    print('\n'.join(lines))


def _plot_losses(reports: dict[str, dict[int, dict]]) -> None:
    """Loss curves of every variant (first training seed), smoothed over 1/25 of the run."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np

    keys = ['loss/train/generator/dmd', 'loss/train/fake_score/flow_matching', 'loss/train/generator/isg',
            'loss/train/generator/adversarial']
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6))
    for name, runs in reports.items():
        seed = min(runs)
        hist = json.loads((RUNS / name / f'seed{seed}' / 'shapes_report' / 'losses.json').read_text())
        for ax, key in zip(axes, keys):
            pts = [(h['batch'], h[key]) for h in hist if key in h]
            if not pts:
                continue
            x, y = map(np.array, zip(*pts))
            w = max(1, len(y) // 25)
            smooth = np.convolve(y, np.ones(w) / w, mode='valid')
            ax.plot(x[w - 1:], smooth, label=f'{LABELS[name]} (seed {seed})', color=f'C{list(VARIANTS).index(name)}')
    for ax, key in zip(axes, keys):
        ax.set_title(key.replace('loss/train/', ''))
        ax.set_xlabel('batch')
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / 'shapes_ablation_losses.png', dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--batches', type=int, default=600, help='batches per run (600: the main job\'s budget)')
    p.add_argument('--parallel', type=int, default=2)
    p.add_argument('--only', default=','.join(VARIANTS))
    p.add_argument('--seeds', default='17,18,19', help='training seeds (comma-separated); 17 is yamls/shapes.yaml\'s')
    p.add_argument('--prompts', type=int, default=512, help='prompts of each run\'s shapes report (the demo\'s: 512)')
    p.add_argument('overrides', nargs='*', help='extra dotted.key=value overrides for every run')
    a = p.parse_args(argv)
    names = [n for n in a.only.split(',') if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f'--only: unknown variant(s) {unknown}; choose from {list(VARIANTS)}')
    prefill_teacher_cache(a.prompts)
    seeds = [int(x) for x in a.seeds.split(',') if x]
    extra = [f'callbacks.shapes_report.num_prompts={a.prompts}', *a.overrides]
    with ThreadPoolExecutor(max_workers=a.parallel) as pool:
        futures = {(n, s): pool.submit(run_variant, n, s, a.batches, extra) for s in seeds for n in names}
        reports = {n: {s: futures[(n, s)].result() for s in seeds} for n in names}
    write_results(reports, a.batches, 'python ' + ' '.join(sys.argv))
    return 0


if __name__ == '__main__':
    sys.exit(main())
