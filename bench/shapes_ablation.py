"""Shapes-world ablation: vanilla DMD, DMD + IDA, DMD + IDA + ISG and full SenseFlow from the shipped teacher.

    python bench/shapes_ablation.py [--batches 1000] [--parallel 2] [--only full,dmd] [override ...]

Every variant runs ``composer train.py yamls/shapes.yaml`` with the same seed, data, optimizer and number of
batches; only ``algorithms:`` differs. Each run ends with the shapes report (FD-T against the teacher's 50-step
samples, attribute accuracy, seconds per image), which this script collects into
``bench/results/shapes_ablation.{json,md}`` and ``bench/results/shapes_ablation_losses.png``. Runs go to
``runs/shapes_ablation/<variant>``; a variant whose report exists is not rerun (delete the folder to rerun).
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


def run_variant(name: str, batches: int, extra: list[str]) -> dict:
    folder = RUNS / name
    report = folder / 'shapes_report' / 'report.json'
    if report.exists():
        print(f'[{name}] report exists, not rerun', flush=True)
        return json.loads(report.read_text())
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    cmd = [shutil.which('composer') or 'composer', 'train.py', 'yamls/shapes.yaml', f'run_name=shapes_ablation_{name}',
           f'trainer.max_duration={batches}ba', 'trainer.progress_bar=false',
           f'callbacks.shapes_report.folder={folder / "shapes_report"}',
           f'callbacks.export_pipeline.folder={folder / "export"}', *VARIANTS[name], *extra]
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    t = time.time()
    print(f'[{name}] {" ".join(cmd[1:])}', flush=True)
    with open(folder / 'train.log', 'w') as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f'{name} failed ({proc.returncode}); see {folder / "train.log"}')
    print(f'[{name}] done in {(time.time() - t) / 60:.1f} min', flush=True)
    return json.loads(report.read_text())


def _fmt(v, digits=3):
    return f'{v:.{digits}f}' if isinstance(v, (int, float)) else str(v)


def write_results(reports: dict[str, dict], batches: int) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    first = next(iter(reports.values()))
    teacher = {k: v for k, v in first['rows'].items() if k.startswith('teacher')}
    lines = [f'# Shapes-world ablation ({batches} batches each, batch {first.get("batch_size", 16)}, '
             f'{first["n"]} prompts, FD-T vs the teacher\'s 50-step samples at guidance {first["guidance"]:g})', '',
             '| method | FD-T | FD-R | acc single | acc two | acc all | train wall (min) | s / image |',
             '|---|---|---|---|---|---|---|---|']
    for name, row in teacher.items():
        a = row['acc']
        lines.append(f'| {name} | {_fmt(row["fd_t"], 2)} | {_fmt(row["fd_r"], 2)} | {_fmt(a["single"]["prompt"])} | '
                     f'{_fmt(a["two"]["prompt"])} | {_fmt(a["all"]["prompt"])} | - | {_fmt(row["sec_per_image"], 4)} |')
    for name, rep in reports.items():
        row = rep['rows']['student 4-step']
        a = row['acc']
        lines.append(f'| {LABELS[name]} | {_fmt(row["fd_t"], 2)} | {_fmt(row["fd_r"], 2)} | '
                     f'{_fmt(a["single"]["prompt"])} | {_fmt(a["two"]["prompt"])} | {_fmt(a["all"]["prompt"])} | '
                     f'{_fmt(rep.get("train_wall_s", float("nan")) / 60, 1)} | {_fmt(row["sec_per_image"], 4)} |')
    (RESULTS / 'shapes_ablation.md').write_text('\n'.join(lines) + '\n')
    (RESULTS / 'shapes_ablation.json').write_text(json.dumps(
        {'batches': batches, 'teacher': teacher,
         'students': {n: {'label': LABELS[n], **r['rows']['student 4-step'], 'train_wall_s': r.get('train_wall_s')}
                      for n, r in reports.items()}}, indent=1))
    _plot_losses(reports)
    print('\n'.join(lines))


def _plot_losses(reports: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np

    keys = ['loss/train/generator/dmd', 'loss/train/fake_score/flow_matching', 'loss/train/generator/isg',
            'loss/train/generator/adversarial']
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6))
    for name in reports:
        hist = json.loads((RUNS / name / 'shapes_report' / 'losses.json').read_text())
        for ax, key in zip(axes, keys):
            pts = [(h['batch'], h[key]) for h in hist if key in h]
            if not pts:
                continue
            x, y = map(np.array, zip(*pts))
            w = max(1, len(y) // 25)
            smooth = np.convolve(y, np.ones(w) / w, mode='valid')
            ax.plot(x[w - 1:], smooth, label=LABELS[name])
    for ax, key in zip(axes, keys):
        ax.set_title(key.replace('loss/train/', ''))
        ax.set_xlabel('batch')
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / 'shapes_ablation_losses.png', dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--batches', type=int, default=1000)
    p.add_argument('--parallel', type=int, default=2)
    p.add_argument('--only', default=','.join(VARIANTS))
    p.add_argument('overrides', nargs='*', help='extra dotted.key=value overrides for every run')
    a = p.parse_args(argv)
    names = [n for n in a.only.split(',') if n]
    # The teacher's 50-step reference is cached in runs/shapes_cache by the first run; run one first so the others
    # reuse it rather than each sampling it.
    reports = {names[0]: run_variant(names[0], a.batches, a.overrides)}
    with ThreadPoolExecutor(max_workers=a.parallel) as pool:
        futures = {n: pool.submit(run_variant, n, a.batches, a.overrides) for n in names[1:]}
        reports.update({n: f.result() for n, f in futures.items()})
    write_results({n: reports[n] for n in names}, a.batches)
    return 0


if __name__ == '__main__':
    sys.exit(main())
