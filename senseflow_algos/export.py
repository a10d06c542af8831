"""Export a distilled generator to a diffusers pipeline folder that samples like the in-repo 4-step sampler.

The folder holds the family's diffusers pipeline (``ModelFamily.pipeline_class``: the teacher's VAE, text encoders
and tokenizers, the student as its network), a scheduler configured for the sampler (``ModelFamily.export_scheduler``,
which checks that it steps exactly through the anchors), a bare ``generator.safetensors`` of the student's weights and
``senseflow_export.json`` (anchors, sampler and the exact call arguments that reproduce
:func:`senseflow_algos.sampling.sample`). A ``model.lora`` student also gets ``lora/``, a diffusers LoRA file for the
teacher's own pipeline (:mod:`senseflow_algos.export_lora`). Nothing here names a family: what differs between
teachers is a member of :class:`~senseflow_algos.models.families.ModelFamily`.

Randomness: the pipeline draws its initial noise from ``generator`` but the scheduler's re-noise noise from the
device's global RNG (``step`` is called without a generator); pass
:func:`senseflow_algos.sampling.seeded_default_rng` to both to get identical samples.

Command line: ``python export.py <run folder | checkpoint | object-store URI> <out folder> [--config yamls/x.yaml
overrides...]``; the checkpoint is read by :mod:`senseflow_algos.restore` (unsharded ``.pt``, FSDP1 / FSDP2 sharded
folders, ``.safetensors``; generator weights only).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch

from senseflow_algos.dtypes import DTYPES
from senseflow_algos.export_lora import fused_copy, has_lora, write_lora_export
from senseflow_algos.models.families.base import ExportError
from senseflow_algos.sampling import DEFAULT_METHOD, METHODS, SamplingComponents

if TYPE_CHECKING:
    from senseflow_algos.models.dmd import DMDModel

__all__ = [
    'EXPORT_INFO',
    'BARE_WEIGHTS',
    'ExportError',
    'export_pipeline',
    'export_checkpoint',
    'load_export_info',
    'pipeline_call_kwargs',
    'sampling_command',
    'sampling_components_from_pipeline',
    'main',
]

#: Metadata file written next to ``model_index.json``.
EXPORT_INFO = 'senseflow_export.json'
#: The bare generator weights (the diffusers network's state dict).
BARE_WEIGHTS = 'generator.safetensors'


def export_pipeline(model: 'DMDModel', out: str | Path, method: str = DEFAULT_METHOD, dtype: Optional[str] = None,
                    bare: bool = True, source: Optional[str] = None) -> Path:
    """Write the generator of a DMD model as a diffusers pipeline folder.

    Args:
        model (DMDModel): The model; its generator, VAE, conditioner, anchors and teacher scheduler config are used.
        out (str | Path): The output folder (created; existing files are overwritten).
        method (str): The sampler the scheduler reproduces: ``'renoise'`` (default) or ``'euler'``.
        dtype (str, optional): ``fp32``, ``bf16`` or ``fp16`` for the saved transformer. Default: as trained. The
            live model is never changed (a copy is cast).

    A ``model.lora`` generator is exported with its adapters merged into a copy of the base, and as a diffusers LoRA
    file in ``<out>/lora`` for the teacher's own pipeline (:mod:`senseflow_algos.export_lora`).
        bare (bool): Also write ``generator.safetensors``. Default: ``True``.
        source (str, optional): Where the weights came from (recorded in ``senseflow_export.json``).

    Returns:
        Path: The folder, loadable with ``DiffusionPipeline.from_pretrained``.
    """
    family = model.family
    if method not in METHODS:
        raise ExportError(f'sampler method={method!r} is not known; choose one of {list(METHODS)}')
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f'dtype={dtype!r} is not one of {sorted(DTYPES)}')
    if model.conditioner is None or getattr(model.vae, 'encoder', True) is None:
        raise ExportError('a pipeline needs the text encoders and the whole VAE, but this model was built without them '
                          '(model.text_encoders / model.vae_encoder = false); rebuild it with both set to true')
    out = Path(out)
    steps = family.export_scheduler(model.scheduler_config, model.sigmas, model.latent_shape, method)
    scheduler = steps.scheduler
    net = lora_net = model.generator
    if has_lora(lora_net):  # a model.lora student: the pipeline gets a fused copy, <out>/lora the adapter
        net = fused_copy(lora_net, DTYPES[dtype] if dtype is not None else None)
    elif dtype is not None and next(net.parameters()).dtype != DTYPES[dtype]:
        net = copy.deepcopy(net).to(DTYPES[dtype])
    pipe = family.build_pipeline(net, model.vae, model.conditioner, scheduler)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    lora = write_lora_export(model, lora_net, type(pipe), scheduler, out) if has_lora(lora_net) else None
    if bare:
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
        save_file(state, str(out / BARE_WEIGHTS), metadata={
            'format': 'pt', 'family': family.name,
            'description': f'SenseFlow generator: diffusers {type(net).__name__} state dict'})
    call = {**steps.call_kwargs, **family.pipeline_call_kwargs(int(model.resolution), model.conditioner)}
    info = {
        'family': family.name,
        'pipeline_class': family.pipeline_class,
        'sampler': method,
        'num_steps': len(model.sigmas) - 1,
        'anchors': [float(s) for s in model.sigmas[:-1]],
        'sigmas': [float(s) for s in model.sigmas],
        **steps.info,
        'resolution': int(model.resolution),
        'latent_shape': [int(d) for d in model.latent_shape],
        'call_kwargs': call,
        'bare_weights': BARE_WEIGHTS if bare else None,
        'lora': lora,
        'source': source,
        'notes': ('Re-noise noise comes from the global RNG of the device (the scheduler step is called without a '
                  'generator): pass senseflow_algos.sampling.seeded_default_rng(seed) as generator= to match '
                  'the in-repo sampler exactly. At a resolution other than the one trained, FLUX shifts the anchors '
                  'by its resolution rule.'),
    }
    (out / EXPORT_INFO).write_text(json.dumps(info, indent=2) + '\n')
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints


def export_checkpoint(checkpoint: str | Path, out: str | Path, config: Optional[str | Path] = None,
                      overrides: Sequence[str] = (), method: str = DEFAULT_METHOD, dtype: Optional[str] = None,
                      bare: bool = True, progress: bool = True) -> Path:
    """:func:`~senseflow_algos.restore.restore_student` then :func:`export_pipeline` (what ``python export.py`` runs).

    Args:
        checkpoint: A run folder, a checkpoint (``.pt``, sharded folder, ``.safetensors``) or an object-store URI of
            one of those (see :mod:`senseflow_algos.restore`).
        out: The output folder.
        config, overrides: The run YAML and overrides. Default: the ``run_config.yaml`` saved with the checkpoints.
        method, dtype, bare: See :func:`export_pipeline`.
        progress (bool): Show a progress bar.
    """
    import tempfile

    from tqdm.auto import tqdm

    from senseflow_algos.remote import is_uri
    from senseflow_algos.restore import restore_student

    with tqdm(total=2, desc='export', disable=not progress) as bar, tempfile.TemporaryDirectory(
            prefix='senseflow-export-') as cache:  # an object-store checkpoint is downloaded here, then deleted
        bar.set_postfix_str('downloading and reading the generator' if is_uri(checkpoint) else 'reading the generator')
        student = restore_student(checkpoint, config, overrides, cache=cache, say=bar.write if progress else print)
        bar.update()
        bar.set_postfix_str(f'writing {out}')
        folder = export_pipeline(student, out, method=method, dtype=dtype, bare=bare, source=student.source)
        bar.update()
    return folder


# ---------------------------------------------------------------------------------------------------------------------
# Using an export


def load_export_info(folder: str | Path) -> dict[str, Any]:
    """``senseflow_export.json`` of an exported folder.

    Raises:
        ExportError: If the folder has none (not written by :func:`export_pipeline`).
    """
    path = Path(folder) / EXPORT_INFO
    if not path.is_file():
        raise ExportError(f'{folder} has no {EXPORT_INFO}: it was not written by senseflow_algos.export')
    return json.loads(path.read_text())


def pipeline_call_kwargs(folder: str | Path) -> dict[str, Any]:
    """The keyword arguments of ``pipe(prompt, **kwargs)`` that reproduce the in-repo sampler (plus ``generator``)."""
    return dict(load_export_info(folder)['call_kwargs'])


def sampling_command(folder: str | Path, prompt: str = 'a red circle above a blue square',
                     image: str = 'student.png') -> str:
    """One shell line that samples the exported student correctly (its ``load_kwargs`` and ``call_kwargs``, the seeded
    global generator) and saves ``image``: what ``python export.py`` and the export callback print last."""
    folder = str(folder)
    load = ''.join(f', {k}={v!r}' for k, v in load_export_info(folder).get('load_kwargs', {}).items())
    code = (f'from diffusers import DiffusionPipeline; from senseflow_algos.export import pipeline_call_kwargs; '
            f'from senseflow_algos.sampling import seeded_default_rng; '
            f'pipe = DiffusionPipeline.from_pretrained({folder!r}{load}); '
            f'pipe({prompt!r}, generator=seeded_default_rng(0), **pipeline_call_kwargs({folder!r}))'
            f'.images[0].save({image!r})')
    return f'python -c "{code}"'


def sampling_components_from_pipeline(pipe, info: dict[str, Any]) -> SamplingComponents:
    """:class:`~senseflow_algos.sampling.SamplingComponents` on the modules of a loaded exported pipeline.

    Args:
        pipe: The pipeline from ``DiffusionPipeline.from_pretrained(folder)``.
        info (dict): :func:`load_export_info` of that folder.
    """
    from senseflow_algos.models.families import FAMILIES, get_family

    name = info['family']
    if name not in FAMILIES:
        raise ExportError(f'{EXPORT_INFO}: family={name!r} is not known; known: {sorted(FAMILIES)}')
    family = get_family(name)
    max_len = info['call_kwargs'].get('max_sequence_length')
    conditioner = family.conditioner_from_pipeline(pipe, int(max_len) if max_len is not None else None)
    return SamplingComponents(family, getattr(pipe, family.network_subfolder), pipe.vae, conditioner,
                              torch.tensor(info['sigmas'], dtype=torch.float64), tuple(info['latent_shape']))


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python export.py <run folder | checkpoint | URI> <out> [--config x.yaml overrides...]``; returns an exit code."""
    parser = argparse.ArgumentParser(
        prog='python export.py',
        description='Export a SenseFlow / DMD generator checkpoint to a diffusers pipeline folder.')
    parser.add_argument('checkpoint', help='run folder (its latest checkpoint), Composer checkpoint (.pt file or '
                        'sharded ep*-ba* folder), a bare generator .safetensors, or an object-store URI of one of '
                        'those (s3://bucket/runs/x)')
    parser.add_argument('out', help='output folder (a diffusers pipeline)')
    parser.add_argument('overrides', nargs='*', help='dotted key=value overrides of the run config')
    parser.add_argument('--config', help='the run YAML the checkpoint was trained with (default: run_config.yaml '
                        'next to the checkpoint)')
    parser.add_argument('--method', choices=METHODS, default=DEFAULT_METHOD,
                        help=f'sampler the scheduler reproduces (default: {DEFAULT_METHOD})')
    parser.add_argument('--dtype', choices=sorted(DTYPES), help='dtype of the saved transformer (default: as '
                        'trained)')
    parser.add_argument('--no-bare', action='store_true', help='do not write generator.safetensors')
    args = parser.parse_intermixed_args(argv)
    from senseflow_algos.checkpointing import CheckpointError
    from senseflow_algos.config import ConfigError

    try:
        folder = export_checkpoint(args.checkpoint, args.out, config=args.config, overrides=args.overrides,
                                   method=args.method, dtype=args.dtype, bare=not args.no_bare)
    except (ExportError, ConfigError, CheckpointError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(f'exported to {folder} (call arguments: {pipeline_call_kwargs(folder)}); sample it with:\n'
          f'{sampling_command(folder)}')
    return 0
