"""Export a distilled generator to a diffusers pipeline folder that samples like the in-repo 4-step sampler.

The folder holds a ``FluxPipeline`` or ``StableDiffusion3Pipeline`` (the teacher's VAE, text encoders and
tokenizers, the student as ``transformer``), a ``FlowMatchEulerDiscreteScheduler`` configured for the sampler, a bare
``generator.safetensors`` of the student's weights and ``senseflow_export.json`` (anchors, sampler and the exact
call arguments that reproduce :func:`senseflow_algos.sampling.sample`). A ``model.lora`` student also gets
``lora/``, a diffusers LoRA file for the teacher's own pipeline (:mod:`senseflow_algos.export_lora`).

How the scheduler reproduces the samplers (checked in diffusers 0.39's ``scheduling_flow_match_euler_discrete.py``):
``step()`` with ``stochastic_sampling=True`` computes ``x0 = x - s v`` and ``(1 - s_next) x0 + s_next * randn``,
which is :func:`senseflow_algos.flow.renoise_step`; with ``stochastic_sampling=False`` it is the Euler step
``x + (s_next - s) v``. The ``model.num_steps`` sigmas (4 by default) come from ``set_timesteps``: the pipeline's
pre-shift sigmas (the inverse shifts of :mod:`senseflow_algos.flow`) go through the scheduler's shift (SD 3.5: static
``shift``; FLUX: ``mu`` from the image size, so at the training resolution FluxPipeline's default
``linspace(1, 1/n, n)`` gives the training anchors). SD 3.5 pipelines have no such default:
pass ``sigmas=`` (written to ``senseflow_export.json``) and ``guidance_scale=1`` (no CFG).

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
from torch import nn

from senseflow_algos import flow
from senseflow_algos.dtypes import DTYPES
from senseflow_algos.export_lora import fused_copy, has_lora, write_lora_export
from senseflow_algos.sampling import DEFAULT_METHOD, METHODS, SamplingComponents

if TYPE_CHECKING:
    from senseflow_algos.models.dmd import DMDModel

__all__ = [
    'PIPELINE_CLASSES',
    'EXPORT_INFO',
    'BARE_WEIGHTS',
    'ExportError',
    'student_scheduler_config',
    'pipeline_sigmas',
    'build_pipeline',
    'export_pipeline',
    'export_checkpoint',
    'load_export_info',
    'pipeline_call_kwargs',
    'sampling_components_from_pipeline',
    'main',
]

#: ``model.family`` -> the diffusers pipeline class name the student is exported as.
PIPELINE_CLASSES = {'flux': 'FluxPipeline', 'sd35': 'StableDiffusion3Pipeline'}
#: Metadata file written next to ``model_index.json``.
EXPORT_INFO = 'senseflow_export.json'
#: The bare generator weights (the diffusers transformer's state dict).
BARE_WEIGHTS = 'generator.safetensors'

class ExportError(ValueError):
    """An export that cannot proceed; the message names the file, key or value at fault."""


# ---------------------------------------------------------------------------------------------------------------------
# Scheduler


def student_scheduler_config(family, base_config: dict[str, Any], method: str = DEFAULT_METHOD) -> dict[str, Any]:
    """The ``FlowMatchEulerDiscreteScheduler`` config of an exported student.

    Starts from the teacher scheduler's config and sets the sampler (``stochastic_sampling``) and the family's shift;
    every option that would move the sigmas off the anchors (Karras / exponential / beta sigmas, terminal stretch,
    inversion) is switched off.

    Args:
        family (ModelFamily): The teacher family.
        base_config (dict): The teacher scheduler's config (``DMDModel.scheduler_config``).
        method (str): ``'renoise'`` or ``'euler'``.
    """
    if method not in METHODS:
        raise ExportError(f'sampler method={method!r} is not known; choose one of {list(METHODS)}')
    cfg = {k: v for k, v in dict(base_config).items() if not k.startswith('_')}
    cfg.update(stochastic_sampling=method == 'renoise', invert_sigmas=False, shift_terminal=None,
               use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
               time_shift_type='exponential')
    if family.name == 'flux':
        p = family.shift_params
        cfg.update(use_dynamic_shifting=True, base_image_seq_len=p['base_seq_len'], max_image_seq_len=p['max_seq_len'],
                   base_shift=p['base_shift'], max_shift=p['max_shift'])
    elif family.name == 'sd35':
        cfg.update(use_dynamic_shifting=False, shift=float(family.shift))
    else:
        raise ExportError(f'model.family={family.name!r} has no diffusers export; known: {sorted(PIPELINE_CLASSES)}')
    return cfg


def _flux_mu(scheduler_config: dict[str, Any], latent_shape: Sequence[int]) -> float:
    """:func:`flow.flux_mu` with the scheduler config's shift parameters (FluxPipeline's ``calculate_shift``)."""
    tokens = (latent_shape[1] // 2) * (latent_shape[2] // 2)
    return float(flow.flux_mu(tokens, base_seq_len=scheduler_config['base_image_seq_len'],
                              max_seq_len=scheduler_config['max_image_seq_len'],
                              base_shift=scheduler_config['base_shift'], max_shift=scheduler_config['max_shift']))


def pipeline_sigmas(scheduler_config: dict[str, Any], sigmas: torch.Tensor,
                    latent_shape: Sequence[int]) -> tuple[list[float], Optional[float]]:
    """The pre-shift ``sigmas=`` a pipeline passes to ``set_timesteps`` to land on the anchors, and FLUX's ``mu``.

    Inverts the scheduler's shift (static ``shift`` or FLUX's exponential time shift at ``mu`` computed from the latent
    size, as FluxPipeline does), then checks that ``set_timesteps`` really reproduces ``sigmas``.

    Args:
        scheduler_config (dict): From :func:`student_scheduler_config`.
        sigmas (Tensor): Anchors followed by 0 (``DMDModel.sigmas``).
        latent_shape: ``(C, h, w)`` of the latents at the training resolution.

    Raises:
        ExportError: If the scheduler does not reproduce the anchors to 1e-5.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    anchors = torch.as_tensor([float(s) for s in sigmas[:-1]], dtype=torch.float64)
    mu = None
    if scheduler_config['use_dynamic_shifting']:
        mu = _flux_mu(scheduler_config, latent_shape)
        pre = flow.flux_time_unshift(anchors, mu)
    else:
        pre = flow.unshift_sigma(anchors, float(scheduler_config['shift']))
    pre = [round(float(p), 6) for p in pre]
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(sigmas=pre, **({'mu': mu} if mu is not None else {}))
    got = scheduler.sigmas.double()
    want = torch.as_tensor([float(s) for s in sigmas], dtype=torch.float64)
    if got.shape != want.shape or (got - want).abs().max() > 1e-5:
        raise ExportError(f'the exported scheduler gives sigmas {got.tolist()} for sigmas={pre}, not the training '
                          f'anchors {want.tolist()}')
    return pre, mu


# ---------------------------------------------------------------------------------------------------------------------
# Pipeline


def build_pipeline(family_name: str, net: nn.Module, vae: nn.Module, conditioner: nn.Module, scheduler):
    """A diffusers pipeline of the family with ``net`` as its transformer and the conditioner's text encoders."""
    import diffusers

    if family_name not in PIPELINE_CLASSES:
        raise ExportError(f'model.family={family_name!r} has no diffusers export; known: {sorted(PIPELINE_CLASSES)}')
    cls = getattr(diffusers, PIPELINE_CLASSES[family_name])
    c = conditioner
    if family_name == 'flux':
        if getattr(net.config, 'guidance_embeds', False):
            raise ExportError('the FLUX student has a guidance embedding (guidance_embeds=true); the generator should '
                              'be built with without_guidance_embedding')
        return cls(scheduler=scheduler, vae=vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
                   text_encoder_2=c.text_encoder_2, tokenizer_2=c.tokenizer_2, transformer=net)
    return cls(transformer=net, scheduler=scheduler, vae=vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
               text_encoder_2=c.text_encoder_2, tokenizer_2=c.tokenizer_2, text_encoder_3=c.text_encoder_3,
               tokenizer_3=c.tokenizer_3)


def _call_kwargs(family_name: str, steps: int, pre_sigmas: list[float], resolution: int,
                 max_sequence_length: int) -> dict[str, Any]:
    kwargs: dict[str, Any] = {'num_inference_steps': steps, 'sigmas': pre_sigmas, 'height': resolution,
                              'width': resolution, 'max_sequence_length': max_sequence_length}
    if family_name == 'sd35':
        kwargs['guidance_scale'] = 1.0  # StableDiffusion3Pipeline runs CFG when guidance_scale > 1
    return kwargs


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
    from diffusers import FlowMatchEulerDiscreteScheduler

    family = model.family
    if family.name not in PIPELINE_CLASSES:
        raise ExportError(f'model.family={family.name!r} has no diffusers export; known: {sorted(PIPELINE_CLASSES)}')
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f'dtype={dtype!r} is not one of {sorted(DTYPES)}')
    if model.conditioner is None or getattr(model.vae, 'encoder', True) is None:
        raise ExportError('a pipeline needs the text encoders and the whole VAE, but this model was built without them '
                          '(model.text_encoders / model.vae_encoder = false); rebuild it with both set to true')
    out = Path(out)
    sched_cfg = student_scheduler_config(family, model.scheduler_config, method)
    pre_sigmas, mu = pipeline_sigmas(sched_cfg, model.sigmas, model.latent_shape)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(sched_cfg)
    net = lora_net = model.generator
    if has_lora(lora_net):  # a model.lora student: the pipeline gets a fused copy, <out>/lora the adapter
        net = fused_copy(lora_net, DTYPES[dtype] if dtype is not None else None)
    elif dtype is not None and next(net.parameters()).dtype != DTYPES[dtype]:
        net = copy.deepcopy(net).to(DTYPES[dtype])
    pipe = build_pipeline(family.name, net, model.vae, model.conditioner, scheduler)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    lora = write_lora_export(model, lora_net, type(pipe), scheduler, out) if has_lora(lora_net) else None
    if bare:
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
        save_file(state, str(out / BARE_WEIGHTS), metadata={
            'format': 'pt', 'family': family.name,
            'description': f'SenseFlow generator: diffusers {type(net).__name__} state dict'})
    steps = len(model.sigmas) - 1
    call = _call_kwargs(family.name, steps, pre_sigmas, int(model.resolution),
                        int(getattr(model.conditioner, 'max_sequence_length', 512)))
    info = {
        'family': family.name,
        'pipeline_class': PIPELINE_CLASSES[family.name],
        'sampler': method,
        'num_steps': steps,
        'anchors': [float(s) for s in model.sigmas[:-1]],
        'sigmas': [float(s) for s in model.sigmas],
        'pipeline_sigmas': pre_sigmas,
        'mu': mu,
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


def sampling_components_from_pipeline(pipe, info: dict[str, Any]) -> SamplingComponents:
    """:class:`~senseflow_algos.sampling.SamplingComponents` on the modules of a loaded exported pipeline.

    Args:
        pipe: The pipeline from ``DiffusionPipeline.from_pretrained(folder)``.
        info (dict): :func:`load_export_info` of that folder.
    """
    from senseflow_algos.models.families import FluxConditioner, SD35Conditioner, get_family

    name = info['family']
    max_len = int(info['call_kwargs'].get('max_sequence_length', 512))
    if name == 'flux':
        conditioner = FluxConditioner(pipe.text_encoder, pipe.tokenizer, pipe.text_encoder_2, pipe.tokenizer_2,
                                      max_sequence_length=max_len)
    elif name == 'sd35':
        conditioner = SD35Conditioner(pipe.text_encoder, pipe.tokenizer, pipe.text_encoder_2, pipe.tokenizer_2,
                                     pipe.text_encoder_3, pipe.tokenizer_3, max_sequence_length=max_len)
    else:
        raise ExportError(f'{EXPORT_INFO}: family={name!r} is not known; known: {sorted(PIPELINE_CLASSES)}')
    return SamplingComponents(get_family(name), pipe.transformer, pipe.vae, conditioner,
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
    call = pipeline_call_kwargs(folder)
    print(f'exported to {folder}\n'
          f'  pipe = DiffusionPipeline.from_pretrained({str(folder)!r})\n'
          f'  pipe(prompt, generator=seeded_default_rng(0), **{call})')
    return 0
