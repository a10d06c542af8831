"""Trained weights must be able to take small steps: bf16/fp16 trained weights need stochastic rounding.

``model.dtype`` is the dtype of the trained networks (generator and fake score). With ``model.lora`` only their
adapters train, and those are always fp32 (:func:`~senseflow_algos.models.lora.apply_lora`), so a bf16 base is fine.
The VFM discriminator heads are built in fp32. Round-to-nearest AdamW on bf16 weights loses
every step below half a bf16 spacing, so such a config is refused unless ``optimizer.stochastic_rounding`` is on.
"""

from __future__ import annotations

from typing import Any

from senseflow_algos.config import DEFAULT_OPTIMIZER, ConfigError

__all__ = ['LOW_PRECISION_REASON', 'check_trained_precision']

#: Why low-precision trained weights need stochastic rounding (the config check's and the optimizers' refusals).
LOW_PRECISION_REASON = (
    'plain AdamW on bf16 weights loses small steps: a bf16 weight of magnitude 0.02 has a half-ulp of about 8e-5, so '
    'an Adam step of about lr=1e-5 rounds back to the old value (fp16: steps are quantised to 1.5e-5 at 0.02 and those below 7.6e-6 vanish). '
    'Either keep fp32 master weights (model.dtype: fp32, the default; compute stays bf16 through '
    'trainer.precision: amp_bf16 or FSDP mixed_precision) or set optimizer.stochastic_rounding: true '
    '(the update is computed in fp32 and written back with stochastic rounding)')


def check_trained_precision(cfg: dict[str, Any], source: str) -> None:
    """Refuse bf16/fp16 trained weights without ``optimizer.stochastic_rounding: true`` (or with 8-bit AdamW).

    Raises:
        ConfigError: Naming ``model.dtype`` (or ``optimizer.stochastic_rounding``), the reason and the two ways out.
    """
    dtype = (cfg.get('model') or {}).get('dtype') or 'fp32'
    optimizer = cfg.get('optimizer') or {}
    rounding = bool(optimizer.get('stochastic_rounding', False))
    kind = optimizer.get('kind') or DEFAULT_OPTIMIZER
    if kind == 'adamw_8bit' and rounding:
        raise ConfigError(f'{source}: optimizer.stochastic_rounding: true needs optimizer.kind: adamw (bitsandbytes\' '
                          '8-bit AdamW updates each weight inside its own kernel); with adamw_8bit keep fp32 master '
                          'weights (model.dtype: fp32) and drop optimizer.stochastic_rounding')
    if dtype == 'fp32' or (cfg.get('model') or {}).get('lora') is not None:
        return  # fp32 masters; or LoRA: frozen base in `dtype`, fp32 adapters
    trained = 'the generator and fake score'
    if kind == 'adamw_8bit':
        raise ConfigError(f'{source}: model.dtype: {dtype} trains {trained} in {dtype} with optimizer.kind: '
                          f'adamw_8bit, which has no stochastic rounding: {LOW_PRECISION_REASON}. With adamw_8bit use '
                          'model.dtype: fp32.')
    if not rounding:
        raise ConfigError(f'{source}: model.dtype: {dtype} trains {trained} in {dtype} without '
                          f'optimizer.stochastic_rounding: {LOW_PRECISION_REASON}.')
