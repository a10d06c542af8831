"""The shipped shapes teacher under both shape checks: the evaluator CNN and pixel geometry (issue 16's second check).

Samples the teacher (``senseflow_algos/shapes/assets/teacher``) at 50 and 4 Euler steps on the report's prompt suite
and scores the shapes with the evaluator (``shape`` metric) and with :mod:`senseflow_algos.shapes.geometry`; the
renderer's own images are the ceiling.

    python bench/shapes_geometry.py [--prompts 256]

Writes ``bench/results/shapes_geometry.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from senseflow_algos.shapes import components as C  # noqa: E402
from senseflow_algos.shapes.evaluator import ShapesEvaluator  # noqa: E402
from senseflow_algos.shapes.geometry import geometry_accuracy  # noqa: E402
from senseflow_algos.shapes.report import TeacherSampler, prompt_suite, renderer_images  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--prompts', type=int, default=256)
    parser.add_argument('--out', type=Path, default=REPO / 'bench' / 'results')
    args = parser.parse_args(argv)
    start = time.perf_counter()
    prompts = prompt_suite(args.prompts)
    evaluator = ShapesEvaluator()
    sampler = TeacherSampler.from_pipeline(C.load_teacher())
    sets = {'renderer': renderer_images(args.prompts)}
    for steps in (50, 4):
        sets[f'teacher {steps}-step Euler'] = sampler.generate(prompts, steps, C.DEFAULT_GUIDANCE, seed=1)
    rows = {}
    for name, images in sets.items():
        cnn = evaluator.score(images, prompts)
        rows[name] = {'cnn_shape': {g: cnn[g]['shape'] for g in ('single', 'two')},
                      'cnn_prompt': {g: cnn[g]['prompt'] for g in ('single', 'two')},
                      'geometry_shape': geometry_accuracy(images, prompts)}
    command = 'python bench/shapes_geometry.py ' + ' '.join(argv if argv is not None else sys.argv[1:])
    meta = {'command': command.strip(), 'prompts': args.prompts, 'guidance': C.DEFAULT_GUIDANCE,
            'seconds': round(time.perf_counter() - start, 1), 'torch': torch.__version__}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / 'shapes_geometry.json').write_text(json.dumps({'meta': meta, 'rows': rows}, indent=2))
    lines = ['# Shape accuracy of the shipped shapes teacher: evaluator CNN vs pixel geometry\n',
             f'Command: `{meta["command"]}`  ',
             f'{args.prompts} prompts of the report suite (half one-shape, half two-shape), noise seed 1, guidance '
             f'{C.DEFAULT_GUIDANCE:g}; {meta["seconds"]} s on the CPU. Shape accuracy = every object of the caption has '
             'its shape (two-shape: both, as a set); geometry = each object\'s fill of its bounding box '
             '(`senseflow_algos/shapes/geometry.py`).\n',
             '| images | shape, CNN, single | shape, geometry, single | shape, CNN, two | shape, geometry, two | '
             'whole prompt, CNN, single | whole prompt, CNN, two |', '|---|---|---|---|---|---|---|']
    for name, r in rows.items():
        lines.append(f"| {name} | {r['cnn_shape']['single']:.3f} | {r['geometry_shape']['single']:.3f} | "
                     f"{r['cnn_shape']['two']:.3f} | {r['geometry_shape']['two']:.3f} | "
                     f"{r['cnn_prompt']['single']:.3f} | {r['cnn_prompt']['two']:.3f} |")
    (args.out / 'shapes_geometry.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    return 0


if __name__ == '__main__':
    sys.exit(main())
