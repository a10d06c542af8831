"""Builders from a validated run config to Composer objects: model, data, optimizer, scheduler, algorithms,
callbacks, loggers and the ``Trainer``."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from composer import Trainer
from composer.core import Algorithm, Callback
from composer.loggers import LoggerDestination, WandBLogger
from composer.optim import (
    ConstantScheduler,
    ConstantWithWarmupScheduler,
    CosineAnnealingWithWarmupScheduler,
    LinearWithWarmupScheduler,
)
from composer.utils import dist
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from senseflow_algos.checkpointing import check_before_load, install_atomic_checkpoint_writes
from senseflow_algos.config import DEFAULT_OPTIMIZER, import_plugins, run_seed
from senseflow_algos.models.dmd import DMDModel
from senseflow_algos.models.factory import build_dmd_model
from senseflow_algos.models.fsdp import (
    fsdp_device,
    lean_start,
    lean_start_trainer_config,
    prepare_for_fsdp,
    prepare_lean_start,
)
from senseflow_algos.models.fsdp_offload import GPUWithCPUCollectives, fsdp2_cpu_offload, pop_cpu_offload
from senseflow_algos.optim import PhasedAdamW
from senseflow_algos.registry import ALGORITHMS, CALLBACKS, DATASETS, Registry

__all__ = [
    'build_model', 'build_dataloader', 'build_optimizer', 'build_scheduler', 'build_algorithms', 'build_callbacks',
    'build_loggers', 'build_trainer', 'check_compile_blocks', 'save_run_config', 'ALGORITHMS', 'CALLBACKS', 'DATASETS',
    'SCHEDULERS'
]

#: ``scheduler.name`` -> Composer scheduler class.
SCHEDULERS = {
    'constant': ConstantScheduler,
    'constant_with_warmup': ConstantWithWarmupScheduler,
    'linear_with_warmup': LinearWithWarmupScheduler,
    'cosine_with_warmup': CosineAnnealingWithWarmupScheduler,
}


def build_model(model_cfg: dict[str, Any], seed: int, transformers_on_meta: bool = False) -> DMDModel:
    """``model:`` section -> :class:`DMDModel` (``transformers_on_meta``: this rank's part of a lean start, see
    :func:`~senseflow_algos.models.fsdp.lean_start`)."""
    return build_dmd_model(seed=seed, transformers_on_meta=transformers_on_meta, **model_cfg)


def build_dataloader(dataset_cfg: dict[str, Any], resolution: int, seed: int) -> DataLoader:
    """``dataset:`` section -> dataloader with the per-device batch size, from the builder registered for
    ``dataset.kind`` in :data:`~senseflow_algos.registry.DATASETS` (the other keys are its kwargs)."""
    cfg = dict(dataset_cfg)
    kind = cfg.pop('kind')
    global_batch = cfg.pop('global_batch_size')
    world = dist.get_world_size()
    if global_batch % world:
        raise ValueError(f'dataset.global_batch_size={global_batch} is not divisible by the world size {world}')
    return DATASETS.lookup(kind)(batch_size=global_batch // world, resolution=resolution, seed=seed, **cfg)


def build_optimizer(optimizer_cfg: dict[str, Any], model: DMDModel) -> PhasedAdamW:
    """``optimizer:`` section -> one phased optimizer over all trainable networks: :class:`PhasedAdamW`
    (``kind: adamw``, default) or :class:`~senseflow_algos.optim_8bit.PhasedAdamW8bit` (``kind: adamw_8bit``)."""
    cfg = dict(optimizer_cfg)
    kind = cfg.pop('kind', DEFAULT_OPTIMIZER)
    if 'betas' in cfg:
        cfg['betas'] = tuple(cfg['betas'])
    if kind == 'adamw_8bit':
        from senseflow_algos.optim_8bit import PhasedAdamW8bit

        return PhasedAdamW8bit(model.param_groups(), controller=model, **cfg)
    if 'min_8bit_size' in cfg:
        raise ValueError('optimizer.min_8bit_size applies to optimizer.kind=adamw_8bit only')
    return PhasedAdamW(model.param_groups(), controller=model, **cfg)


def build_scheduler(scheduler_cfg: dict[str, Any] | None):
    """``scheduler:`` section -> Composer scheduler (``None`` when absent: constant LR)."""
    if not scheduler_cfg:
        return None
    cfg = dict(scheduler_cfg)
    return SCHEDULERS[cfg.pop('name')](**cfg)


def _switched_on(section: dict[str, Any] | None) -> dict[str, Any]:
    """The entries of a named section (``algorithms:``, ``callbacks:``, ``loggers:``) that are on: ``name: null``
    (``section.name=null`` on the command line) switches one off; ``name: {}`` keeps it with its defaults."""
    return {name: kwargs for name, kwargs in (section or {}).items() if kwargs is not None}


def _instantiate_named(section: dict[str, Any] | None, registry: Registry) -> list:
    """The switched-on entries of ``section``, built by their registered builders (YAML order)."""
    return [registry.lookup(name)(**(kwargs or {})) for name, kwargs in _switched_on(section).items()]


def build_algorithms(algorithms_cfg: dict[str, Any] | None) -> list[Algorithm]:
    """``algorithms:`` section (name -> kwargs; ``null``: off) -> Algorithms, in YAML order (names:
    :data:`~senseflow_algos.registry.ALGORITHMS`)."""
    return _instantiate_named(algorithms_cfg, ALGORITHMS)


def build_callbacks(callbacks_cfg: dict[str, Any] | None) -> list[Callback]:
    """``callbacks:`` section (name -> kwargs; ``null``: off, ``{}``: defaults) -> Callbacks (names:
    :data:`~senseflow_algos.registry.CALLBACKS`)."""
    return _instantiate_named(callbacks_cfg, CALLBACKS)


def build_loggers(loggers_cfg: dict[str, Any] | None, full_cfg: dict[str, Any]) -> list[LoggerDestination]:
    """``loggers:`` section (name -> kwargs; ``null``: off) -> logger destinations. wandb gets the resolved run
    config."""
    loggers: list[LoggerDestination] = []
    for name, kwargs in _switched_on(loggers_cfg).items():
        if name == 'wandb':
            kwargs = dict(kwargs)
            init_kwargs = dict(kwargs.pop('init_kwargs', None) or {})
            init_kwargs.setdefault('config', full_cfg)
            loggers.append(WandBLogger(init_kwargs=init_kwargs, **kwargs))
        else:
            raise ValueError(f'loggers.{name} is not known; choose from [wandb]')
    return loggers


def check_compile_blocks(cfg: dict[str, Any], fsdp_version: str) -> None:
    """Refuse ``model.compile_blocks: true`` where per-block compile cannot work, naming the keys.

    FSDP1 with ``use_orig_params: false`` hands the blocks flat-parameter views that dynamo cannot guard on (torch
    supports compiling FSDP1 submodules only with the original parameters exposed).
    """
    if not cfg['model'].get('compile_blocks'):
        return
    fsdp = (cfg['trainer'].get('parallelism_config') or {}).get('fsdp')
    if fsdp is not None and fsdp_version != '2' and fsdp.get('use_orig_params') is False:
        raise ValueError('model.compile_blocks=true needs trainer.parallelism_config.fsdp.use_orig_params=true (FSDP1 '
                         'flat parameters cannot be compiled per block); drop use_orig_params or set '
                         'model.compile_blocks=false')


def build_trainer(cfg: dict[str, Any]) -> Trainer:
    """Build everything a validated run config describes and return the Composer ``Trainer``."""
    import_plugins(cfg)  # their dataset kinds and callbacks (train.py imported them already while validating)
    seed = run_seed(cfg)
    fsdp = (cfg['trainer'].get('parallelism_config') or {}).get('fsdp') is not None
    fsdp_version = os.environ.get('FSDP_VERSION', '1')
    trainer_cfg, cpu_offload = pop_cpu_offload(cfg['trainer'], fsdp_version)
    if fsdp and cfg['optimizer'].get('kind') == 'adamw_8bit':
        raise ValueError('optimizer.kind=adamw_8bit is for unsharded runs (one GPU, DDP): bitsandbytes\' block-wise '
                         'state cannot be saved by a sharded (FSDP) checkpoint. Use optimizer.kind=adamw with FSDP, '
                         'or trainer.parallelism_config=null')
    check_compile_blocks(cfg, fsdp_version)
    device = fsdp_device() if fsdp else None  # before any model loads: FSDP1 without CUDA fails here
    install_atomic_checkpoint_writes()
    check_before_load(trainer_cfg, cfg.get('run_name'), dist.get_global_rank())  # before any model loads
    # Cheap objects first: a bad algorithm, callback or dataset kind fails before a teacher is loaded.
    DATASETS.lookup(cfg['dataset']['kind'])
    algorithms = build_algorithms(cfg.get('algorithms'))
    callbacks = build_callbacks(cfg.get('callbacks'))
    loggers = build_loggers(cfg.get('loggers'), cfg)
    lean = lean_start(cfg['model'], fsdp, cpu_offload)  # rank 0 alone loads the transformers
    model = build_model(cfg['model'], seed=seed, transformers_on_meta=lean and dist.get_global_rank() != 0)
    if fsdp:
        prepare_for_fsdp(model, device)
    if lean:
        trainer_cfg = lean_start_trainer_config(trainer_cfg, fsdp_version)
        callbacks.append(prepare_lean_start(model))
    dataloader = build_dataloader(cfg['dataset'], resolution=cfg['model']['resolution'], seed=seed)
    optimizer = build_optimizer(cfg['optimizer'], model)
    scheduler = build_scheduler(cfg.get('scheduler'))
    if cpu_offload and torch.cuda.is_available() and trainer_cfg.get('device', 'gpu') == 'gpu':
        trainer_cfg = {**trainer_cfg, 'device': GPUWithCPUCollectives()}
    offload = fsdp2_cpu_offload(pin_memory=torch.cuda.is_available()) if cpu_offload else contextlib.nullcontext()
    with offload as offloaded:
        trainer = Trainer(
            model=model,
            train_dataloader=dataloader,
            optimizers=optimizer,
            schedulers=scheduler,
            algorithms=algorithms,
            callbacks=callbacks,
            loggers=loggers,
            run_name=cfg.get('run_name'),
            seed=seed,
            **trainer_cfg,
        )
    if cpu_offload and dist.get_global_rank() == 0:
        print(f'FSDP2 CPU offload: parameters, gradients and optimizer state of {offloaded.modules} sharded modules '
              'are kept in CPU memory', flush=True)
    save_run_config(cfg, trainer)
    return trainer


def save_run_config(cfg: dict[str, Any], trainer: Trainer) -> None:
    """Write the resolved run config as ``run_config.yaml`` into the save folder (global rank 0; under FSDP too), so
    ``export.py`` and later tools rebuild exactly this model from a checkpoint. An object-store save folder
    (``s3://...``) gets it uploaded with Composer's object store for the URI, beside the checkpoints Composer uploads."""
    folder = cfg['trainer'].get('save_folder')
    if not folder or dist.get_global_rank() != 0:
        return
    folder = folder.replace('{run_name}', trainer.state.run_name)
    text = OmegaConf.to_yaml(OmegaConf.create(cfg))
    if '://' in folder:
        import tempfile

        from senseflow_algos.remote import RUN_CONFIG, upload_file

        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / RUN_CONFIG
            local.write_text(text)
            upload_file(folder, RUN_CONFIG, local)
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / 'run_config.yaml').write_text(text)
