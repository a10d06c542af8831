"""Peak host RAM of an export, before (the whole ``DMDModel`` rebuilt) and after (:mod:`senseflow_algos.restore`:
the generator alone, read from the checkpoint).

A FLUX-architecture teacher whose transformer is large enough for its weights to dominate the Python/torch baseline
(random weights, bf16 on disk as FLUX.1-dev ships; the tiny pipeline's CLIP, T5 and VAE) is saved as a diffusers folder
(``bench/lean_start.py``'s ``save_pipeline``). A run folder is laid out as training leaves it: ``run_config.yaml``
(``yamls/tiny_flux.yaml`` with ``model.pretrained`` at that folder and the production dtypes, generator fp32, teacher
and encoders bf16), an unsharded Composer checkpoint ``ep0-ba1-rank0.pt`` (``state.model`` with the generator and the
fake score in fp32) and the same model state as a sharded torch.distributed.checkpoint folder ``ep0-ba2/``. Each export
runs in a fresh process, which reports its peak resident set size (``VmHWM`` of ``/proc/self/status``):

* old: what ``export.py`` ran before: ``build_model`` (teacher, generator, fake score, VAE, text encoders), the
  generator's state loaded from the ``.pt`` (memory-mapped), ``export_pipeline``;
* new: ``python export.py <checkpoint> <out>`` (``restore_student`` + ``export_pipeline``) on the ``.pt`` and on the
  sharded folder.

    python bench/export_memory.py [--layers 2 --single-layers 4 --heads 8]

Writes ``bench/results/export_memory.md`` and ``bench/results/export_memory.json``.
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
sys.path.insert(0, str(REPO / 'bench'))

OVERRIDES = ('model.tiny=false', 'model.dtype=fp32', 'model.teacher_dtype=bf16', 'model.encoder_dtype=bf16',
             'algorithms.vfm_discriminator=null')


def _status(key: str) -> int:
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(key + ':'):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


# -- child: one export ----------------------------------------------------------------------------------------------


def child(mode: str, checkpoint: str, out: str) -> None:
    """One export in this process; prints ``PEAK <json>``."""
    start = time.time()
    if mode == 'baseline':  # the imports, the VAE and the text encoders: what every export holds besides weights
        import senseflow_algos.builders  # noqa: F401
        import senseflow_algos.export  # noqa: F401
        from senseflow_algos.config import load_config
        from senseflow_algos.models.factory import build_encoders

        model = load_config(Path(checkpoint).parent / 'run_config.yaml')['model']
        build_encoders('flux', pretrained=model['pretrained'], dtype='fp32', encoder_dtype=model['encoder_dtype'])
    elif mode == 'old':
        import torch

        from senseflow_algos.builders import build_model
        from senseflow_algos.config import load_config, run_seed
        from senseflow_algos.export import export_pipeline

        cfg = load_config(Path(checkpoint).parent / 'run_config.yaml')
        model = build_model(cfg['model'], seed=run_seed(cfg))
        ckpt = torch.load(checkpoint, map_location='cpu', weights_only=False, mmap=True)
        state = {k[len('generator.'):]: v for k, v in ckpt['state']['model'].items() if k.startswith('generator.')}
        model.generator.load_state_dict(state, strict=True)
        del ckpt, state
        export_pipeline(model, out)
    else:
        from senseflow_algos.export import main

        assert main([checkpoint, out]) == 0
    print('PEAK ' + json.dumps({'VmHWM': _status('VmHWM'), 'wall_s': time.time() - start}), flush=True)


def run_child(mode: str, checkpoint: Path, out: Path) -> dict:
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(REPO)}
    proc = subprocess.run([sys.executable, __file__, '--child', mode, str(checkpoint), str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-4000:])
    line = next(x for x in proc.stdout.splitlines() if x.startswith('PEAK '))
    return json.loads(line[5:])


# -- parent ---------------------------------------------------------------------------------------------------------


def make_run(folder: Path, pipeline: Path) -> dict:
    """``run_config.yaml``, ``ep0-ba1-rank0.pt`` and the sharded ``ep0-ba2/`` of a run on the teacher ``pipeline``."""
    import torch
    import torch.distributed.checkpoint as dcp
    from diffusers import FluxTransformer2DModel
    from omegaconf import OmegaConf

    from senseflow_algos.config import load_config
    from senseflow_algos.models.families.flux import without_guidance_embedding

    folder.mkdir(parents=True)
    cfg = load_config(REPO / 'yamls' / 'tiny_flux.yaml', [*OVERRIDES, f'model.pretrained={pipeline}'])
    (folder / 'run_config.yaml').write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    teacher = FluxTransformer2DModel.from_pretrained(str(pipeline), subfolder='transformer')
    student = without_guidance_embedding(teacher, torch.float32)
    del teacher
    model = {f'{net}.{k}': v.clone() for net in ('generator', 'fake_score') for k, v in student.state_dict().items()}
    model['batches_seen'] = torch.tensor(1)
    torch.save({'state': {'model': model, 'run_name': 'export-memory'}}, folder / 'ep0-ba1-rank0.pt')
    dcp.save({'state': {'model': model}}, checkpoint_id=str(folder / 'ep0-ba2'), no_dist=True)
    return {'checkpoint_bytes': (folder / 'ep0-ba1-rank0.pt').stat().st_size}


def _gb(n: float) -> str:
    return f'{n / 1e9:.2f}'


def write_report(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / 'export_memory.json').write_text(json.dumps(result, indent=2) + '\n')
    w = result['weights']
    base = next(iter(result['runs'].values()))['VmHWM']
    rows = [f'| {name} | {_gb(r["VmHWM"])} GB | {_gb(r["VmHWM"] - base)} GB | {r["wall_s"]:.1f} s |'
            for name, r in result['runs'].items()]
    text = f"""# Peak host RAM of an export: the whole model rebuilt vs the generator alone

Command: `{result['command']}` ({result['machine']}, torch {result['torch']}, Composer {result['composer']}, load
average {result['load_average']:.1f} at the start).

Teacher: FLUX architecture, {result['shape']}, random weights; {w['transformer_params'] / 1e6:.0f} M transformer
parameters (teacher {_gb(w['teacher_bytes'])} GB in bf16), generator and fake score {_gb(w['generator_bytes'])} GB each
in fp32, VAE and text encoders {_gb(w['encoder_bytes'])} GB (tiny). Checkpoint: {_gb(result['checkpoint_bytes'])} GB
(generator and fake score in fp32), unsharded `.pt` and the same state sharded.

| export | peak RSS of the process | above the baseline | wall |
|---|---|---|---|
{chr(10).join(rows)}

"old" is what `export.py` ran before `senseflow_algos/restore.py`: `build_model` (teacher, generator, fake score,
VAE and text encoders built and loaded) then the generator's weights from the checkpoint. "new" reads the generator
alone (memory-mapped `.pt`, or the shards into tensors allocated once) into a generator built on the meta device, and
the VAE and text encoders from the teacher folder; the teacher and the fake score are never built. Peak RSS counts the
memory-mapped checkpoint pages the process touched. The baseline row is a process that imports the same modules and
loads only the VAE and text encoders; above it, the new export holds about one fp32 generator, the old one the teacher,
generator, fake score and the generator's checkpoint pages. At FLUX.1-dev's size (11.9 B parameters) the old path holds the
bf16 teacher (23.8 GB) and two fp32 transformers (47.6 GB each) before writing; the new one holds one fp32 generator
(47.6 GB, less in bf16) plus the VAE and text encoders.
"""
    (out_dir / 'export_memory.md').write_text(text)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == '--child':
        child(*argv[1:4])
        return
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--layers', type=int, default=2, help='double-stream blocks (FLUX.1-dev: 19)')
    parser.add_argument('--single-layers', type=int, default=4, help='single-stream blocks (FLUX.1-dev: 38)')
    parser.add_argument('--heads', type=int, default=8, help='attention heads of dim 128 (FLUX.1-dev: 24)')
    parser.add_argument('--out', default=str(REPO / 'bench' / 'results'))
    args = parser.parse_args(argv)

    import composer
    import torch
    from lean_start import save_pipeline

    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        pipeline, run = Path(tmp) / 'teacher', Path(tmp) / 'run'
        sizes = save_pipeline(pipeline, args.layers, args.single_layers, args.heads)
        made = make_run(run, pipeline)
        runs = {}
        for name, mode, checkpoint in (('baseline: imports, VAE and text encoders only', 'baseline',
                                        run / 'ep0-ba1-rank0.pt'),
                                       ('old: build_model + load (.pt)', 'old', run / 'ep0-ba1-rank0.pt'),
                                       ('new: export.py (.pt)', 'new', run / 'ep0-ba1-rank0.pt'),
                                       ('new: export.py (sharded folder)', 'new', run / 'ep0-ba2')):
            runs[name] = run_child(mode, checkpoint, Path(tmp) / f'out-{len(runs)}')
            print(f'{name}: peak RSS {_gb(runs[name]["VmHWM"])} GB, {runs[name]["wall_s"]:.1f} s', flush=True)
    result = {
        'command': ' '.join(['python bench/export_memory.py', *argv]),
        'torch': torch.__version__, 'composer': composer.__version__,
        'machine': f'{platform.machine()}, {os.cpu_count()} cores', 'load_average': load,
        'shape': f'{args.layers} double + {args.single_layers} single blocks, {args.heads} heads x 128',
        'weights': {'transformer_params': sizes['transformer_params'],
                    'teacher_bytes': 2 * sizes['transformer_params'],
                    'generator_bytes': 4 * sizes['student_params'],
                    'encoder_bytes': 2 * sizes['encoder_params']},
        'checkpoint_bytes': made['checkpoint_bytes'],
        'runs': runs,
    }
    write_report(result, Path(args.out))
    print((Path(args.out) / 'export_memory.md').read_text())


if __name__ == '__main__':
    main()
