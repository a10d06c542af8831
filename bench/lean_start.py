"""Host RAM at start-up, old start vs lean start: peak RSS of each of 2 gloo CPU processes under Composer's FSDP.

A FLUX-architecture pipeline whose transformer is large enough for its weights to dominate the Python/torch baseline
(random weights; the tiny pipeline's CLIP, T5 and VAE) is saved to a temporary folder as a diffusers pipeline, its
transformer in bf16 as FLUX.1-dev ships. Then ``train.py``'s own path (config, validation, preflight,
``builders.build_trainer``, ``fit``) runs in 2 processes with ``model.pretrained`` pointing at it and the production
dtypes (teacher and encoders bf16, generator and fake score fp32), once with the old start (``SENSEFLOW_LEAN_START=0``:
every rank loads every network) and once with the lean start (rank 0 loads the teacher, generator and fake score; the
other rank builds them on the meta device and receives its shards). Each rank reports its peak resident set size
(``VmHWM`` of ``/proc/self/status``) once the Trainer is built (start-up) and at the end of the run (1 training batch).

    python bench/lean_start.py [--fsdp 2 1] [--layers 4 --single-layers 6 --heads 8]

Writes ``bench/results/lean_start.md`` and ``bench/results/lean_start.json``. FSDP1 runs on CPU processes with the
patches of ``tests/distributed/lean_start_worker.py`` (Composer's FSDP1 wants CUDA devices).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: When each rank's peak RSS is read: model built (weights loaded, before FSDP), Trainer built (wrapped), end of run.
PHASES = ('built', 'startup', 'end')
OVERRIDES = (
    'model.tiny=false', 'model.dtype=fp32', 'model.teacher_dtype=bf16', 'model.encoder_dtype=bf16',
    'model.family_kwargs={max_sequence_length: 16}',  # short T5 prompts: the training batch stays cheap on a CPU
    'trainer.max_duration=1ba', 'trainer.progress_bar=false',
    'trainer.parallelism_config={fsdp: {state_dict_type: sharded, sharding_strategy: FULL_SHARD, use_orig_params: '
    'true, activation_checkpointing: true, activation_checkpointing_reentrant: false}}',
)


def _status(key: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` in bytes."""
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(key + ':'):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


# -- worker: one rank of train.py ---------------------------------------------------------------------------------


def _memory() -> dict[str, int]:
    return {'VmHWM': _status('VmHWM'), 'VmRSS': _status('VmRSS')}


def worker(out: Path, argv: list[str]) -> int:
    """``senseflow_algos.train.main(argv)`` with the peak RSS recorded after ``build_model`` (before FSDP wraps the
    model), after ``build_trainer`` and at the end."""
    if os.environ.get('FSDP_VERSION') != '2':
        import tests.distributed.lean_start_worker  # noqa: F401  (FSDP1 on CPU processes)
    import senseflow_algos.builders as builders
    from senseflow_algos.train import main

    rank, record = int(os.environ['RANK']), {}
    build_model, build_trainer = builders.build_model, builders.build_trainer

    def recording_build_model(*args, **kwargs):
        model = build_model(*args, **kwargs)
        record['built'] = _memory()
        return model

    def recording_build_trainer(cfg):
        trainer = build_trainer(cfg)
        record['startup'] = _memory()
        return trainer

    builders.build_model, builders.build_trainer = recording_build_model, recording_build_trainer
    code = main(argv)
    record['end'] = _memory()
    (out / f'rank{rank}.json').write_text(json.dumps(record))
    return code


# -- driver -------------------------------------------------------------------------------------------------------


def save_pipeline(folder: Path, layers: int, single_layers: int, heads: int) -> dict:
    """The tiny FLUX pipeline with a large random transformer (bf16 on disk, heads of dim 128 as FLUX.1-dev's).
    Returns parameter counts."""
    import torch
    from diffusers import FluxTransformer2DModel

    from senseflow_algos.models.tiny import build_tiny_flux_pipeline

    pipe = build_tiny_flux_pipeline(seed=0)
    config = dict(pipe.transformer.config)
    config.update(num_layers=layers, num_single_layers=single_layers, num_attention_heads=heads,
                  attention_head_dim=128, axes_dims_rope=(16, 56, 56))
    torch.manual_seed(0)
    pipe.transformer = torch.nn.Module.to(FluxTransformer2DModel.from_config(config), torch.bfloat16).eval()
    pipe.save_pretrained(folder, safe_serialization=True)
    params = sum(p.numel() for p in pipe.transformer.parameters())
    guidance = sum(p.numel() for n, p in pipe.transformer.named_parameters() if '.guidance_embedder.' in n)
    encoders = sum(p.numel() for m in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2) for p in m.parameters())
    return {'transformer_params': params, 'student_params': params - guidance, 'encoder_params': encoders,
            'axes_dims_rope': list(config['axes_dims_rope'])}


def launch(folder: Path, out: Path, lean: bool, fsdp: str) -> tuple[dict, float]:
    out.mkdir(parents=True)
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'FSDP_VERSION': fsdp, 'SENSEFLOW_LEAN_START': '1' if lean else '0'}
    cmd = [sys.executable, '-m', 'composer.cli.launcher', '-n', '2', 'bench/lean_start.py', '--worker', str(out),
           'yamls/tiny_flux.yaml', f'model.pretrained={folder}', *OVERRIDES]
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f'{" ".join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}')
    return {str(r): json.loads((out / f'rank{r}.json').read_text()) for r in (0, 1)}, time.time() - start


def _gb(n: float) -> str:
    return f'{n / 1e9:.2f}'


def write_report(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / 'lean_start.json').write_text(json.dumps(result, indent=2) + '\n')
    w = result['weights']
    lines = [
        '# Lean start: peak host RAM of 2 CPU processes under Composer FSDP, old start vs lean start', '',
        f'Command: `{result["command"]}`  ',
        f'torch {result["torch"]}, Composer {result["composer"]}, {result["machine"]}; load average '
        f'{result["load_average"]:.1f} at the end (shared machine).', '',
        f'FLUX-architecture transformer of {w["transformer_params"] / 1e6:.0f}M parameters ({result["shape"]}), '
        'random weights, saved in bf16; tiny CLIP, T5 and VAE. Run through `train.py`\'s path (yamls/tiny_flux.yaml '
        'with `model.pretrained` set, teacher and encoders bf16, generator and fake score fp32, 1 training batch).', '',
        f'Weights for reference: teacher {_gb(w["teacher_bytes"])} GB + generator {_gb(w["generator_bytes"])} GB + '
        f'fake score {_gb(w["fake_score_bytes"])} GB = **{_gb(w["transformers_bytes"])} GB per full copy** of the '
        f'three transformers (text encoders and VAE: {w["encoder_bytes"] / 1e6:.1f} MB).', '',
        'Peak RSS (`VmHWM`, GB) of each rank, read when the model is built (weights loaded, before FSDP wraps it), '
        'when the Trainer is built (start-up done: wrapped, shards received) and at the end of the run (after 1 '
        'training batch); "both" sums the two ranks:', '',
        '| FSDP | start | built r0 | built r1 | **built both** | start-up r0 | start-up r1 | **start-up both** | '
        'end r0 | end r1 | wall s |',
        '|---|---|---|---|---|---|---|---|---|---|---|',
    ]

    def peaks(run: dict, phase: str) -> list[int]:
        return [run['ranks'][k][phase]['VmHWM'] for k in ('0', '1')]

    for fsdp, runs in result['runs'].items():
        for start, run in runs.items():
            b, s, e = (peaks(run, phase) for phase in PHASES)
            lines.append(f'| {fsdp} | {start} | {_gb(b[0])} | {_gb(b[1])} | **{_gb(sum(b))}** | {_gb(s[0])} | '
                         f'{_gb(s[1])} | **{_gb(sum(s))}** | {_gb(e[0])} | {_gb(e[1])} | {run["wall_s"]:.0f} |')
    lines += ['', 'Host RAM saved by the lean start (sum over both ranks, old minus lean), in GB and in full copies of '
              'the three transformers:', '']
    for fsdp, runs in result['runs'].items():
        for phase in PHASES[:2]:
            saved = sum(peaks(runs['old'], phase)) - sum(peaks(runs['lean'], phase))
            lines.append(f'- FSDP{fsdp}, {phase}: {_gb(saved)} GB ({saved / w["transformers_bytes"]:.2f} copies)')
    lines += [
        '', 'Reading the table: "built" is what loading costs each rank. With the lean start rank 1 holds no weight '
        'there (its transformers are on the meta device), while with the old start every rank holds a full copy. '
        '"start-up" adds FSDP wrapping: on these CPU processes each rank\'s shard (half of every transformer) and '
        'FSDP\'s copies stay in host RAM, where on GPUs they go to device memory, so rank 1\'s lean start-up peak is '
        'its baseline plus its shard. The end-of-run peaks are dominated by the CPU-resident training state '
        '(sharded fp32 weights, gradients, Adam moments and all-gathered blocks), which a GPU run keeps on the '
        'device; the start is not what sets them.', '']
    (out_dir / 'lean_start.md').write_text('\n'.join(lines))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == '--worker':
        sys.exit(worker(Path(argv[1]), argv[2:]))
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--fsdp', nargs='+', default=['2', '1'], choices=['1', '2'], help='FSDP versions to run')
    parser.add_argument('--layers', type=int, default=4, help='double-stream blocks (FLUX.1-dev: 19)')
    parser.add_argument('--single-layers', type=int, default=6, help='single-stream blocks (FLUX.1-dev: 38)')
    parser.add_argument('--heads', type=int, default=8, help='attention heads of dim 128 (FLUX.1-dev: 24)')
    parser.add_argument('--out', default=str(REPO / 'bench' / 'results'))
    args = parser.parse_args(argv)

    import composer
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / 'pipeline'
        sizes = save_pipeline(folder, args.layers, args.single_layers, args.heads)
        runs = {}
        for fsdp in args.fsdp:
            runs[fsdp] = {}
            for start in ('old', 'lean'):
                ranks, wall = launch(folder, Path(tmp) / f'fsdp{fsdp}-{start}', start == 'lean', fsdp)
                runs[fsdp][start] = {'ranks': ranks, 'wall_s': wall}
                print(f'FSDP{fsdp} {start}: start-up peak RSS ' + ', '.join(
                    f'rank {r} {_gb(v["startup"]["VmHWM"])} GB' for r, v in ranks.items()), flush=True)
    weights = {
        'transformer_params': sizes['transformer_params'],
        'teacher_bytes': 2 * sizes['transformer_params'],
        'generator_bytes': 4 * sizes['student_params'],
        'fake_score_bytes': 4 * sizes['student_params'],
        'encoder_bytes': 2 * sizes['encoder_params'],
    }
    weights['transformers_bytes'] = weights['teacher_bytes'] + weights['generator_bytes'] + weights['fake_score_bytes']
    result = {
        'command': ' '.join(['python bench/lean_start.py', *argv]),
        'torch': torch.__version__, 'composer': composer.__version__,
        'machine': f'{platform.machine()}, {os.cpu_count()} cores',
        'load_average': os.getloadavg()[0],
        'shape': f'{args.layers} double + {args.single_layers} single blocks, {args.heads} heads x 128, '
                 f'rope axes {sizes["axes_dims_rope"]}',
        'weights': weights,
        'runs': runs,
    }
    write_report(result, Path(args.out))
    print((Path(args.out) / 'lean_start.md').read_text())


if __name__ == '__main__':
    main()
