"""``python eval.py``: generate teacher and student images for a prompt file and score them like the paper's Table 1.

FID-T and Patch FID-T compare each student's images with the teacher's images for the same prompts (and seeds); CLIP
score, HPSv2, PickScore and ImageReward score every set against its prompts. Metrics whose package or weights are
missing are announced before generation starts and shown as ``n/a`` with the reason; a metric that fails while
computing is reported the same way instead of stopping the run.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from senseflow_algos.evaluation.diversity import within_prompt_diversity
from senseflow_algos.evaluation.features import FeatureExtractor, MetricUnavailable, build_feature_extractor
from senseflow_algos.evaluation.fid import fid_from_features, random_patches
from senseflow_algos.evaluation.generation import (
    EvalError,
    check_source_path,
    free_memory,
    generate_images,
    load_images,
    open_source,
)
from senseflow_algos.evaluation.prompts import load_prompts
from senseflow_algos.evaluation.scores import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_PICKSCORE_MODEL,
    DEFAULT_PICKSCORE_PROCESSOR,
    CLIPScorer,
    HPSv2Scorer,
    ImageRewardScorer,
    PickScorer,
    Scorer,
)
from senseflow_algos.evaluation.table import format_table, write_results
from senseflow_algos.sampling import DEFAULT_METHOD, METHODS, images_to_pil

__all__ = ['evaluate', 'main', 'METHOD_SUFFIX']

#: Row-name suffix per sampler, as the paper names its rows ("Ours" / "Ours (Euler)").
METHOD_SUFFIX = {'renoise': '', 'euler': ' (Euler)'}


def _slug(name: str) -> str:
    return re.sub(r'[^A-Za-z0-9._-]+', '_', name).strip('_') or 'student'


def _is_senseflow(path: Path) -> bool:
    from senseflow_algos.export import EXPORT_INFO

    return not (path / 'model_index.json').is_file() or (path / EXPORT_INFO).is_file()


def _student_resolution(path: Path, config: Optional[str], overrides: Sequence[str]) -> Optional[int]:
    from senseflow_algos.config import load_config
    from senseflow_algos.export import EXPORT_INFO
    from senseflow_algos.restore import find_run_config, resolve_checkpoint

    if (path / EXPORT_INFO).is_file():
        return int(json.loads((path / EXPORT_INFO).read_text())['resolution'])
    if (path / 'model_index.json').is_file():
        return None
    try:
        config = config or find_run_config(resolve_checkpoint(path))
        return int(load_config(config, list(overrides))['model']['resolution']) if config else None
    except Exception:  # noqa: BLE001 - only a default; open_source reports real problems
        return None


def _load_metrics(fid_features: str | FeatureExtractor, clip_model: Optional[str], pickscore_model: Optional[str],
                  pickscore_processor: Optional[str], hpsv2: bool, image_reward: bool, allow_downloads: bool,
                  say: Callable[[str], None]) -> tuple[Optional[FeatureExtractor], list[Scorer], dict[str, str]]:
    """Load every metric network up front (on the CPU); the unavailable ones are announced and recorded as skipped."""
    skipped: dict[str, str] = {}
    features = None
    try:
        features = build_feature_extractor(fid_features, 'cpu', allow_download=allow_downloads)
    except MetricUnavailable as e:
        skipped['FID-T'] = skipped['Patch FID-T'] = str(e)
        say(f'FID-T and Patch FID-T will be skipped: {e}')
    factories: list[tuple[str, Optional[Callable[[], Scorer]]]] = [
        ('CLIP', (lambda: CLIPScorer(clip_model, 'cpu', allow_downloads)) if clip_model else None),
        ('HPSv2', (lambda: HPSv2Scorer(device='cpu', allow_download=allow_downloads)) if hpsv2 else None),
        ('Pick', (lambda: PickScorer(pickscore_model, 'cpu', allow_downloads, pickscore_processor))
         if pickscore_model else None),
        ('ImageReward', (lambda: ImageRewardScorer('cpu', allow_downloads)) if image_reward else None),
    ]
    scorers = []
    for title, factory in factories:
        if factory is None:
            skipped[title] = 'switched off on the command line'
            continue
        try:
            scorers.append(factory())
        except MetricUnavailable as e:
            skipped[title] = str(e)
            say(f'{title} will be skipped: {e}')
        except Exception as e:  # noqa: BLE001 - never crash half-way because of one metric
            skipped[title] = f'failed to load: {type(e).__name__}: {e}'
            say(f'{title} will be skipped: {skipped[title]}')
    return features, scorers, skipped


def _measure(folder: Path, prompts: Sequence[str], batch_size: int, features: Optional[FeatureExtractor],
             scorers: list[Scorer], patch_size: int, patches_per_image: int, seed: int, device: torch.device,
             skipped: dict[str, str], progress: bool, name: str) -> dict[str, Any]:
    """One pass over a folder's images: full-image and patch features, and every per-image score."""
    feats, patch_feats = [], []
    scores: dict[str, list[torch.Tensor]] = {s.title: [] for s in scorers}
    do_patches = features is not None and 'Patch FID-T' not in skipped
    n = len(prompts)
    for start in tqdm(range(0, n, batch_size), desc=f'scoring {name}', disable=not progress, leave=False):
        idx = list(range(start, min(start + batch_size, n)))
        images = load_images(folder, idx)
        if features is not None:
            feats.append(features(images.to(device)).double().cpu())
            if do_patches:
                try:
                    patches = random_patches(images, idx, patch_size, patches_per_image, seed)
                    patch_feats.append(features(patches.to(device)).double().cpu())
                except ValueError as e:
                    skipped['Patch FID-T'] = f'{e} (set --patch-size; the paper crops at full resolution)'
                    do_patches, patch_feats = False, []
        if scorers:
            pil = images_to_pil(images)
            for s in scorers:
                if s.title in skipped:
                    continue
                try:
                    scores[s.title].append(s(pil, [prompts[i] for i in idx]).double())
                except Exception as e:  # noqa: BLE001 - record and go on
                    skipped[s.title] = f'failed while scoring {name}: {type(e).__name__}: {e}'
    return {'features': torch.cat(feats).numpy() if feats else None,
            'patch_features': torch.cat(patch_feats).numpy() if patch_feats else None,
            'scores': {k: float(torch.cat(v).mean()) for k, v in scores.items() if v and k not in skipped}}


def _fid(a: Optional[np.ndarray], b: Optional[np.ndarray], title: str, skipped: dict[str, str]) -> Optional[float]:
    if a is None or b is None or title in skipped:
        return None
    try:
        return fid_from_features(a, b)
    except ValueError as e:
        skipped[title] = str(e)
        return None


def evaluate(teacher: str, students: Sequence[str], prompts_file: str, out: str, *, num: Optional[int] = None,
             seed: int = 0, batch_size: int = 4, methods: Sequence[str] = ('renoise',),
             names: Optional[Sequence[str]] = None, student_config: Optional[str] = None,
             student_overrides: Sequence[str] = (), teacher_kwargs: Optional[dict[str, Any]] = None,
             student_kwargs: Optional[dict[str, Any]] = None, height: Optional[int] = None,
             width: Optional[int] = None, fid_features: str | FeatureExtractor = 'inception', patch_size: int = 299,
             patches_per_image: int = 1, clip_model: Optional[str] = DEFAULT_CLIP_MODEL,
             pickscore_model: Optional[str] = DEFAULT_PICKSCORE_MODEL,
             pickscore_processor: Optional[str] = DEFAULT_PICKSCORE_PROCESSOR, hpsv2: bool = True,
             image_reward: bool = True, allow_downloads: bool = False, device: Optional[str] = None,
             dtype: Optional[str] = None, progress: bool = True, diversity_seeds: int = 0,
             diversity_prompts: int = 32,
             say: Callable[[str], None] = lambda m: print(f'[eval] {m}', flush=True)) -> dict[str, Any]:
    """Generate (resumably) and score a teacher and students; write ``results.md`` / ``results.json`` into ``out``.

    Args:
        teacher (str): The teacher's diffusers pipeline folder.
        students: Students: exported pipeline folders, checkpoints / run folders, or other pipeline folders.
        prompts_file (str): See :func:`~senseflow_algos.evaluation.prompts.load_prompts`.
        out (str): Output folder: ``teacher/``, one folder per student row, ``results.md``, ``results.json``.
        num (int, optional): Use the first ``num`` prompts.
        seed (int): Image ``i`` uses seed ``seed + i`` (the same for teacher and students).
        batch_size (int): Images per generation call and per scoring batch.
        methods: Samplers for SenseFlow students (one table row each): ``renoise`` and / or ``euler``.
        names: Row names of the students (default: their folder / file names).
        student_config, student_overrides: Run YAML and overrides of checkpoint students.
        teacher_kwargs, student_kwargs (dict, optional): Pipeline call arguments (``num_inference_steps``,
            ``guidance_scale``, ...) of the teacher and of non-SenseFlow student pipelines.
        height, width (int, optional): Image size of pipeline calls (default: the SenseFlow students' resolution).
        fid_features: ``inception`` (default), ``inception-fid``, ``inception-torchvision``, ``random`` or a
            :class:`~senseflow_algos.evaluation.features.FeatureExtractor`.
        patch_size (int), patches_per_image (int): Patch FID-T crops (at full resolution, positions seeded per image).
        clip_model, pickscore_model, pickscore_processor (str, optional): Local folders or cached hub ids (``None``
            switches the metric off).
        hpsv2, image_reward (bool): Whether to try HPSv2 / ImageReward.
        allow_downloads (bool): Let metric networks download (default: local caches only).
        device, dtype (str, optional): Where / how to run generation (default: CUDA and bf16 if available).
        progress (bool): Progress bars.
        diversity_seeds (int): Within-prompt diversity (mode collapse): ``diversity_seeds`` more images of each of the
            first ``diversity_prompts`` prompts per row (seed ``seed + (s + 1) * 1000003 + i``, in
            ``<row>/diversity/seed<s>``), scored as the mean pairwise distance of their FID features and reported as
            a ratio to the teacher's. ``0`` (default): not measured; otherwise at least 2.
        diversity_prompts (int): Prompts of the diversity score. Default: ``32``.
        say: Where messages go.

    Returns:
        dict: ``rows``, ``skipped`` (metric -> reason), ``table`` (markdown) and the written file paths.
    """
    for m in methods:
        if m not in METHODS:
            raise EvalError(f'--methods: {m!r} is not one of {list(METHODS)}')
    if diversity_seeds == 1 or diversity_seeds < 0 or diversity_prompts < 1:
        raise EvalError(f'--diversity-seeds {diversity_seeds} / --diversity-prompts {diversity_prompts}: diversity '
                        'needs at least 2 seeds of at least 1 prompt (0 seeds: off)')
    if not students:
        raise EvalError('give at least one --student')
    if names is not None and len(names) != len(students):
        raise EvalError(f'{len(names)} --names for {len(students)} --student')
    for path in (teacher, *students):
        check_source_path(path)
    out_dir = Path(out)
    prompts = load_prompts(prompts_file, num)
    say(f'{len(prompts)} prompts from {prompts_file}')
    run_device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    features, scorers, skipped = _load_metrics(fid_features, clip_model, pickscore_model, pickscore_processor, hpsv2,
                                               image_reward, allow_downloads, say)
    if len(prompts) < 2 and features is not None:
        skipped['FID-T'] = skipped['Patch FID-T'] = f'FID needs at least 2 images, got {len(prompts)}'

    # Sizes for pipeline calls: the SenseFlow students' training resolution unless given.
    res = next((r for r in (_student_resolution(Path(s), student_config, student_overrides) for s in students) if r),
               None)
    size = {k: v for k, v in (('height', height or res), ('width', width or res)) if v}

    # Generation: teacher, then each student row (exported / checkpoint students once per sampler).
    plan: list[dict[str, Any]] = [{'name': 'Teacher', 'role': 'teacher', 'path': teacher, 'method': None,
                                   'kwargs': {**size, **(teacher_kwargs or {})}}]
    used: set[str] = {'teacher'}
    for k, path in enumerate(students):
        base = names[k] if names else (Path(path).name or f'student{k}')
        row_methods = methods if _is_senseflow(Path(path)) else [None]
        for m in row_methods:
            name = base + METHOD_SUFFIX.get(m, '')
            folder = _slug(name)
            while folder in used:
                folder += '_'
            used.add(folder)
            plan.append({'name': name, 'role': 'student', 'path': path, 'method': m, 'folder': folder,
                         'kwargs': {**size, **(student_kwargs or {})}})
    nfe: dict[str, Optional[float]] = {}
    for item in plan:
        folder = out_dir / item.get('folder', 'teacher')
        say(f'{item["name"]}: {item["path"]} -> {folder}')
        source = open_source(item['path'], item['name'], method=item['method'], config=student_config,
                             overrides=student_overrides, call_kwargs=item['kwargs'], device=run_device, dtype=dtype)
        try:
            stats = generate_images(source, prompts, folder, seed=seed, batch_size=batch_size, progress=progress)
            for s in range(diversity_seeds if features is not None else 0):
                generate_images(source, prompts[:diversity_prompts], folder / 'diversity' / f'seed{s}',
                                seed=_diversity_seed(seed, s), batch_size=batch_size, progress=progress)
        finally:
            source.close()
            del source
            free_memory()
        nfe[item['name']] = stats['nfe']
        say(f'{item["name"]}: {stats["generated"]} generated, {stats["skipped"]} already there')

    # Scoring.
    if features is not None:
        features = features.to(run_device)
    for s in scorers:
        if hasattr(s, 'model') and hasattr(s.model, 'to'):
            s.model.to(run_device)
            s.device = run_device
    measured = {}
    for item in plan:
        folder = out_dir / item.get('folder', 'teacher')
        measured[item['name']] = _measure(folder, prompts, batch_size, features, scorers, patch_size,
                                          patches_per_image, seed, run_device, skipped, progress, item['name'])
    teacher_m = measured['Teacher']
    diversity = {}
    if diversity_seeds and features is not None:
        for item in plan:
            folder = out_dir / item.get('folder', 'teacher') / 'diversity'
            n_div = min(diversity_prompts, len(prompts))
            feats = [features(load_images(folder / f'seed{s}', list(range(n_div))).to(run_device)).double().cpu()
                     for s in range(diversity_seeds)]
            diversity[item['name']] = within_prompt_diversity(torch.stack(feats, dim=1))
    rows = []
    for item in plan:
        m = measured[item['name']]
        metrics = {s.key: m['scores'].get(s.title) for s in scorers}
        if item['role'] == 'student':
            metrics['fid_t'] = _fid(m['features'], teacher_m['features'], 'FID-T', skipped)
            metrics['patch_fid_t'] = _fid(m['patch_features'], teacher_m['patch_features'], 'Patch FID-T', skipped)
        if diversity:
            metrics['diversity'] = diversity[item['name']] / diversity['Teacher']
        rows.append({'name': item['name'], 'role': item['role'], 'path': str(item['path']), 'method': item['method'],
                     'nfe': nfe[item['name']], 'metrics': {k: v for k, v in metrics.items() if v is not None}})
    notes = [f'{len(prompts)} prompts from {prompts_file}; image i uses seed {seed} + i; FID-T and Patch FID-T '
             'compare each student with the teacher images.']
    if features is not None:
        notes.append(f'features: {features.name}' + ('' if features.standard else
                                                     ' (not the standard FID Inception: not comparable with '
                                                     'published FIDs)'))
        notes.append(f'Patch FID-T: {patches_per_image} crop(s) of {patch_size}x{patch_size} per image at full '
                     'resolution, positions seeded per image index')
    if diversity:
        notes.append(f'Diversity: {diversity_seeds} seeds of the first {min(diversity_prompts, len(prompts))} prompts, '
                     f'mean pairwise distance of their features within a prompt, as a ratio to the teacher\'s '
                     f'({diversity["Teacher"]:.4g})')
    table = format_table(rows, skipped, notes)
    settings = {'teacher': teacher, 'students': list(students), 'prompts': prompts_file, 'num': len(prompts),
                'seed': seed, 'batch_size': batch_size, 'methods': list(methods), 'size': size,
                'fid_features': features.name if features is not None else None, 'patch_size': patch_size,
                'patches_per_image': patches_per_image, 'diversity_seeds': diversity_seeds,
                'diversity_prompts': diversity_prompts}
    md, js = write_results(out_dir, rows, skipped, settings, notes)
    say(f'results written to {md} and {js}\n\n{table}')
    return {'rows': rows, 'skipped': skipped, 'table': table, 'markdown': md, 'json': js}


def _diversity_seed(seed: int, s: int) -> int:
    """Base seed of the ``s``-th diversity image set (image ``i`` uses this + ``i``): away from the main set's."""
    return seed + (s + 1) * 1_000_003


def _kwargs(steps: Optional[int], guidance: Optional[float], max_len: Optional[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if steps is not None:
        out['num_inference_steps'] = steps
    if guidance is not None:
        out['guidance_scale'] = guidance
    if max_len is not None:
        out['max_sequence_length'] = max_len
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line of ``eval.py``; returns an exit code."""
    p = argparse.ArgumentParser(prog='python eval.py', description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--teacher', required=True, help='teacher diffusers pipeline folder')
    p.add_argument('--student', action='append', required=True,
                   help='student: exported pipeline folder, checkpoint .pt, run folder or any pipeline folder '
                        '(repeat for several)')
    p.add_argument('--names', nargs='+', help='row names of the students')
    p.add_argument('--prompts', required=True, help='.txt (one per line), .json (list or COCO captions), .jsonl, .csv')
    p.add_argument('--out', required=True, help='output folder (resumable: existing images are kept)')
    p.add_argument('--num', type=int, help='use the first NUM prompts')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--batch-size', type=int, default=4)
    p.add_argument('--methods', default=DEFAULT_METHOD, help='samplers of SenseFlow students, comma separated: renoise, '
                   'euler')
    p.add_argument('--student-config', help='run YAML of checkpoint students')
    p.add_argument('--student-overrides', nargs='*', default=[], help='dotted key=value overrides of that YAML')
    p.add_argument('--teacher-steps', type=int, default=50)
    p.add_argument('--teacher-guidance', type=float, help='teacher guidance scale (default: the pipeline\'s)')
    p.add_argument('--student-steps', type=int, default=4, help='steps of non-SenseFlow student pipelines')
    p.add_argument('--student-guidance', type=float, help='guidance of non-SenseFlow student pipelines')
    p.add_argument('--max-sequence-length', type=int, help='T5 tokens of pipeline calls')
    p.add_argument('--height', type=int)
    p.add_argument('--width', type=int)
    p.add_argument('--fid-features', default='inception',
                   help='inception, inception-fid, inception-torchvision or random (smoke tests only)')
    p.add_argument('--patch-size', type=int, default=299)
    p.add_argument('--patches-per-image', type=int, default=1)
    p.add_argument('--clip-model', default=DEFAULT_CLIP_MODEL, help="CLIP folder or cached hub id ('none': off)")
    p.add_argument('--pickscore-model', default=DEFAULT_PICKSCORE_MODEL, help="'none': off")
    p.add_argument('--pickscore-processor', default=DEFAULT_PICKSCORE_PROCESSOR)
    p.add_argument('--no-hpsv2', action='store_true')
    p.add_argument('--no-image-reward', action='store_true')
    p.add_argument('--allow-downloads', action='store_true', help='let metric networks download their weights')
    p.add_argument('--device', help='default: cuda if available, else cpu')
    p.add_argument('--dtype', choices=['fp32', 'bf16', 'fp16'], help='default: bf16 on cuda, fp32 on cpu')
    p.add_argument('--no-progress', action='store_true')
    p.add_argument('--diversity-seeds', type=int, default=0, help='within-prompt diversity (mode collapse): this many '
                   'images per prompt of the first --diversity-prompts prompts, as a ratio to the teacher\'s (0: off)')
    p.add_argument('--diversity-prompts', type=int, default=32)
    args = p.parse_args(argv)
    from senseflow_algos.config import ConfigError

    def off(v):
        return None if v is None or v.lower() == 'none' else v

    try:
        evaluate(args.teacher, args.student, args.prompts, args.out, num=args.num, seed=args.seed,
                 batch_size=args.batch_size, methods=[m.strip() for m in args.methods.split(',') if m.strip()],
                 names=args.names, student_config=args.student_config, student_overrides=args.student_overrides,
                 teacher_kwargs=_kwargs(args.teacher_steps, args.teacher_guidance, args.max_sequence_length),
                 student_kwargs=_kwargs(args.student_steps, args.student_guidance, args.max_sequence_length),
                 height=args.height, width=args.width, fid_features=args.fid_features, patch_size=args.patch_size,
                 patches_per_image=args.patches_per_image, clip_model=off(args.clip_model),
                 pickscore_model=off(args.pickscore_model), pickscore_processor=args.pickscore_processor,
                 hpsv2=not args.no_hpsv2, image_reward=not args.no_image_reward, allow_downloads=args.allow_downloads,
                 device=args.device, dtype=args.dtype, progress=not args.no_progress,
                 diversity_seeds=args.diversity_seeds, diversity_prompts=args.diversity_prompts)
    except (EvalError, ConfigError, FileNotFoundError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0
