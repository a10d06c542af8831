"""Shapes-world ablation: vanilla DMD, DMD + IDA, DMD + IDA + ISG and full SenseFlow from the shipped teacher.

    python bench/shapes_ablation.py [--batches 600] [--seeds 17,18] [--parallel 2] [--only senseflow,dmd] [override ...]

Every variant runs ``composer train.py yamls/shapes.yaml`` with the same seeds, data, optimizer and number of
batches; only ``algorithms:`` differs. Each run ends with the shapes report (FD-T against the teacher's 50-step
samples, attribute accuracy, seconds per image), which this script collects into
``bench/results/shapes_ablation.{json,md}`` and ``bench/results/shapes_ablation_losses.png``. Runs go to
``runs/shapes_ablation/<variant>/seed<seed>``; a variant whose report exists is not rerun (delete the folder to rerun).
Each run uses one intra-op thread (OMP_NUM_THREADS=1), ``--parallel`` runs at a time. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / 'bench' / 'results'
RUNS = REPO / 'runs' / 'shapes_ablation'

VARIANTS = {
    'dmd': ['algorithms.ida=null', 'algorithms.isg=null', 'algorithms.vfm_discriminator=null'],
    'dmd_ida': ['algorithms.isg=null', 'algorithms.vfm_discriminator=null'],
    'dmd_ida_isg': ['algorithms.vfm_discriminator=null'],
    'senseflow': [],
}
LABELS = {'dmd': 'vanilla DMD', 'dmd_ida': 'DMD + IDA', 'dmd_ida_isg': 'DMD + IDA + ISG',
          'senseflow': 'SenseFlow (DMD + IDA + ISG + VFM)'}


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
           f'run_name=shapes_ablation_{name}_s{seed}', f'trainer.max_duration={batches}ba', 'trainer.progress_bar=false',
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
    """Sample the teacher's 50-step reference sets once (the runs' report callbacks then read them from the cache
    instead of each sampling them)."""
    import torch

    from senseflow_algos.shapes import components as C
    from senseflow_algos.shapes.report import (
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
    for seed in (0, 1):
        path = teacher_cache_path(REPO / cache, key, C.DEFAULT_STEPS, C.DEFAULT_GUIDANCE, num_prompts, seed)
        if not path.exists():
            t = time.time()
            cached_teacher_images(sampler, prompts, C.DEFAULT_STEPS, C.DEFAULT_GUIDANCE, seed, path)
            print(f'teacher reference seed {seed}: {time.time() - t:.0f}s -> {path}', flush=True)


def _fmt(v, digits=3):
    return f'{v:.{digits}f}' if isinstance(v, (int, float)) else str(v)


def _student_stats(runs: dict[int, dict]) -> dict:
    """Mean and per-seed values of a variant's student row."""
    import numpy as np

    rows = {seed: rep['rows']['student 4-step'] for seed, rep in runs.items()}
    values = {
        'fd_t': [r['fd_t'] for r in rows.values()],
        'fd_r': [r['fd_r'] for r in rows.values()],
        'acc_single': [r['acc']['single']['prompt'] for r in rows.values()],
        'acc_two': [r['acc']['two']['prompt'] for r in rows.values()],
        'acc_all': [r['acc']['all']['prompt'] for r in rows.values()],
        'train_wall_s': [rep.get('train_wall_s', float('nan')) for rep in runs.values()],
        'sec_per_image': [r['sec_per_image'] for r in rows.values()],
    }
    return {'seeds': list(rows), 'mean': {k: float(np.mean(v)) for k, v in values.items()}, 'per_seed': values}


def write_results(reports: dict[str, dict[int, dict]], batches: int, command: str = '') -> None:
    """``reports[variant][seed]`` -> ``bench/results/shapes_ablation.{md,json}`` and the loss-curve PNG."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    first = next(iter(next(iter(reports.values())).values()))
    teacher = {k: v for k, v in first['rows'].items() if k.startswith('teacher')}
    seeds = sorted({s for runs in reports.values() for s in runs})
    stats = {name: _student_stats(runs) for name, runs in reports.items()}
    lines = [f'# Shapes-world ablation ({batches} batches of {first.get("global_batch_size") or 16} each, training seeds '
             f'{seeds}, {first["n"]} prompts, FD-T vs the teacher\'s 50-step samples at guidance '
             f'{first["guidance"]:g})', '',
             f'Command: `{command}`', '',
             'Teacher rows: its 50-step samples from other noise (the FD-T noise floor) and 4-step Euler. Student rows: '
             'the 4-step generator, mean over training seeds (per seed in brackets). Two runs at a time on 2 cores, '
             'one thread each: wall times depend on which run shared the machine (see bench/results/step_cost.md '
             'for per-step costs measured alone).', '',
             '| method | FD-T | FD-R | acc single | acc two | acc all | train wall (min) | s / image |',
             '|---|---|---|---|---|---|---|---|']
    for name, row in teacher.items():
        a = row['acc']
        lines.append(f'| {name} | {_fmt(row["fd_t"], 3)} | {_fmt(row["fd_r"], 3)} | {_fmt(a["single"]["prompt"])} | '
                     f'{_fmt(a["two"]["prompt"])} | {_fmt(a["all"]["prompt"])} | - | {_fmt(row["sec_per_image"], 4)} |')

    def cell(st, key, digits=3, scale=1.0):
        per = ', '.join(_fmt(v * scale, digits) for v in st['per_seed'][key])
        return f'{_fmt(st["mean"][key] * scale, digits)} ({per})' if len(st['seeds']) > 1 else per

    for name, st in stats.items():
        lines.append(f'| {LABELS[name]} | {cell(st, "fd_t")} | {cell(st, "fd_r")} | {cell(st, "acc_single")} | '
                     f'{cell(st, "acc_two")} | {cell(st, "acc_all")} | {cell(st, "train_wall_s", 1, 1 / 60)} | '
                     f'{_fmt(st["mean"]["sec_per_image"], 4)} |')
    (RESULTS / 'shapes_ablation.md').write_text('\n'.join(lines) + '\n')
    (RESULTS / 'shapes_ablation.json').write_text(json.dumps(
        {'command': command, 'batches': batches, 'seeds': seeds, 'teacher': teacher,
         'students': {n: {'label': LABELS[n], **st} for n, st in stats.items()}}, indent=1, default=float))
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
    p.add_argument('--seeds', default='17,18', help='training seeds (comma-separated); 17 is yamls/shapes.yaml\'s')
    p.add_argument('overrides', nargs='*', help='extra dotted.key=value overrides for every run')
    a = p.parse_args(argv)
    names = [n for n in a.only.split(',') if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f'--only: unknown variant(s) {unknown}; choose from {list(VARIANTS)}')
    prefill_teacher_cache()
    seeds = [int(x) for x in a.seeds.split(',') if x]
    with ThreadPoolExecutor(max_workers=a.parallel) as pool:
        futures = {(n, s): pool.submit(run_variant, n, s, a.batches, a.overrides) for s in seeds for n in names}
        reports = {n: {s: futures[(n, s)].result() for s in seeds} for n in names}
    write_results(reports, a.batches, 'python ' + ' '.join(sys.argv))
    return 0


if __name__ == '__main__':
    sys.exit(main())
