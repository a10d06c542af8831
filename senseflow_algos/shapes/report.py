"""Evaluation of shapes-world generators: teacher full-step, teacher 4-step Euler, the distilled student.

Metrics (from :mod:`senseflow_algos.shapes.evaluator`) on a fixed prompt suite (half one-shape, half two-shape
captions of world seed :data:`EVAL_SEED`, never trained on):

* attribute accuracy (``prompt``: everything the caption says is in the image), single / two-shape / all;
* FD-T: Fréchet distance, in the evaluator's feature space, to the teacher's full-step samples for the same
  prompts (for the teacher's full-step row: a second draw with other noise, the noise floor of FD-T);
* FD-R: the same distance to the renderer's images of those captions (the toy FID);
* shape accuracy by pixel geometry (:mod:`senseflow_algos.shapes.geometry`), single / two-shape: a second check,
  independent of the evaluator CNN, which is lenient with blobs;
* diversity: within-prompt diversity (:mod:`senseflow_algos.evaluation.diversity`) of the evaluator's features over
  ``diversity_seeds`` noise seeds of ``diversity_prompts`` prompts, as a ratio to the teacher's full-step diversity
  (mode collapse shows as a ratio below 1);
* seconds per image (text encoding, sampling and decoding; batch 64; the thread count of the run).

Used by the :class:`ShapesReport` callback at the end of ``composer train.py yamls/shapes.yaml``, by
``python -m senseflow_algos.shapes.report teacher`` (teacher-only table) and by ``bench/shapes_ablation.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from senseflow_algos.evaluation.diversity import within_prompt_diversity
from senseflow_algos.evaluation.fid import fid_from_features
from senseflow_algos.sampling import DEFAULT_METHOD
from senseflow_algos.shapes import components as C
from senseflow_algos.shapes.evaluator import ShapesEvaluator
from senseflow_algos.shapes.geometry import geometry_accuracy
from senseflow_algos.shapes.world import render, sample_scene

__all__ = ['EVAL_SEED', 'prompt_suite', 'renderer_images', 'TeacherSampler', 'evaluate_images', 'teacher_table',
           'student_images', 'distillation_report', 'format_report_table', 'save_grid', 'ShapesReport',
           'teacher_cache_path', 'cached_teacher_images', 'fingerprint', 'compare_reports', 'headline', 'format_headline']

EVAL_SEED = 5000
BATCH = 64
#: Prompts and noise seeds of the diversity score (issue 16: 8 seeds x 32 prompts); seeds from DIVERSITY_SEED on.
DIVERSITY_PROMPTS, DIVERSITY_SEEDS, DIVERSITY_SEED = 32, 8, 1000


def _suite_scenes(n: int, seed: int):
    """``n // 2`` one-shape scenes of world seed ``seed``, then ``n - n // 2`` two-shape ones of ``seed + 1``."""
    return ([sample_scene(seed, i, num_objects=1) for i in range(n // 2)] +
            [sample_scene(seed + 1, i, num_objects=2) for i in range(n - n // 2)])


def prompt_suite(n: int, seed: int = EVAL_SEED) -> list[str]:
    """``n`` evaluation captions: ``n // 2`` one-shape, the rest two-shape (world seeds ``seed``, ``seed + 1``)."""
    return [scene.caption for scene in _suite_scenes(n, seed)]


def renderer_images(n: int, seed: int = EVAL_SEED) -> torch.Tensor:
    """The renderer's images of :func:`prompt_suite` ``(n, 3, 32, 32)`` in [-1, 1]."""
    return torch.from_numpy(np.stack([render(s) for s in _suite_scenes(n, seed)])) * 2 - 1


def _noise(n: int, shape, seed: int) -> torch.Tensor:
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


@dataclass
class TeacherSampler:
    """The guidance-distilled teacher sampled with deterministic Euler on FLUX's shifted schedule.

    Build with :meth:`from_pipeline` (a loaded ``FluxPipeline``) or :meth:`from_model` (a ``DMDModel``).
    """
    transformer: torch.nn.Module
    vae: torch.nn.Module
    encode: Callable[[list[str]], dict]

    @classmethod
    def from_pipeline(cls, pipe, max_sequence_length: int = C.MAX_SEQUENCE_LENGTH) -> 'TeacherSampler':
        def encode(prompts):
            with torch.no_grad():
                e, p, _ = pipe.encode_prompt(list(prompts), prompt_2=None, max_sequence_length=max_sequence_length)
            return {'prompt_embeds': e, 'pooled_prompt_embeds': p}

        return cls(pipe.transformer, pipe.vae, encode)

    @classmethod
    def from_model(cls, model) -> 'TeacherSampler':
        return cls(model.teacher, model.vae, lambda prompts: model.conditioner(list(prompts)))

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], steps: int = C.DEFAULT_STEPS, guidance: float = C.DEFAULT_GUIDANCE,
                 seed: int = 0) -> torch.Tensor:
        """Images ``(N, 3, 32, 32)`` in [-1, 1]; the initial noise of prompt ``i`` depends only on ``(seed, i)``."""
        from senseflow_algos.models.families.flux import FluxFamily

        fam = FluxFamily()
        shape = fam.latent_shape(self.vae, C.RESOLUTION)
        noise = _noise(len(prompts), shape, seed)
        sigmas = C.teacher_sigmas(steps, shape[1:])
        out = []
        for i in range(0, len(prompts), BATCH):
            cond = self.encode(list(prompts[i:i + BATCH]))
            lat = C.sample_euler(self.transformer, cond, sigmas, noise[i:i + BATCH], guidance, fam)
            out.append(fam.decode_latents(self.vae, lat).clamp(-1, 1))
        return torch.cat(out)


@torch.no_grad()
def student_images(model, prompts: Sequence[str], seed: int = 0, method: str = DEFAULT_METHOD) -> torch.Tensor:
    """The DMD model's generator in its anchor steps (``model.num_steps``, default 4) (``senseflow_algos.sampling.sample``), in [-1, 1]."""
    from senseflow_algos.sampling import SamplingComponents, sample

    parts = SamplingComponents.from_model(model)
    out = []
    for i in range(0, len(prompts), BATCH):
        rng = torch.Generator().manual_seed(seed * 1_000_003 + i)
        out.append(sample(parts, list(prompts[i:i + BATCH]), rng=rng, method=method).images * 2 - 1)
    return torch.cat(out)


def evaluate_images(evaluator: ShapesEvaluator, images: torch.Tensor, prompts: Sequence[str],
                    reference: Optional[torch.Tensor] = None, real: Optional[torch.Tensor] = None) -> dict:
    """Accuracies (single / two / all, every metric) and FD-T / FD-R against the given image sets."""
    s = evaluator.score(images, prompts)
    feats = evaluator.features(images)
    row = {'acc': {g: s[g] for g in ('single', 'two', 'all')}, 'geometry': geometry_accuracy(images, prompts)}
    if reference is not None:
        row['fd_t'] = fid_from_features(feats, evaluator.features(reference))
    if real is not None:
        row['fd_r'] = fid_from_features(feats, evaluator.features(real))
    return row


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def fingerprint(module: torch.nn.Module) -> str:
    """A short hash of a module's weights (keys the teacher-sample cache to the teacher)."""
    import hashlib

    h = hashlib.sha1()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def teacher_cache_path(cache: Optional[Path], key: str, steps: int, guidance: float, n: int, seed: int):
    """Where the teacher's reference images for these settings are cached in ``cache`` (``None``: no cache)."""
    if cache is None:
        return None
    return Path(cache) / f'teacher_{key}_s{steps}_g{guidance:g}_n{n}_seed{seed}.pt'


def cached_teacher_images(sampler: TeacherSampler, prompts, steps, guidance, seed, cache_file=None):
    """Teacher images (and seconds per image), from ``cache_file`` if it exists (written otherwise)."""
    if cache_file is not None and Path(cache_file).exists():
        d = torch.load(cache_file)
        return d['images'], d['sec_per_image']
    images, dt = _timed(lambda: sampler.generate(prompts, steps, guidance, seed))
    if cache_file is not None:
        # Written aside and renamed: runs in parallel (bench/shapes_ablation.py) may read the same file.
        Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
        partial = Path(cache_file).with_name(f'{Path(cache_file).name}.{os.getpid()}.partial')
        torch.save({'images': images, 'sec_per_image': dt / len(prompts)}, partial)
        os.replace(partial, cache_file)
    return images, dt / len(prompts)


def teacher_table(sampler: TeacherSampler, evaluator: ShapesEvaluator, n: int = 256,
                  configs: Sequence[tuple[int, float]] = ((50, C.DEFAULT_GUIDANCE), (4, C.DEFAULT_GUIDANCE)),
                  seed: int = 0, floor: bool = True) -> dict:
    """Rows ``'<steps>-step g<guidance>'`` for the teacher; FD-T against the first configuration."""
    prompts, real = prompt_suite(n), renderer_images(n)
    ref = sampler.generate(prompts, *configs[0], seed=seed)
    rows = {}
    for steps, g in configs:
        images, dt = _timed(lambda steps=steps, g=g: sampler.generate(prompts, steps, g, seed=seed + 1))
        row = evaluate_images(evaluator, images, prompts, ref, real)
        row.update(steps=steps, guidance=g, sec_per_image=dt / n)
        rows[f'teacher {steps}-step g{g:g}'] = row
    return {'n': n, 'rows': rows, 'renderer': evaluate_images(evaluator, real, prompts)}


def _diversity(evaluator: ShapesEvaluator, generate: Callable[[list[str], int], torch.Tensor], prompts: list[str],
               seeds: int) -> float:
    """Within-prompt diversity of ``generate(prompts, seed)`` over ``seeds`` noise seeds (evaluator features)."""
    feats = [np.asarray(evaluator.features(generate(prompts, DIVERSITY_SEED + s))) for s in range(seeds)]
    return within_prompt_diversity(np.stack(feats, axis=1))  # (prompts, seeds, dims)


def distillation_report(model, evaluator: Optional[ShapesEvaluator] = None, n: int = 256, seed: int = 0,
                        guidance: float = C.DEFAULT_GUIDANCE, full_steps: int = C.DEFAULT_STEPS,
                        cache: Optional[Path] = None, diversity_prompts: int = DIVERSITY_PROMPTS,
                        diversity_seeds: int = DIVERSITY_SEEDS) -> dict:
    """Teacher full-step, teacher n-step Euler and student n-step on the prompt suite (n = the student's steps).

    The teacher's full-step images for FD-T come from noise seed ``seed``; every row (the teacher's full-step row
    included, giving the noise floor) is drawn with seed ``seed + 1``. Diversity: ``diversity_seeds`` seeds of the first
    ``diversity_prompts`` prompts of a suite of that size (half one-shape, half two-shape); ``0`` seeds: not measured.
    """
    evaluator = evaluator or ShapesEvaluator()
    prompts, real = prompt_suite(n), renderer_images(n)
    sampler = TeacherSampler.from_model(model)
    teacher_key = fingerprint(model.teacher) if cache is not None else ''
    ref, _ = cached_teacher_images(sampler, prompts, full_steps, guidance, seed,
                                   teacher_cache_path(cache, teacher_key, full_steps, guidance, n, seed))
    full, full_spi = cached_teacher_images(sampler, prompts, full_steps, guidance, seed + 1,
                                           teacher_cache_path(cache, teacher_key, full_steps, guidance, n, seed + 1))
    k = int(model.num_anchors)
    four, four_dt = _timed(lambda: sampler.generate(prompts, k, guidance, seed + 1))
    student, student_dt = _timed(lambda: student_images(model, prompts, seed + 1))
    rows = {}
    for name, images, spi, steps in ((f'teacher {full_steps}-step Euler', full, full_spi, full_steps),
                                     (f'teacher {k}-step Euler', four, four_dt / n, k),
                                     (f'student {k}-step', student, student_dt / n, k)):
        row = evaluate_images(evaluator, images, prompts, ref, real)
        row.update(steps=steps, sec_per_image=spi)
        rows[name] = row
    if diversity_seeds >= 2:
        few = prompt_suite(diversity_prompts)

        def teacher_full(p, s):
            return cached_teacher_images(sampler, p, full_steps, guidance, s, teacher_cache_path(
                cache, teacher_key, full_steps, guidance, len(p), s))[0]

        generators = (teacher_full, lambda p, s: sampler.generate(p, k, guidance, s),
                      lambda p, s: student_images(model, p, s))
        scores = [_diversity(evaluator, g, few, diversity_seeds) for g in generators]
        for row, score in zip(rows.values(), scores):
            row.update(diversity=score, diversity_ratio=score / scores[0])
    return {'n': n, 'guidance': guidance, 'rows': rows, 'renderer': evaluate_images(evaluator, real, prompts),
            'diversity': {'prompts': diversity_prompts, 'seeds': diversity_seeds, 'features': 'shapes evaluator'},
            'images': {'prompts': prompts[:4] + prompts[n // 2:n // 2 + 4],
                       'columns': {col: torch.cat([v[:4], v[n // 2:n // 2 + 4]])
                                   for col, v in (('teacher full', full), (f'teacher {k}', four),
                                                (f'student {k}', student), ('renderer', real))}}}


def _geometry(row: dict) -> str:
    g = row.get('geometry')
    return f"{g['single']:.3f} / {g['two']:.3f}" if g else '-'


def format_report_table(report: dict) -> str:
    """Markdown table of a shapes distillation report's rows (one per sampler: FD-T, FD-R, accuracies, speed).

    Not :func:`senseflow_algos.evaluation.table.format_table`, which formats ``eval.py``'s metric rows."""
    lines = ['| sampler | steps | FD-T | FD-R | acc single | acc two | acc all | colour | shape | shape by geometry '
             '(single / two) | position | relation | diversity (x teacher) | s / image |', '|' + '---|' * 14]
    for name, r in report['rows'].items():
        a = r['acc']
        div = f"{r['diversity_ratio']:.3f}" if 'diversity_ratio' in r else '-'
        lines.append(f"| {name} | {r['steps']} | {r.get('fd_t', float('nan')):.2f} | {r.get('fd_r', float('nan')):.2f}"
                     f" | {a['single']['prompt']:.3f} | {a['two']['prompt']:.3f} | {a['all']['prompt']:.3f} | "
                     f"{a['all']['colour']:.3f} | {a['all']['shape']:.3f} | {_geometry(r)} | "
                     f"{a['single']['position']:.3f} | {a['two']['relation']:.3f} | {div} | {r['sec_per_image']:.4f} |")
    if report.get('renderer'):
        a = report['renderer']['acc']
        lines.append(f"| renderer (ground truth) | - | - | 0 | {a['single']['prompt']:.3f} | {a['two']['prompt']:.3f} | "
                     f"{a['all']['prompt']:.3f} | {a['all']['colour']:.3f} | {a['all']['shape']:.3f} | "
                     f"{_geometry(report['renderer'])} | {a['single']['position']:.3f} | {a['two']['relation']:.3f} | "
                     f"- | - |")
    return '\n'.join(lines)


def headline(report: dict) -> list[dict]:
    """The distillation goals of a report: the student against the teacher's Euler at its own step count (higher
    accuracy by the evaluator and by geometry, relation, lower FD-R) and against the teacher's full-step sampler
    (prompt accuracy within 5 points, one-shape and two-shape prompts). Empty when the report has no student row.

    Returns:
        One dict per goal: ``goal``, ``student``, ``teacher`` (the two values) and ``met``.
    """
    rows = report['rows']
    student = next((k for k in rows if k.startswith('student')), None)
    if student is None:
        return []
    s, k = rows[student], rows[student]['steps']
    few = next((v for n, v in rows.items() if n.startswith('teacher') and v['steps'] == k), None)
    full = next((v for n, v in rows.items() if n.startswith('teacher') and v['steps'] > k), None)
    goals = []

    def add(goal, a, b, met):
        goals.append({'goal': goal, 'student': float(a), 'teacher': float(b), 'met': bool(met)})

    if few is not None:
        for kind in ('single', 'two'):
            add(f'acc {kind} > teacher {k}-step', s['acc'][kind]['prompt'], few['acc'][kind]['prompt'],
                s['acc'][kind]['prompt'] > few['acc'][kind]['prompt'])
            if 'geometry' in s and 'geometry' in few:
                add(f'shape by geometry {kind} > teacher {k}-step', s['geometry'][kind], few['geometry'][kind],
                    s['geometry'][kind] > few['geometry'][kind])
        add(f'relation > teacher {k}-step', s['acc']['two']['relation'], few['acc']['two']['relation'],
            s['acc']['two']['relation'] > few['acc']['two']['relation'])
        add(f'FD-R < teacher {k}-step', s['fd_r'], few['fd_r'], s['fd_r'] < few['fd_r'])
    if full is not None:
        for kind in ('single', 'two'):
            a, b = s['acc'][kind]['prompt'], full['acc'][kind]['prompt']
            add(f'acc {kind} within 5 points of teacher {full["steps"]}-step', a, b, a >= b - 0.05)
    return goals


def format_headline(goals: list[dict]) -> str:
    """Markdown list of :func:`headline`'s goals (empty string when there are none)."""
    if not goals:
        return ''
    met = sum(g['met'] for g in goals)
    lines = [f'Distillation goals met: {met} of {len(goals)}']
    lines += [f"- [{'x' if g['met'] else ' '}] {g['goal']}: student {g['student']:.3f}, teacher {g['teacher']:.3f}"
              for g in goals]
    return '\n'.join(lines)


def compare_reports(paths: Sequence[str | Path]) -> dict:
    """One table from several runs' ``report.json`` (e.g. a 4-step and a 2-step student of the same teacher).

    The first report gives the teacher's full-step row and the renderer; every report adds its few-step rows
    (teacher n-step Euler, student n-step). A row name already taken (two students of the same step count) gets the
    run folder's name appended. FD-T is comparable across the rows when every report used the same prompt count,
    guidance and seed (the teacher's reference samples are then the same); a mismatch is an error.

    Raises:
        ValueError: Naming the report whose ``n`` or ``guidance`` differs from the first's.
    """
    reports = [(Path(p), json.loads(Path(p).read_text())) for p in paths]
    if not reports:
        raise ValueError('compare_reports needs at least one report.json')
    first_path, first = reports[0]
    rows = {}
    for path, rep in reports:
        for key in ('n', 'guidance'):
            if rep.get(key) != first.get(key):
                raise ValueError(f'{path}: {key}={rep.get(key)!r} differs from {first_path}: {key}={first.get(key)!r}; '
                                 'FD-T is only comparable for the same prompt suite and teacher reference')
        for name, row in rep['rows'].items():
            if path != first_path and name.startswith('teacher ') and name in rows:
                continue  # the same teacher row (same seed, same steps) again
            key = name if name not in rows else f'{name} ({path.parent.parent.name or path.parent.name})'
            rows[key] = row
    # Teacher full-step first, then by steps, most first; a teacher row before the students of its step count.
    full = [k for k in rows if k.startswith('teacher') and rows[k]['steps'] == max(r['steps'] for r in rows.values())]
    rest = sorted((k for k in rows if k not in full), key=lambda k: (-rows[k]['steps'], not k.startswith('teacher')))
    return {'n': first['n'], 'guidance': first.get('guidance'), 'rows': {k: rows[k] for k in full + rest},
            'renderer': first.get('renderer'), 'sources': [str(p) for p, _ in reports]}


def save_grid(columns: dict[str, torch.Tensor], prompts: Sequence[str], path: str | Path, scale: int = 3) -> Path:
    """PNG: one row per prompt (caption on the left), one column per image set, images in [-1, 1]."""
    from PIL import Image, ImageDraw

    names = list(columns)
    side = C.RESOLUTION * scale
    text_w, head_h, pad = 260, 16, 4
    n = len(prompts)
    canvas = Image.new('RGB', (text_w + len(names) * (side + pad), head_h + n * (side + pad)), 'white')
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(names):
        draw.text((text_w + j * (side + pad), 2), name, fill='black')
        imgs = ((columns[name].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        for i in range(n):
            tile = Image.fromarray(imgs[i]).resize((side, side), Image.NEAREST)
            canvas.paste(tile, (text_w + j * (side + pad), head_h + i * (side + pad)))
    for i, p in enumerate(prompts):
        draw.text((4, head_h + i * (side + pad) + side // 2 - 6), p, fill='black')
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def write_report(report: dict, folder: str | Path) -> str:
    """``report.json``, ``report.md`` and ``samples.png`` in ``folder``; returns the table."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    report['headline'] = headline(report)
    goals = format_headline(report['headline'])
    table = format_report_table(report) + (f'\n\n{goals}' if goals else '')
    images = report.pop('images', None)
    if images is not None:
        save_grid(images['columns'], images['prompts'], folder / 'samples.png')
    slim = json.loads(json.dumps(report, default=float))
    (folder / 'report.json').write_text(json.dumps(slim, indent=1))
    (folder / 'report.md').write_text(table + '\n')
    return table


try:
    from composer.core import Callback as _CallbackBase
except ImportError:  # pragma: no cover
    _CallbackBase = object


class ShapesReport(_CallbackBase):
    """At the end of training: the shapes report (table printed, ``report.md/json``, ``samples.png``) in
    ``<run folder>/shapes_report``, plus every batch's losses in ``losses.json``.

    Args:
        num_prompts (int): Size of the prompt suite. Default: ``512``.
        guidance (float): Teacher guidance of the reference samples. Default: the teacher's default.
        full_steps (int): The teacher's full step count. Default: ``50``.
        seed (int): Noise seed. Default: ``0``.
        cache (str, optional): Folder caching the teacher's full-step samples. Default: ``runs/shapes_cache``.
        folder (str, optional): Output folder. Default: ``<run folder>/shapes_report``.
        compare (list[str], optional): Other runs' ``report.json`` to show beside this one (e.g. the 4-step run's
            ``runs/shapes/shapes_report/report.json`` in a 2-step run): written to ``compare.md`` and printed.
            Missing files are skipped with a note.
        diversity_prompts (int): Prompts of the diversity score. Default: ``32``.
        diversity_seeds (int): Noise seeds per prompt of the diversity score (``0``: not measured). Default: ``8``.
    """

    def __init__(self, num_prompts: int = 512, guidance: float = C.DEFAULT_GUIDANCE,
                 full_steps: int = C.DEFAULT_STEPS, seed: int = 0, cache: Optional[str] = 'runs/shapes_cache',
                 folder: Optional[str] = None, compare: Optional[Sequence[str]] = None,
                 diversity_prompts: int = DIVERSITY_PROMPTS, diversity_seeds: int = DIVERSITY_SEEDS):
        self.num_prompts, self.guidance, self.full_steps, self.seed = num_prompts, guidance, full_steps, seed
        self.diversity_prompts, self.diversity_seeds = diversity_prompts, diversity_seeds
        self.cache = Path(cache) if cache else None
        self.folder = folder
        self.compare = list(compare or [])
        self.losses: list[dict] = []
        self.report: Optional[dict] = None

    def fit_start(self, state, logger) -> None:
        self._t_start = time.time()

    def batch_end(self, state, logger) -> None:
        self.losses.append({'batch': int(state.timestamp.batch),
                            **{k: float(v) for k, v in state.total_loss_dict.items()}})

    def fit_end(self, state, logger) -> None:
        from composer.utils import dist

        from senseflow_algos.algorithms.utils import get_dmd_model
        from senseflow_algos.callbacks.sample_grid import run_folder

        if dist.get_global_rank() != 0:
            return
        train_wall_s = time.time() - getattr(self, '_t_start', time.time())
        model = get_dmd_model(state, 'callbacks.shapes_report')
        folder = Path(self.folder) if self.folder else run_folder(state) / 'shapes_report'
        folder.mkdir(parents=True, exist_ok=True)
        (folder / 'losses.json').write_text(json.dumps(self.losses))
        was_training = model.training
        model.eval()
        try:
            t = time.time()
            report = distillation_report(model, n=self.num_prompts, seed=self.seed, guidance=self.guidance,
                                         full_steps=self.full_steps, cache=self.cache,
                                         diversity_prompts=self.diversity_prompts, diversity_seeds=self.diversity_seeds)
        finally:
            model.train(was_training)
        report['wall_s_report'] = time.time() - t
        report['train_batches'] = int(state.timestamp.batch)
        per_rank = getattr(state.dataloader, 'batch_size', None)
        report['global_batch_size'] = per_rank * dist.get_world_size() if per_rank else None
        report['train_wall_s'] = train_wall_s
        table = write_report(report, folder)
        self.report = report
        print(f'\nShapes world, {self.num_prompts} prompts (FD-T vs teacher {self.full_steps}-step g{self.guidance:g}):'
              f'\n{table}\nwritten to {folder}', flush=True)
        others = [p for p in self.compare if Path(p).is_file()]
        for p in self.compare:
            if p not in others:
                print(f'shapes_report.compare: {p} does not exist (run that configuration first); not compared')
        if others:
            merged = format_report_table(compare_reports([folder / 'report.json', *others]))
            (folder / 'compare.md').write_text(merged + '\n')
            print(f'\nBeside {", ".join(others)}:\n{merged}\nwritten to {folder / "compare.md"}', flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog='python -m senseflow_algos.shapes.report',
                                description='Teacher table: full-step and few-step Euler accuracy and FD.')
    p.add_argument('--teacher', default=str(C.TEACHER_DIR))
    p.add_argument('-n', type=int, default=256)
    p.add_argument('--steps', type=int, nargs='+', default=[50, 4])
    p.add_argument('--guidance', type=float, nargs='+', default=[C.DEFAULT_GUIDANCE])
    p.add_argument('--out', default=None, help='write report.json / report.md here')
    p.add_argument('--threads', type=int, default=1, help='torch intra-op threads (1: fastest on a shared 2-core machine)')
    p.add_argument('--compare', nargs='+', metavar='REPORT_JSON',
                   help="only merge these runs' report.json into one table (e.g. the 4-step and the 2-step student: "
                   'runs/shapes/shapes_report/report.json runs/shapes_2step/shapes_report/report.json)')
    a = p.parse_args(argv)
    if a.compare:
        merged = compare_reports(a.compare)
        print(write_report(merged, a.out) if a.out else format_report_table(merged))
        return
    C.num_threads(a.threads)
    sampler = TeacherSampler.from_pipeline(C.load_teacher(a.teacher))
    configs = [(s, g) for g in a.guidance for s in a.steps]
    report = teacher_table(sampler, ShapesEvaluator(), a.n, configs)
    print(write_report(report, a.out) if a.out else format_report_table(report))


if __name__ == '__main__':
    main()
