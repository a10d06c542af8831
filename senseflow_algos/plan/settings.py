"""What the planner reads from a validated run config, with today's defaults for keys a config leaves out."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

from senseflow_algos.config import DEFAULT_OPTIMIZER, ConfigError, run_seed
from senseflow_algos.signatures import defaults_of

__all__ = ['RunSettings', 'FSDPSettings', 'read_run_settings', 'SHARDING_STRATEGIES']

SHARDING_STRATEGIES = ('FULL_SHARD', 'SHARD_GRAD_OP', 'NO_SHARD', 'HYBRID_SHARD')


@dataclass
class FSDPSettings:
    """``trainer.parallelism_config.fsdp`` as the planner models it."""
    strategy: str = 'FULL_SHARD'
    activation_checkpointing: bool = False
    mixed_precision: str = 'DEFAULT'
    cpu_offload: bool = False
    limit_all_gathers: bool = True
    replicate_degree: Optional[int] = None  # data_parallel_replicate_degree (-1: fill)
    shard_degree: int = -1  # data_parallel_shard_degree (-1: fill)


@dataclass
class RunSettings:
    """The keys of a run config that decide memory and compute."""
    family: str
    resolution: int
    tiny: bool
    pretrained: Optional[str]
    dtype: str
    teacher_dtype: Optional[str]
    encoder_dtype: Optional[str]
    gen_every: int
    backsim_prob: float
    text_encoders: bool
    vae_encoder: bool
    lora: Optional[dict[str, Any]]
    family_kwargs: dict[str, Any]
    isg: bool
    vfm: Optional[dict[str, Any]]
    dataset_kind: str
    load_images: bool
    global_batch_size: int
    microbatch_size: Optional[int]
    precision: str
    fsdp: Optional[FSDPSettings]
    optimizer_kind: str
    min_8bit_size: int
    stochastic_rounding: bool
    max_duration: str
    seed: int
    num_steps: int
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def has_real_data(self) -> bool:
        """Batches carry images or latents (so the generator input is backward-simulated only with backsim_prob)."""
        return self.dataset_kind != 'prompts'

    @property
    def precomputed(self) -> bool:
        return self.dataset_kind == 'precomputed'

    @property
    def max_batches(self) -> Optional[int]:
        match = re.fullmatch(r'(\d+)ba', self.max_duration)
        return int(match[1]) if match else None


def read_run_settings(cfg: dict[str, Any]) -> RunSettings:
    """The planner's view of a validated config (:func:`~senseflow_algos.config.load_config` output).

    Keys other parts of the project may not know yet (``model.encoder_dtype``, ``optimizer.stochastic_rounding``,
    ``algorithms.vfm_discriminator.decoder_grad_checkpointing``) are read where present; absent means today's default.
    """
    model, trainer, optimizer, dataset = cfg['model'], cfg['trainer'], cfg['optimizer'], cfg['dataset']
    algorithms = {k: v for k, v in (cfg.get('algorithms') or {}).items() if v is not None}
    fsdp_cfg = (trainer.get('parallelism_config') or {}).get('fsdp')
    fsdp = None
    if fsdp_cfg is not None:
        strategy = str(fsdp_cfg.get('sharding_strategy', 'FULL_SHARD')).upper()
        if strategy not in SHARDING_STRATEGIES:
            raise ConfigError(f'trainer.parallelism_config.fsdp.sharding_strategy={strategy!r} is not one of '
                              f'{list(SHARDING_STRATEGIES)}')
        fsdp = FSDPSettings(strategy=strategy,
                            activation_checkpointing=bool(fsdp_cfg.get('activation_checkpointing', False)),
                            mixed_precision=str(fsdp_cfg.get('mixed_precision', 'DEFAULT')).upper(),
                            cpu_offload=bool(fsdp_cfg.get('cpu_offload', False)),
                            limit_all_gathers=bool(fsdp_cfg.get('limit_all_gathers', True)),
                            replicate_degree=fsdp_cfg.get('data_parallel_replicate_degree'),
                            shard_degree=int(fsdp_cfg.get('data_parallel_shard_degree', -1)))
    micro = trainer.get('device_train_microbatch_size')
    model = {**_model_defaults(), **{k: v for k, v in model.items() if v is not None}}
    return RunSettings(
        family=model['family'], resolution=int(model['resolution']), tiny=bool(model['tiny']),
        pretrained=model.get('pretrained'), dtype=model['dtype'], teacher_dtype=model.get('teacher_dtype'),
        encoder_dtype=model.get('encoder_dtype'), gen_every=int(model['gen_every']),
        backsim_prob=float(model['backsim_prob']), text_encoders=bool(model['text_encoders']),
        vae_encoder=bool(model['vae_encoder']), lora=model.get('lora'),
        family_kwargs=dict(model.get('family_kwargs') or {}), isg='isg' in algorithms,
        vfm=dict(algorithms['vfm_discriminator'] or {}) if 'vfm_discriminator' in algorithms else None,
        dataset_kind=dataset['kind'], load_images=bool(dataset.get('load_images', _default_load_images())),
        global_batch_size=int(dataset['global_batch_size']), microbatch_size=micro if isinstance(micro, int) else None,
        precision=trainer.get('precision', 'fp32'), fsdp=fsdp, optimizer_kind=optimizer.get('kind', DEFAULT_OPTIMIZER),
        min_8bit_size=int(optimizer.get('min_8bit_size', 4096)),
        stochastic_rounding=bool(optimizer.get('stochastic_rounding', _default_stochastic_rounding())),
        max_duration=str(trainer['max_duration']), seed=int(run_seed(cfg)), num_steps=int(model['num_steps']),
        raw=cfg)


def _model_defaults() -> dict[str, Any]:
    """The defaults of the ``model:`` keys: the model factory's and :class:`DMDModel`'s signatures."""
    from senseflow_algos.models.dmd import DMDModel
    from senseflow_algos.models.factory import build_dmd_model

    return defaults_of(build_dmd_model, DMDModel)


def _default_load_images() -> bool:
    from senseflow_algos.data.streaming import build_streaming_dataloader

    return defaults_of(build_streaming_dataloader)['load_images']


def _default_stochastic_rounding() -> bool:
    from senseflow_algos.optim import PhasedAdamW

    return defaults_of(PhasedAdamW)['stochastic_rounding']
