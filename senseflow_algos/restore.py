"""Restore a trained student from what a run wrote: the generator's weights from a checkpoint, the rest from the
teacher.

A checkpoint is any of what training writes: an unsharded Composer ``.pt`` file, a sharded (FSDP1 or FSDP2)
torch.distributed.checkpoint folder ``ep*-ba*/`` (``.metadata`` + ``__<rank>_0.distcp``), a bare
``generator.safetensors``, a run folder (its ``latest-rank0.pt`` link, else its newest checkpoint), or any of those in
an object store (``s3://...``, downloaded with Composer's clients, :mod:`senseflow_algos.remote`).

Only the generator is read and built: its tensors are read from the checkpoint (from the shards directly, no process
group), the network is built on the meta device from the teacher's transformer config and takes the tensors as they
are (``load_state_dict(assign=True)``), so its weights are in memory once. The teacher, fake score and discriminator
heads are never built. The VAE and text encoders come from ``model.pretrained`` (or the tiny models with the run's
seed), as training built them; the run config is the ``run_config.yaml`` training wrote next to the checkpoints.

Used by ``export.py``, evaluation (``eval.py --student <checkpoint>``) and the ``export_pipeline`` callback.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from senseflow_algos.checkpointing import (
    SHARDED_METADATA,
    CheckpointError,
    check_checkpoint,
    checkpoint_batch,
    load_composer_file,
)
from senseflow_algos.config import run_seed
from senseflow_algos.signatures import defaults_of

__all__ = [
    'StudentParts', 'RUN_CONFIG_NAMES', 'GENERATOR_PREFIX', 'resolve_checkpoint', 'find_run_config',
    'read_generator_state', 'load_run_config', 'build_student', 'restore_student'
]

#: Names under which a run config is looked for next to a checkpoint (and in the folder above it).
RUN_CONFIG_NAMES = ('run_config.yaml', 'config.yaml')
#: Key prefix of the generator's tensors in the model state of a checkpoint.
GENERATOR_PREFIX = 'generator.'


@dataclass
class StudentParts:
    """A trained student and what a pipeline or a sampler needs with it; the attribute names are those of
    :class:`~senseflow_algos.models.dmd.DMDModel`, so :func:`~senseflow_algos.export.export_pipeline` and
    :func:`~senseflow_algos.sampling.sample` take either.

    Attributes:
        family (ModelFamily): The teacher family.
        generator (nn.Module): The student network with the trained weights.
        vae (nn.Module): The teacher's VAE.
        conditioner (nn.Module | None): The teacher's text encoders.
        sigmas (Tensor): The generator's anchors followed by 0 (float64).
        latent_shape (tuple[int, int, int]): ``(C, h, w)`` at the training resolution.
        scheduler_config (dict): The teacher scheduler's config.
        resolution (int): The training resolution.
        source (str): Where the weights came from.
    """
    family: Any
    generator: nn.Module
    vae: nn.Module
    conditioner: Optional[nn.Module]
    sigmas: torch.Tensor
    latent_shape: tuple[int, int, int]
    scheduler_config: dict
    resolution: int
    source: str = ''
    config: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------------
# Finding the checkpoint and the run config


def _newest_in(folder: Path) -> list[Path]:
    found = [p for p in folder.iterdir() if not p.is_symlink() and not p.name.startswith(('.', 'latest')) and
             ((p.is_dir() and (p / SHARDED_METADATA).exists()) or (p.is_file() and p.name.endswith('-rank0.pt')))]
    return sorted(found, key=lambda p: (checkpoint_batch(p.name), p.stat().st_mtime), reverse=True)


def resolve_checkpoint(path: str | Path, say: Callable[[str], None] = print) -> Path:
    """The checkpoint (file or sharded folder) that ``path`` names, checked readable.

    A run folder gives its ``latest-rank0.pt`` target, else its newest checkpoint; an unreadable newest one is skipped
    for the newest readable, with a line to ``say``. A checkpoint named directly must be readable.

    Raises:
        CheckpointError: Missing, unreadable (naming the file and what is wrong), or a folder with no checkpoint.
    """
    path = Path(path)
    if not path.is_dir() or (path / SHARDED_METADATA).exists() or any(path.glob('*.distcp')):
        check_checkpoint(path, load=False)
        return path
    latest = path / 'latest-rank0.pt'
    candidates = _newest_in(path)
    if os.path.lexists(latest):
        target = path / os.readlink(latest) if latest.is_symlink() else latest
        candidates = [target] + [c for c in candidates if c.resolve() != target.resolve()]
    if not candidates:
        raise CheckpointError(f'run folder {path} has no latest-rank0.pt and no checkpoint (ep*-ba*-rank0.pt files or '
                              f'ep*-ba* sharded folders)')
    errors = []
    for candidate in candidates:
        try:
            check_checkpoint(candidate)
        except CheckpointError as e:
            errors.append(str(e))
            continue
        for error in errors:
            say(f'skipping an unreadable checkpoint: {error}')
        return candidate
    raise CheckpointError(f'run folder {path} has no readable checkpoint: ' + '; '.join(errors))


def find_run_config(checkpoint: str | Path) -> Optional[Path]:
    """A run config saved next to ``checkpoint`` (or in the folder above), named one of :data:`RUN_CONFIG_NAMES`."""
    checkpoint = Path(checkpoint)
    folder = checkpoint if checkpoint.is_dir() and not (checkpoint / SHARDED_METADATA).exists() else (
        Path(os.path.abspath(checkpoint)).parent)
    for d in (folder, folder.parent):
        for name in RUN_CONFIG_NAMES:
            if (d / name).is_file():
                return d / name
    return None


def _config_hint(run_name: Optional[str]) -> str:
    from senseflow_algos.config import DEFAULT_SCHEMA

    if not run_name:
        return ''
    import yaml

    matches = []
    for p in sorted(DEFAULT_SCHEMA.parent.rglob('*.yaml')):
        try:
            if (yaml.safe_load(p.read_text()) or {}).get('run_name') == run_name:
                matches.append(str(p))
        except Exception:  # noqa: BLE001 - a hint only
            continue
    return f' (the checkpoint is from run {run_name!r}' + (f'; configs with that run_name: {matches})' if matches
                                                            else ')')


def load_run_config(checkpoint: Path, config: Optional[str | Path] = None, overrides: Sequence[str] = (),
                    run_name: Optional[str] = None) -> tuple[dict[str, Any], Path]:
    """The validated run config of ``checkpoint``: ``config``, else the ``run_config.yaml`` found next to it.

    Raises:
        CheckpointError: No config given or found (naming what to pass).
    """
    from senseflow_algos.config import load_config, validate_config

    if config is None:
        config = find_run_config(checkpoint)
        if config is None:
            raise CheckpointError(f'no run config found for {checkpoint} (looked for {list(RUN_CONFIG_NAMES)} next to '
                                  f'it and one folder up); pass --config yamls/<the yaml it was trained with> and the '
                                  f'same overrides{_config_hint(run_name)}')
    cfg = load_config(config, list(overrides))
    validate_config(cfg, source=str(config))
    return cfg, Path(config)


# ---------------------------------------------------------------------------------------------------------------------
# Reading the generator's tensors


def _strip(key: str) -> str:
    return key[len('module.'):] if key.startswith('module.') else key


def _read_pt(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    ckpt = load_composer_file(path)  # memory-mapped: tensors are read when used
    state = ckpt['state']
    gen = {_strip(k)[len(GENERATOR_PREFIX):]: v for k, v in state['model'].items()
           if _strip(k).startswith(GENERATOR_PREFIX)}
    if not gen:
        tops = sorted({_strip(k).split('.')[0] for k in state['model']})
        raise CheckpointError(f'checkpoint {path} holds no generator weights (keys generator.*); model keys start with '
                              f'{tops}')
    return gen, {'run_name': state.get('run_name')}


def _read_sharded(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The ``state.model.generator.*`` tensors of a torch.distributed.checkpoint folder, into tensors allocated here
    at their full size (one copy), read without a process group (``no_dist``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(path))
    metadata = reader.read_metadata()
    wanted: dict[str, torch.Tensor] = {}
    for fqn, meta in metadata.state_dict_metadata.items():
        parts = fqn.split('.', 2)
        if len(parts) < 3 or parts[:2] != ['state', 'model'] or not _strip(parts[2]).startswith(GENERATOR_PREFIX):
            continue
        if not isinstance(meta, TensorStorageMetadata):
            raise CheckpointError(f'{path}: {fqn} is not a tensor in the sharded checkpoint ({type(meta).__name__})')
        wanted[fqn] = torch.empty(meta.size, dtype=meta.properties.dtype)
    if not wanted:
        tops = sorted({k.split('.')[2] for k in metadata.state_dict_metadata if k.startswith('state.model.')})
        raise CheckpointError(f'sharded checkpoint {path} holds no generator weights (state.model.generator.*); '
                              f'model keys start with {tops}')
    try:
        dcp.load(wanted, storage_reader=reader, no_dist=True)
    except Exception as e:  # noqa: BLE001 - a shard that does not read is a bad checkpoint
        raise CheckpointError(f'sharded checkpoint {path} cannot be read ({type(e).__name__}: '
                              f'{str(e).strip().splitlines()[0] if str(e).strip() else ""})') from None
    prefix = len('state.model.')
    return {_strip(k[prefix:])[len(GENERATOR_PREFIX):]: v for k, v in wanted.items()}, {}


def read_generator_state(checkpoint: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The generator's state dict from a checkpoint (file, sharded folder or run folder), and checkpoint metadata.

    Returns:
        tuple: ``(state_dict, meta)``; ``meta`` holds the checkpoint's ``run_name`` when known.

    Raises:
        CheckpointError: Naming the file and what is wrong.
    """
    path = resolve_checkpoint(checkpoint)
    kind = check_checkpoint(path, load=False)
    if kind == 'sharded':
        return _read_sharded(path)
    if kind == 'safetensors':
        from safetensors.torch import load_file

        return load_file(str(path)), {}
    return _read_pt(path)


# ---------------------------------------------------------------------------------------------------------------------
# Building the student


def _student_networks(model_cfg: dict[str, Any], seed: int):
    """``(family, generator on meta or random, vae, conditioner, scheduler config)`` as training built them, without
    reading any transformer weight (``model.pretrained``: the teacher's config on the meta device)."""
    from senseflow_algos.models.factory import _resolve_dtypes, build_dmd_model
    from senseflow_algos.models.families import get_family

    fam = get_family(model_cfg['family'], **(model_cfg.get('family_kwargs') or {}))
    if model_cfg.get('tiny'):
        components = fam.tiny_components(seed=seed)  # tiny: random weights, as cheap as meta
    elif model_cfg.get('pretrained'):
        defaults = defaults_of(build_dmd_model)
        student, teacher, encoders = _resolve_dtypes(model_cfg.get('dtype', defaults['dtype']),
                                                     model_cfg.get('teacher_dtype'), model_cfg.get('encoder_dtype'))
        components = fam.load_components(model_cfg['pretrained'], torch_dtype=student, teacher_dtype=teacher,
                                         encoder_dtype=encoders, revision=model_cfg.get('revision'),
                                         transformers_on_meta=True)
    else:
        raise CheckpointError('the run config has neither model.pretrained nor model.tiny=true')
    lora = model_cfg.get('lora')
    if lora is not None:
        from senseflow_algos.models.lora import apply_lora

        apply_lora(components.student, **lora)
    return fam, components.student, components.vae, components.conditioner, components.scheduler_config


def build_student(model_cfg: dict[str, Any], seed: int, state: dict[str, torch.Tensor],
                  source: str = '') -> StudentParts:
    """The student of a run's ``model:`` section with the generator weights ``state``.

    Args:
        model_cfg (dict): The ``model:`` section of the run config.
        seed (int): The run's ``seed`` (the tiny models' weights).
        state (dict): The generator's state dict (as :func:`read_generator_state` returns it).
        source (str): Where the weights came from (for messages).

    Raises:
        CheckpointError: If ``state`` does not fit the generator the config builds.
    """
    from senseflow_algos import flow

    fam, net, vae, conditioner, scheduler_config = _student_networks(model_cfg, seed)
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatch = [f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}' for k, v in state.items()
                if k in own and v.shape != own[k].shape]
    if missing or unexpected or mismatch:
        raise CheckpointError(f'generator weights of {source} do not fit the model of the run config '
                              f'(model.family={model_cfg["family"]}): {len(missing)} missing {missing[:3]}, '
                              f'{len(unexpected)} unexpected {unexpected[:3]}, {len(mismatch)} shape mismatches '
                              f'{mismatch[:3]}')
    state = {k: v.to(own[k].dtype) for k, v in state.items()}  # as trained (a no-op for the training dtype)
    net.load_state_dict(state, strict=True, assign=True)
    meta = [n for n, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
    if meta:
        raise CheckpointError(f'{source}: generator tensors {meta[:3]} are not in the checkpoint and were built on the '
                              'meta device')
    net.requires_grad_(False).eval()
    resolution = int(model_cfg['resolution'])
    latent_shape = tuple(fam.latent_shape(vae, resolution))
    from senseflow_algos.models.dmd import DMDModel

    num_steps = model_cfg.get('num_steps', defaults_of(DMDModel)['num_steps'])
    sigmas = flow.append_zero(fam.anchors(latent_shape[1:], int(num_steps)))
    return StudentParts(fam, net, vae.requires_grad_(False).eval(),
                        None if conditioner is None else conditioner.requires_grad_(False).eval(), sigmas,
                        latent_shape, dict(scheduler_config), resolution, source)


def restore_student(checkpoint: str | Path, config: Optional[str | Path] = None, overrides: Sequence[str] = (),
                    cache: Optional[str | Path] = None, say: Callable[[str], None] = print) -> StudentParts:
    """The student of a checkpoint: its generator weights, and the VAE and text encoders its run config names.

    Args:
        checkpoint: A checkpoint file, sharded folder, run folder, or an object-store URI of one of those.
        config: The run YAML. Default: the ``run_config.yaml`` next to the checkpoint.
        overrides: Dotted ``key=value`` overrides of the config (as given to ``train.py``).
        cache: Where an object-store checkpoint is downloaded. Default: a new temporary folder.
        say: Progress lines. Default: ``print``.

    Raises:
        CheckpointError: Naming the file, key or value at fault.
    """
    from senseflow_algos.remote import fetch_checkpoint, is_uri

    origin = str(checkpoint)
    if is_uri(checkpoint):
        import tempfile

        cache = Path(cache) if cache is not None else Path(tempfile.mkdtemp(prefix='senseflow-restore-'))
        checkpoint = fetch_checkpoint(str(checkpoint), cache, say=say)
    path = resolve_checkpoint(checkpoint, say=say)
    state, meta = read_generator_state(path)
    cfg, _ = load_run_config(path, config, overrides, meta.get('run_name'))
    model_cfg = dict(cfg['model'])
    model_cfg['text_encoders'] = model_cfg['vae_encoder'] = True  # a pipeline needs both
    parts = build_student(model_cfg, seed=run_seed(cfg), state=state,
                          source=origin if is_uri(origin) else str(path))
    parts.config = cfg
    return parts
