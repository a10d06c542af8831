"""Step cost of the tiny configs on the CPU: seconds per generator update and forward/backward passes of every
network per generator update, with online encoding and with precomputed embeddings and latents.

The pass counts are compared with the minimum the method needs (computed from the batches' own backward-simulation
draws): a mismatch means a network ran where nothing used it, or fixed data was re-encoded. The teacher is counted in
branch evaluations (rows it ran / batch size), so a CFG teacher's batched conditional + unconditional call counts 2.

    python bench/step_cost.py [--cycles 3] [--config yamls/tiny_flux.yaml ...]

Writes ``bench/results/step_cost.md`` and ``bench/results/step_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from composer.core import Callback, Event
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from senseflow_algos.builders import build_trainer  # noqa: E402
from senseflow_algos.config import load_config  # noqa: E402
from senseflow_algos.optim import TrainingPhase  # noqa: E402

GEN_EVERY = 5


class PassCounter(Callback):
    """Counts forwards (and backwards through outputs that need grad) of named submodules; records generator inputs."""

    def __init__(self, modules: dict[str, torch.nn.Module], batch_size: int = 1, count_rows: tuple[str, ...] = ()):
        self.forward, self.backward, self.draws = Counter(), Counter(), []
        self.batch_size = batch_size
        for name, module in modules.items():
            module.register_forward_hook(self._hook(name, name in count_rows), with_kwargs=True)

    def _hook(self, name, count_rows):

        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs.get('hidden_states', kwargs.get('sample'))
            self.forward[name] += x.shape[0] / self.batch_size if count_rows else 1
            out = output[0] if isinstance(output, (tuple, list)) else getattr(output, 'sample', output)
            if isinstance(out, (tuple, list)):
                out = out[0]
            if torch.is_tensor(out) and out.requires_grad:
                out.register_hook(lambda grad: self.backward.update([name]))

        return hook

    def run_event(self, event, state, logger):
        if event == Event.AFTER_FORWARD and state.outputs is not None and state.model.phase is TrainingPhase.GENERATOR or (
                event == Event.AFTER_FORWARD and not state.model.is_generator_batch()):
            step = state.outputs
            self.draws.append((bool(step.backward_simulation), int(step.anchor_index[0])))


def minimum_passes(draws: list[tuple[bool, int]], precomputed: bool, text_encoders: int,
                   cfg: bool) -> dict[str, tuple[int, int]]:
    """(forwards, backwards) per network that one TTUR cycle needs: 1 generator batch + GEN_EVERY - 1 critic batches.

    ``text_encoders``: how many the family runs per prompt; ``cfg``: its teacher evaluates two branches per query.
    A CFG teacher's constant unconditional prompt is encoded once per run (:func:`constant_prompt_encodings`).
    """
    backsim_calls = sum(k for backsim, k in draws if backsim)
    real_batches = sum(1 for backsim, _ in draws if not backsim)
    n = len(draws)
    return {
        'generator': (backsim_calls + n + 1, 1),  # rollout, one step per batch, ISG's no-grad step; one backward
        'teacher': (2 * (2 if cfg else 1), 0),  # DMD real score + ISG teacher step (x2 branches with CFG)
        'fake_score': (1 + n, n),  # DMD fake score + its own loss every batch
        'vae_encoder': (0 if precomputed else real_batches, 0),
        'vae_decoder': (n, 1),  # generator batch: one decode with grad, reused detached by the critic
        'text_encoders': (0 if precomputed else text_encoders * n, 0),  # each encoder once per batch
        'vfm_backbone': (4 + 3 * (n - 1), 1),  # reference once per batch, fake (x2 on the generator batch), real
        'vfm_heads': (3 + 2 * (n - 1), 1 + 2 * n),
    }


def constant_prompt_encodings(conditioner) -> int:
    """1 when the conditioner encodes a constant unconditional prompt (SD 3.5's empty, Qwen-Image's negative prompt)
    once per run through a :class:`~senseflow_algos.models.families.base.ConstantPromptCache`, else 0 (SDXL's
    unconditional embeddings are zeros; FLUX has none)."""
    from senseflow_algos.models.families.base import ConstantPromptCache

    return int(any(isinstance(v, ConstantPromptCache) for v in vars(conditioner).values()))


def run(config: Path, precomputed: bool, cycles: int) -> dict:
    batch = 2
    overrides = ['trainer.progress_bar=false', f'model.gen_every={GEN_EVERY}', f'trainer.max_duration={GEN_EVERY * cycles}ba',
                 f'dataset.global_batch_size={batch}', 'model.backsim_prob=0.5']
    cfg = load_config(config, overrides)
    trainer = build_trainer(cfg)
    model = trainer.state.model
    cond = model.conditioner
    encoders = [n for n in model.family.text_components if not n.startswith('tokenizer')]
    counter = PassCounter({
        'generator': model.generator, 'teacher': model.teacher, 'fake_score': model.fake_score,
        'vae_encoder': model.vae.encoder, 'vae_decoder': model.vae.decoder, 'vfm_backbone': model.vfm_backbone,
        'vfm_heads': model.discriminator, **{f'text:{n}': getattr(cond, n) for n in encoders}}, batch, ('teacher',))
    trainer.state.callbacks.append(counter)
    loader = trainer.state.train_dataloader
    if precomputed:
        batches = []
        with torch.no_grad():
            for batch, _ in zip(loader, range(GEN_EVERY * cycles)):
                c = cond(batch['prompt'])
                batches.append({**c, 'latents': model.family.encode_images(model.vae, batch['image']),
                                'image': batch['image']})
        counter.forward.clear()
        counter.backward.clear()
        loader = DataLoader(batches, batch_size=None)
    start = time.perf_counter()
    trainer.fit(train_dataloader=loader if precomputed else None)
    seconds = time.perf_counter() - start
    trainer.close()
    fwd = dict(counter.forward)
    fwd['text_encoders'] = sum(fwd.pop(f'text:{n}', 0) for n in encoders)
    bwd = dict(counter.backward)
    measured = {k: (fwd.get(k, 0) / cycles, bwd.get(k, 0) / cycles) for k in sorted(fwd)}
    per_cycle_draws = [counter.draws[i * GEN_EVERY:(i + 1) * GEN_EVERY] for i in range(cycles)]
    minimum = Counter()
    for draws in per_cycle_draws:
        for k, (f, b) in minimum_passes(draws, precomputed, len(encoders), model.family.uses_cfg).items():
            minimum[(k, 'f')] += f / cycles
            minimum[(k, 'b')] += b / cycles
    if not precomputed:  # the unconditional prompt's one encoding per run, spread over the cycles
        minimum[('text_encoders', 'f')] += len(encoders) * constant_prompt_encodings(cond) / cycles
    expected = {k: (minimum[(k, 'f')], minimum[(k, 'b')]) for k in measured}
    return {'family': model.family.name, 'seconds_per_generator_update': seconds / cycles, 'passes': measured,
            'minimum': expected, 'equal_to_minimum': all(abs(a - b) < 1e-9 for k in measured
                                                         for a, b in zip(measured[k], expected[k]))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--cycles', type=int, default=3, help='TTUR cycles (generator updates) to average over')
    parser.add_argument('--out', type=Path, default=REPO / 'bench' / 'results', help='results folder')
    parser.add_argument('--config', type=Path, nargs='+', default=[REPO / 'yamls' / 'tiny_flux.yaml'],
                        help='tiny configs to measure (default: yamls/tiny_flux.yaml)')
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # stable on a shared 2-core machine
    results = {}
    for config in args.config:
        name = Path(config).stem
        results[f'{name}, online'] = run(config, False, args.cycles)
        results[f'{name}, precomputed'] = run(config, True, args.cycles)
    command = 'python bench/step_cost.py ' + ' '.join(argv if argv is not None else sys.argv[1:])
    meta = {'command': command.strip(), 'torch': torch.__version__, 'cpu': platform.processor() or platform.machine(),
            'threads': torch.get_num_threads(), 'gen_every': GEN_EVERY, 'cycles': args.cycles,
            'load_average_1min': os.getloadavg()[0]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / 'step_cost.json').write_text(json.dumps({'meta': meta, 'results': results}, indent=2))
    lines = ['# Step cost, tiny configs (CPU)\n', f'Command: `{meta["command"]}`  ',
             f'torch {meta["torch"]}, {meta["threads"]} thread, TTUR {GEN_EVERY}, {args.cycles} generator updates, '
             f'load average {meta["load_average_1min"]:.1f} at the end (shared 2-core machine).\n']
    for mode, res in results.items():
        lines += [f'## {mode}\n', f'Seconds per generator update: {res["seconds_per_generator_update"]:.3f}  ',
                  f'All pass counts equal the method minimum: **{res["equal_to_minimum"]}**\n',
                  '| network | forwards / update | minimum | backwards / update | minimum |', '|---|---|---|---|---|']
        for name, (f, b) in res['passes'].items():
            mf, mb = res['minimum'][name]
            lines.append(f'| {name} | {f:g} | {mf:g} | {b:g} | {mb:g} |')
        lines.append('')
    for config in args.config:
        name = Path(config).stem
        ratio = (results[f'{name}, online']['seconds_per_generator_update'] /
                 results[f'{name}, precomputed']['seconds_per_generator_update'])
        lines.append(f'{name}: online / precomputed time per generator update: {ratio:.2f}x  ')
    (args.out / 'step_cost.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    return 0 if all(r['equal_to_minimum'] for r in results.values()) else 1


if __name__ == '__main__':
    sys.exit(main())
