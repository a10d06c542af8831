"""Per-iteration time of the tiny FLUX config trained from MDS: online encoding vs precomputed embeddings and latents.

    python bench/data_precompute.py [--batches 30] [--repeats 2] [--out bench/results]

Both runs read the same MDS dataset (made here: example images -> ``images_to_mds`` -> ``precompute``), with the
same seed, so they train on the same batches (checked): ``online`` is ``dataset.kind=image_caption`` with the text
encoders and the VAE encoder loaded, ``precomputed`` is ``yamls/tiny_flux_mds.yaml`` (``dataset.kind=precomputed``,
``model.text_encoders=false``, ``model.vae_encoder=false``). The time of an iteration is the wall time between
consecutive ``BATCH_END`` events (data loading included); the first ``--warmup`` batches of each run are dropped.
Runs alternate online / precomputed ``--repeats`` times so that load from other processes hits both alike. Two
configurations: the full tiny config (IDA, ISG, VFM discriminator) and DMD alone (no algorithms).

Writes ``data_precompute.md`` and ``data_precompute.json`` (with the command) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='Online encoding vs precomputed MDS: per-iteration time of the tiny '
                                     'FLUX config on the same batches.')
    parser.add_argument('--batches', type=int, default=30, help='Batches per run (default: %(default)s).')
    parser.add_argument('--warmup', type=int, default=3, help='First batches of each run not timed (default: '
                        '%(default)s).')
    parser.add_argument('--repeats', type=int, default=2, help='Runs per mode and configuration, alternating '
                        '(default: %(default)s).')
    parser.add_argument('--images', type=int, default=128, help='Example images in the dataset (default: '
                        '%(default)s).')
    parser.add_argument('--threads', type=int, default=1, help='torch intra-op threads (default: %(default)s).')
    parser.add_argument('--work', default=None, help='Folder for the datasets (default: a temporary folder).')
    parser.add_argument('--out', default=str(REPO / 'bench' / 'results'), help='Results folder (default: '
                        'bench/results).')
    return parser


def _load_script(name: str):
    import importlib.util

    if str(REPO / 'data_prep') not in sys.path:  # as when Python runs the script: it imports its sibling mds_writer
        sys.path.insert(0, str(REPO / 'data_prep'))
    spec = importlib.util.spec_from_file_location(f'data_prep_{name}', REPO / 'data_prep' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_data(work: Path, num_images: int) -> Path:
    """Example images -> MDS -> precomputed tiny-FLUX MDS (seed 17, 32 px, the tiny config's)."""
    images, mds, pre = work / 'images', work / 'mds', work / 'precomputed'
    _load_script('example_images').write_example_images(images, num_images, size=48, seed=0)
    assert _load_script('images_to_mds').main(['--images', str(images), '--out', str(mds), '--no-progress']) == 0
    assert _load_script('precompute').main(['--input', str(mds), '--out', str(pre), '--family', 'flux', '--tiny',
                                            '--seed', '17', '--resolution', '32', '--no-progress']) == 0
    return pre


def timed_run(data: Path, mode: str, algorithms: bool, batches: int) -> dict[str, Any]:
    from composer.core import Callback

    from senseflow_algos.builders import build_trainer
    from senseflow_algos.config import load_config, validate_config

    overrides = [f'dataset.remote={data}', f'trainer.max_duration={batches}ba', 'trainer.progress_bar=false',
                 'trainer.autoresume=false']
    if mode == 'online':
        overrides += ['dataset.kind=image_caption', 'model.text_encoders=true', 'model.vae_encoder=true']
    cfg = load_config(REPO / 'yamls' / 'tiny_flux_mds.yaml', overrides)
    if not algorithms:
        cfg['algorithms'] = {}
    validate_config(cfg, source=f'tiny_flux_mds ({mode})')

    class Timer(Callback):

        def __init__(self):
            self.ends: list[float] = []
            self.prompts: list[tuple[str, ...]] = []

        def fit_start(self, state, logger):
            self.ends.append(time.perf_counter())

        def after_dataloader(self, state, logger):
            self.prompts.append(tuple(state.batch['prompt']))

        def batch_end(self, state, logger):
            self.ends.append(time.perf_counter())

    trainer = build_trainer(cfg)
    model = trainer.state.model
    timer = Timer()
    trainer.state.callbacks.append(timer)
    trainer.fit()
    trainer.close()
    times = [b - a for a, b in zip(timer.ends, timer.ends[1:])]
    return {'times': times, 'prompts': timer.prompts, 'conditioner': model.conditioner is not None,
            'vae_encoder': model.vae.encoder is not None}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    command = shlex.join(['python', 'bench/data_precompute.py', *(sys.argv[1:] if argv is None else argv)])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        t0 = time.perf_counter()
        data = make_data(work, args.images)
        prep_s = time.perf_counter() - t0
        results: dict[str, Any] = {}
        for algorithms in (True, False):
            name = 'tiny_flux (IDA + ISG + VFM discriminator)' if algorithms else 'DMD only (no algorithms)'
            runs: dict[str, list[dict[str, Any]]] = {'online': [], 'precomputed': []}
            for _ in range(args.repeats):
                for mode in ('online', 'precomputed'):
                    runs[mode].append(timed_run(data, mode, algorithms, args.batches))
            same = all(r['prompts'] == runs['online'][0]['prompts'] for rs in runs.values() for r in rs)
            summary = {}
            for mode, rs in runs.items():
                times = [t for r in rs for t in r['times'][args.warmup:]]
                summary[mode] = {
                    'median_s': statistics.median(times), 'mean_s': statistics.fmean(times),
                    'min_s': min(times), 'iterations_timed': len(times),
                    'text_encoders_loaded': rs[0]['conditioner'], 'vae_encoder_loaded': rs[0]['vae_encoder'],
                }
            summary['ratio_online_over_precomputed_median'] = (summary['online']['median_s']
                                                              / summary['precomputed']['median_s'])
            summary['ratio_online_over_precomputed_mean'] = (summary['online']['mean_s']
                                                            / summary['precomputed']['mean_s'])
            summary['same_batches'] = same
            results[name] = summary
    report = {
        'command': command,
        'environment': {'python': platform.python_version(), 'torch': torch.__version__, 'threads': args.threads,
                        'cpus': os.cpu_count(), 'load_average_1m_at_end': os.getloadavg()[0],
                        'platform': platform.platform()},
        'settings': {'batches': args.batches, 'warmup': args.warmup, 'repeats': args.repeats,
                     'images': args.images, 'global_batch_size': 2, 'resolution': 32, 'seed': 17},
        'data_prep_seconds': prep_s,
        'results': results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'data_precompute.json').write_text(json.dumps(report, indent=1) + '\n')
    lines = ['# Online encoding vs precomputed MDS: tiny FLUX, CPU', '',
             f'Command: `{command}`  ',
             f'torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs, load average at the end '
             f'{os.getloadavg()[0]:.1f} (the machine is shared; runs alternate so load hits both modes).  ',
             f'{args.repeats} runs per mode of {args.batches} batches (batch 2, 32 px, seed 17), first {args.warmup} '
             'of each run not timed. Iteration = wall time between consecutive batch ends, data loading included.',
             '', '| configuration | mode | text encoders | VAE encoder | median s/it | mean s/it | same batches |',
             '|---|---|---|---|---|---|---|']
    for name, s in results.items():
        for mode in ('online', 'precomputed'):
            m = s[mode]
            lines.append(f'| {name} | {mode} | {"loaded" if m["text_encoders_loaded"] else "none"} | '
                         f'{"loaded" if m["vae_encoder_loaded"] else "none"} | {m["median_s"]:.4f} | '
                         f'{m["mean_s"]:.4f} | {s["same_batches"]} |')
    lines += ['', '| configuration | online / precomputed (median) | online / precomputed (mean) |', '|---|---|---|']
    for name, s in results.items():
        lines.append(f'| {name} | **{s["ratio_online_over_precomputed_median"]:.2f}x** | '
                     f'{s["ratio_online_over_precomputed_mean"]:.2f}x |')
    lines += ['', 'Precomputing removes, per iteration, the text encoders on the batch prompts and the VAE encoder on '
              'the real images. Every network here is tiny, so the ratio measures this pipeline, not FLUX scale, '
              'where T5-XXL, CLIP-L and the VAE encoder weigh against a 12B teacher and generator.', '']
    (out / 'data_precompute.md').write_text('\n'.join(lines))
    print('\n'.join(lines))
    return 0 if all(s['same_batches'] for s in results.values()) else 1


if __name__ == '__main__':
    sys.exit(main())
