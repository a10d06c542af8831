"""bf16/fp16 trained weights without stochastic rounding are refused at validation, naming model.dtype and the way out;
LoRA adapters are checked too, since they really are created in the base dtype."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from senseflow_algos.checks.trained_precision import check_trained_precision
from senseflow_algos.config import ConfigError, load_config, validate_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / 'yamls' / 'tiny_flux.yaml'


def _cfg(*overrides: str) -> dict:
    cfg = load_config(TINY, list(overrides))
    validate_config(cfg, source='tiny_flux.yaml')
    return cfg


def test_train_py_refuses_bf16_weights_without_stochastic_rounding():
    proc = subprocess.run([sys.executable, 'train.py', str(TINY), 'model.dtype=bf16'], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    err = proc.stderr
    assert err.startswith('error:') and 'Traceback' not in err
    assert 'model.dtype: bf16' in err and 'half-ulp' in err
    assert 'model.dtype: fp32' in err and 'optimizer.stochastic_rounding: true' in err  # both ways out


@pytest.mark.parametrize('overrides', [
    ['model.dtype=bf16'],
    ['model.dtype=fp16'],
    ['model.dtype=bf16', 'model.lora={rank: 4}'],
    ['model.dtype=bf16', 'optimizer.stochastic_rounding=true', 'optimizer.kind=adamw_8bit'],
    ['optimizer.stochastic_rounding=true', 'optimizer.kind=adamw_8bit'],
])
def test_refused(overrides):
    with pytest.raises(ConfigError, match=r'model\.dtype|optimizer\.stochastic_rounding'):
        check_trained_precision(_cfg(*overrides), 'tiny_flux.yaml')


@pytest.mark.parametrize('overrides', [
    [],
    ['model.dtype=fp32', 'model.teacher_dtype=bf16'],
    ['model.dtype=bf16', 'optimizer.stochastic_rounding=true'],
    ['model.dtype=fp16', 'optimizer.stochastic_rounding=true', 'model.lora={rank: 4}'],
    ['optimizer.kind=adamw_8bit'],
])
def test_accepted(overrides):
    check_trained_precision(_cfg(*overrides), 'tiny_flux.yaml')


def test_lora_adapters_on_a_bf16_base_are_bf16(tmp_path):
    """What the check assumes: diffusers' add_adapter does not upcast adapters (peft's autocast_adapter_dtype applies
    through get_peft_model only), so with model.dtype=bf16 the adapters train in bf16 and need stochastic rounding.
    (The from_pretrained path: tiny models ignore model.dtype.)"""
    import torch

    from senseflow_algos.builders import build_model
    from senseflow_algos.models.tiny import save_tiny_pipeline

    folder = save_tiny_pipeline('flux', tmp_path / 'pipe')
    cfg = _cfg('model.tiny=false', f'model.pretrained={folder}', 'model.dtype=bf16', 'model.lora={rank: 4}')
    model = build_model(cfg['model'], seed=17)
    trained = [p for group in model.param_groups() for p in group['params']]
    assert trained and {p.dtype for p in trained} == {torch.bfloat16}
    assert all('lora' in n for n, p in model.generator.named_parameters() if p.requires_grad)
