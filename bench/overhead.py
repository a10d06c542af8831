"""Composer's own overhead: the same batches through the Composer ``Trainer`` and through a bare PyTorch loop.

Both runs are built exactly as ``train.py`` builds one (``load_config`` + ``validate_config`` + ``build_trainer``),
so they start from the same weights, the same discriminator heads (attached at ``Event.INIT``) and the same global
RNG state. The Composer run calls ``trainer.fit()``. The bare run takes the model, optimizer, algorithms and
dataloader out of its (never fitted) trainer and drives them itself, in Composer 0.32.1's order per batch
(``Trainer._train_loop`` / ``_train_batch`` / ``_train_microbatches`` / ``_train_microbatch`` with one microbatch,
fp32, no grad scaling):

* ``PhasedAdamW.step(closure)``, whose closure per phase runs the algorithms matching ``BEFORE_TRAIN_BATCH`` (IDA),
  ``zero_grad(set_to_none=True)``, ``model(batch)``, ``model.loss``, the algorithms matching ``AFTER_LOSS`` (ISG,
  the VFM discriminator; reversed, as Composer's FILO pass orders *after* events), ``loss['total'] * 1`` (Composer's
  microbatch scaling; a no-op on the bits) and ``backward()``. The optimizer itself clips per role and calls the
  model's ``begin_phase`` / ``end_phase`` / ``end_batch``.
* Composer's constant scheduler sets ``lr = base_lr * 1.0`` each batch: unchanged bits, so the bare loop has no
  scheduler (other schedulers are refused rather than imitated).

No other algorithm of this project matches any other event, and the bare loop runs no callbacks or loggers: the time
they cost is the overhead measured. The script asserts ``torch.equal`` on every trained tensor (generator, fake score,
discriminator heads, ``batches_seen``) of every run, then writes the per-batch time ratio (Composer / bare, after
a warm-up, pooled over ``--repeats`` pairs run in ABBA order) and, measured within each run (so immune to a shared
machine's load drifting between runs), the time spent outside ``optimizer.step``: data loading in both, plus
Composer's events, callbacks and loggers. With ``--ablate``, it also times the Composer run with each callback or
logger switched off in turn. Since other jobs on a shared CPU only add time, it also compares a TTUR cycle built
from each run's fastest batches (minimum and 10th percentile per batch kind), the least disturbed estimate.

    python bench/overhead.py [--batches 30] [--warmup 5] [--repeats 2] [--threads 1] [--ablate]

Writes ``bench/results/overhead.md`` and ``bench/results/overhead.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: The shapes world without its end-of-run report and export (they run once, after the last batch).
SHAPES_OVERRIDES = ('callbacks.shapes_report=null', 'callbacks.export_pipeline=null', 'trainer.autoresume=false')

#: Composer-run variants of ``--ablate``: name -> extra overrides (each switches one thing off).
ABLATIONS = {
    'no speed_monitor': ('callbacks.speed_monitor=null',),
    'no progress_bar': ('trainer.progress_bar=false',),
}


def load_run_config(yaml_path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The validated run config, as ``train.py`` loads it."""
    from senseflow_algos.config import load_config, validate_config

    cfg = load_config(str(yaml_path), list(overrides))
    validate_config(cfg, source=str(yaml_path))
    return cfg


def build(cfg: dict[str, Any], num_batches: int):
    """``build_trainer`` on ``cfg`` with ``trainer.max_duration = num_batches`` batches."""
    from senseflow_algos.builders import build_trainer

    cfg = {**cfg, 'trainer': {**cfg['trainer'], 'max_duration': f'{num_batches}ba'}}
    return build_trainer(cfg)


def trained_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the model's checkpointed tensors: generator, fake score, discriminator heads, ``batches_seen`` (the
    model's state-dict hook drops the frozen teacher, VAE and VFM backbone)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same keys and bit-identical tensors, else an ``AssertionError`` naming the first keys that differ."""
    assert a.keys() == b.keys(), f'different tensors: {sorted(a.keys() ^ b.keys())[:5]}'
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f'{len(differ)} of {len(a)} tensors differ, e.g. {differ[:5]}'


class StepClock:
    """Wraps an optimizer instance's ``step`` to add up the seconds spent inside it (the model's work: all phases'
    forward, loss, algorithms, backward and update) per batch; the bits are unchanged."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.seconds: list[float] = []
        step = optimizer.step

        def timed_step(*args, **kwargs):
            start = time.perf_counter()
            try:
                return step(*args, **kwargs)
            finally:
                self.seconds.append(time.perf_counter() - start)

        optimizer.step = timed_step


def composer_run(cfg: dict[str, Any], num_batches: int) -> tuple[list[float], dict[str, torch.Tensor], list[float]]:
    """``trainer.fit()`` for ``num_batches``. Returns ``perf_counter()`` at each ``BATCH_END``, the trained state and
    the seconds inside ``optimizer.step`` per batch."""
    from composer.core import Callback

    class BatchEndClock(Callback):

        def __init__(self):
            self.marks: list[float] = []

        def batch_end(self, state, logger):
            self.marks.append(time.perf_counter())

    trainer = build(cfg, num_batches)
    clock = BatchEndClock()
    trainer.state.callbacks.append(clock)  # last: its mark follows every other BATCH_END callback
    steps = StepClock(trainer.state.optimizers[0])
    trainer.fit()
    state = trained_state(trainer.state.model)
    trainer.close()
    del trainer
    gc.collect()
    return clock.marks, state, steps.seconds


class _NoLogger:
    """What the algorithms need of Composer's ``Logger`` in the bare loop: a ``log_metrics`` that drops them."""

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        pass


def bare_run(cfg: dict[str, Any], num_batches: int
             ) -> tuple[list[float], dict[str, torch.Tensor], dict[str, torch.Tensor], list[float]]:
    """The same batches without ``Trainer.fit``: a plain loop over the model, optimizer and algorithms (the trainer is
    built only so that set-up, ``Event.INIT`` and seeding are identical; the loop never calls into it).

    Returns ``perf_counter()`` at the end of each batch, the trained state, the state before the first batch and the
    seconds inside ``optimizer.step`` per batch.
    """
    from composer.core import Event

    if (cfg.get('scheduler') or {}).get('name', 'constant') != 'constant':
        raise ValueError('the bare loop reproduces the constant scheduler only (lr unchanged)')
    trainer = build(cfg, num_batches)
    model = trainer.state.model
    optimizer = trainer.state.optimizers[0]
    algorithms = list(trainer.state.algorithms)
    dataloader = trainer.state.train_dataloader
    del trainer  # from here on: no Composer object but the algorithms (driven by hand) and the model's base class
    gc.collect()

    # The algorithms read model, batch, outputs and loss from the state and log through the logger.
    state = SimpleNamespace(model=model, batch=None, outputs=None, loss=None, optimizers=[optimizer])
    logger = _NoLogger()

    def run_algorithms(event: Event) -> None:
        matched = [a for a in algorithms if a.match(event, state)]
        for algorithm in (reversed(matched) if event.is_after_event else matched):  # Composer's FILO pass
            algorithm.apply(event, state, logger)

    def closure() -> float:
        run_algorithms(Event.BEFORE_TRAIN_BATCH)
        optimizer.zero_grad(set_to_none=True)
        state.outputs = model(state.batch)
        state.loss = model.loss(state.outputs, state.batch)
        run_algorithms(Event.AFTER_LOSS)
        loss = state.loss['total']
        loss.mul_(1.0)  # Composer scales by microbatch / batch size (one microbatch): kept for identical graphs
        loss.backward()
        return loss.item()

    initial = trained_state(model)
    steps = StepClock(optimizer)
    marks = []
    model.train()
    batches = iter(dataloader)
    for _ in range(num_batches):
        state.batch = next(batches)
        optimizer.step(closure)
        marks.append(time.perf_counter())
    return marks, trained_state(model), initial, steps.seconds


def per_batch(marks: Sequence[float], warmup: int) -> list[float]:
    """Seconds of each batch after the first ``warmup`` (differences of consecutive end-of-batch marks)."""
    return [b - a for a, b in zip(marks[warmup - 1:-1], marks[warmup:])]


def summary(seconds: Sequence[float]) -> dict[str, float]:
    """Median, mean and count of per-batch seconds."""
    return {'median_s': statistics.median(seconds), 'mean_s': statistics.fmean(seconds), 'n': len(seconds)}


def timed(marks: Sequence[float], steps: Sequence[float], warmup: int) -> dict[str, list[float]]:
    """Per timed batch: ``batch`` seconds (end-of-batch to end-of-batch), ``step`` seconds inside
    ``optimizer.step`` and ``outside`` = batch - step (data loading and, under Composer, its events and logging)."""
    batch = per_batch(marks, warmup)
    step = list(steps[warmup:len(marks)])
    return {'batch': batch, 'step': step, 'outside': [b - t for b, t in zip(batch, step)]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--yaml', default='yamls/shapes.yaml')
    parser.add_argument('--batches', type=int, default=30, help='timed batches per run (after the warm-up)')
    parser.add_argument('--warmup', type=int, default=5, help='batches before timing (>= 1)')
    parser.add_argument('--repeats', type=int, default=2,
                        help='Composer/bare run pairs, in ABBA order so that a drifting machine load cancels')
    parser.add_argument('--threads', type=int, default=1, help='torch intra-op threads (0: torch default)')
    parser.add_argument('--ablate', action='store_true', help='also time Composer with each callback/logger off')
    parser.add_argument('--out', default=str(REPO / 'bench' / 'results' / 'overhead'))
    parser.add_argument('overrides', nargs='*', help='extra dotted.key=value overrides (all runs)')
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error('--warmup must be >= 1 (the first batch has no start mark)')
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    overrides = [*SHAPES_OVERRIDES, *args.overrides]
    cfg = load_run_config(args.yaml, overrides)
    total = args.warmup + args.batches

    # The process's first run is slower throughout (lazy initialisation, allocator growth): an untimed one first.
    bare_run(cfg, args.warmup)
    runs: dict[str, list[dict[str, list[float]]]] = {'composer': [], 'bare': []}
    reference = None
    for r in range(args.repeats):
        for kind in (('composer', 'bare') if r % 2 == 0 else ('bare', 'composer')):
            if kind == 'composer':
                marks, state, steps = composer_run(cfg, total)
            else:
                marks, state, _, steps = bare_run(cfg, total)
            reference = state if reference is None else reference
            assert_identical(reference, state)  # every run, either way, ends with the same bits
            runs[kind].append(timed(marks, steps, args.warmup))
    result: dict[str, Any] = {
        'command': 'python bench/overhead.py ' + shlex.join(argv if argv is not None else sys.argv[1:]),
        'yaml': args.yaml,
        'overrides': overrides,
        'batches_timed': args.batches,
        'warmup': args.warmup,
        'repeats': args.repeats,
        'gen_every': cfg['model'].get('gen_every', 5),
        'threads': torch.get_num_threads(),
        'versions': _versions(),
        'identical_weights': True,
        'trained_tensors': len(reference),
    }
    for kind, kind_runs in runs.items():
        result[kind] = {part: summary([x for run in kind_runs for x in run[part]]) for part in ('batch', 'step',
                                                                                             'outside')}
        result[kind]['per_repeat_median_s'] = [statistics.median(run['batch']) for run in kind_runs]
        result[kind]['seconds'] = [run['batch'] for run in kind_runs]
    c, b = result['composer'], result['bare']
    result['ratio_median'] = c['batch']['median_s'] / b['batch']['median_s']
    result['ratio_mean'] = c['batch']['mean_s'] / b['batch']['mean_s']
    result['ratio_per_repeat'] = [x / y for x, y in zip(c['per_repeat_median_s'], b['per_repeat_median_s'])]
    # Drift-proof estimate: the extra time outside the model's work, measured within each run.
    result['outside_overhead'] = (c['outside']['median_s'] - b['outside']['median_s']) / b['batch']['median_s']
    # Other jobs on a shared machine only ever add time: the fastest batches of each kind are the least disturbed.
    gen_every = result['gen_every']
    for stat in ('min', 'p10'):
        cycle = {}
        for kind, kind_runs in runs.items():
            gen = [x for run in kind_runs for j, x in enumerate(run['batch']) if (args.warmup + j) % gen_every == 0]
            critic = [x for run in kind_runs for j, x in enumerate(run['batch']) if (args.warmup + j) % gen_every]
            pick = min if stat == 'min' else (lambda xs: statistics.quantiles(xs, n=10)[0])
            result[kind][f'generator_batch_{stat}_s'], result[kind][f'critic_batch_{stat}_s'] = pick(gen), pick(critic)
            cycle[kind] = pick(gen) + (gen_every - 1) * pick(critic)
        result[f'ratio_cycle_{stat}'] = cycle['composer'] / cycle['bare']
    if args.ablate:
        result['ablations'] = {}
        for name, extra in ABLATIONS.items():
            marks, _, steps = composer_run(load_run_config(args.yaml, [*overrides, *extra]), total)
            t = timed(marks, steps, args.warmup)
            s = {part: summary(t[part]) for part in ('batch', 'step', 'outside')}
            # What switching it off saves per batch, as a share of the bare loop's batch time.
            s['share'] = (c['outside']['median_s'] - s['outside']['median_s']) / b['batch']['median_s']
            result['ablations'][name] = s
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix('.json').write_text(json.dumps(result, indent=2) + '\n')
    out.with_suffix('.md').write_text(_markdown(result))
    print(_markdown(result))
    return 0


def _versions() -> dict[str, str]:
    import composer

    return {'python': platform.python_version(), 'torch': torch.__version__, 'composer': composer.__version__,
            'platform': platform.platform(), 'processor': platform.processor() or platform.machine()}


def _markdown(r: dict[str, Any]) -> str:
    c, b = r['composer'], r['bare']
    lines = [
        '# Composer overhead: `Trainer.fit` vs a bare PyTorch loop, same batches',
        '',
        f'Command: `{r["command"]}`',
        '',
        f'Config: `{r["yaml"]}` with `{" ".join(r["overrides"])}`; per run {r["warmup"]} warm-up batches, then '
        f'{r["batches_timed"]} timed (generator phase every {r["gen_every"]}); {r["repeats"]} Composer/bare pairs '
        f'in ABBA order after an untimed warm-up run; torch intra-op threads: {r["threads"]}. Versions: '
        + ', '.join(f'{k} {v}' for k, v in r['versions'].items()) + '.',
        '',
        f'Every run ends with bit-identical weights (`torch.equal` on all {r["trained_tensors"]} trained tensors: '
        'generator, fake score, discriminator heads, `batches_seen`).',
        '',
        '"step" is the time inside `PhasedAdamW.step(closure)` (all phases: forward, loss, algorithms, backward, '
        'update); "outside" is the rest of the batch (data loading; under Composer also its events, callbacks and '
        'loggers). Seconds per batch, pooled over the repeats:',
        '',
        '| run | median batch | mean batch | median step | median outside | min generator batch | '
        'min critic batch | p10 generator batch | p10 critic batch |',
        '|---|---|---|---|---|---|---|---|---|',
        *(f'| {name} | {x["batch"]["median_s"]:.4f} | {x["batch"]["mean_s"]:.4f} | {x["step"]["median_s"]:.4f} | '
          f'{x["outside"]["median_s"]:.4f} | {x["generator_batch_min_s"]:.4f} | {x["critic_batch_min_s"]:.4f} | '
          f'{x["generator_batch_p10_s"]:.4f} | {x["critic_batch_p10_s"]:.4f} |'
          for name, x in (('Composer `Trainer.fit`', c), ('bare loop', b))),
        '',
        f'**Ratio Composer / bare: {r["ratio_median"]:.3f} (medians), {r["ratio_mean"]:.3f} (means)**; per repeat '
        '(medians): ' + ', '.join(f'{x:.3f}' for x in r['ratio_per_repeat']) + '.',
        '',
        f'Composer\'s extra time outside the step (median outside, Composer - bare, over the bare median batch), '
        f'measured within each run and so immune to the machine\'s load drifting between runs: '
        f'**{100 * r["outside_overhead"]:.2f}%**.',
        '',
        'Other jobs on the shared CPU only add time, so the least disturbed batches of each kind compare the work '
        f'itself: ratio of a TTUR cycle (one generator batch + {r["gen_every"] - 1} critic batches) built from '
        f'each run\'s fastest batches: **{r["ratio_cycle_min"]:.3f}** (minimum), {r["ratio_cycle_p10"]:.3f} '
        '(10th percentile).',
    ]
    if r.get('ablations'):
        lines += ['', 'Composer runs with one callback/logger switched off (one run each); "share" is what switching '
                  'it off saves outside the step, over the bare median batch:', '',
                  '| Composer variant | median batch | median outside | share |', '|---|---|---|---|']
        for name, s in r['ablations'].items():
            lines.append(f'| {name} | {s["batch"]["median_s"]:.4f} | {s["outside"]["median_s"]:.4f} | '
                         f'{100 * s["share"]:.2f}% |')
    return '\n'.join(lines) + '\n'


if __name__ == '__main__':
    sys.exit(main())
