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
    ['model.dtype=bf16', 'model.lora={rank: 4}'],  # frozen bf16 base, fp32 adapters
    ['optimizer.kind=adamw_8bit'],
])
def test_accepted(overrides):
    check_trained_precision(_cfg(*overrides), 'tiny_flux.yaml')


def test_lora_adapters_on_a_bf16_base_are_fp32_and_take_small_steps(tmp_path):
    """What the check assumes: with model.dtype=bf16 and LoRA the frozen base is bf16 and the adapters fp32, and a
    lr-1e-5 AdamW step moves every adapter weight (a bf16 adapter of the same magnitudes would mostly stay put).
    (The from_pretrained path: tiny models ignore model.dtype.)"""
    import torch

    from senseflow_algos.builders import build_model
    from senseflow_algos.models.tiny import save_tiny_pipeline

    folder = save_tiny_pipeline('flux', tmp_path / 'pipe')
    cfg = _cfg('model.tiny=false', f'model.pretrained={folder}', 'model.dtype=bf16', 'model.lora={rank: 4}')
    model = build_model(cfg['model'], seed=17)
    trained = [p for group in model.param_groups() for p in group['params']]
    assert trained and {p.dtype for p in trained} == {torch.float32}
    assert all('lora' in n for n, p in model.generator.named_parameters() if p.requires_grad)
    assert {p.dtype for p in model.generator.parameters() if not p.requires_grad} == {torch.bfloat16}
    # The adapted layer runs: bf16 input, fp32 adapter, output in the base's dtype.
    x = torch.randn(2, 4, 8, 8)
    cond = {'prompt_embeds': torch.randn(2, 6, model.generator.config.joint_attention_dim),
            'pooled_prompt_embeds': torch.randn(2, model.generator.config.pooled_projection_dim)}
    lora_b = [p for n, p in model.generator.named_parameters() if 'lora_B' in n]
    with torch.no_grad():
        for p in lora_b:
            p.normal_(0, 0.02)  # non-zero B so the adapters change the output
    v = model.family.velocity(model.generator, x, torch.full((2,), 0.5), cond)
    v.square().mean().backward()
    before = [p.detach().clone() for p in trained]
    opt = torch.optim.AdamW(trained, lr=1e-5, weight_decay=0.0)
    opt.step()
    with_grad = [(b, p) for b, p in zip(before, trained) if p.grad is not None and p.grad.abs().sum() > 0]
    assert with_grad
    moved = sum(int((b != p.detach()).sum()) for b, p in with_grad)
    total = sum(b.numel() for b, _ in with_grad)
    assert moved / total > 0.99
