"""LoRA: only adapters train; base weights and the teacher stay; IDA aligns the adapters."""

from __future__ import annotations

import pytest
import torch

from senseflow_algos.builders import build_trainer
from senseflow_algos.config import load_config, validate_config
from senseflow_algos.functional import align_fake_score
from senseflow_algos.models.factory import build_dmd_model
from tests.algorithms.conftest import REPO

pytest.importorskip('peft')


def _split(net):
    lora = {n: p.detach().clone() for n, p in net.named_parameters() if 'lora_' in n}
    base = {n: p.detach().clone() for n, p in net.named_parameters() if 'lora_' not in n}
    return lora, base


def test_only_adapters_trainable_and_ida_aligns_them():
    model = build_dmd_model('flux', resolution=32, tiny=True, lora={'rank': 4})
    groups = model.param_groups()
    trainable = [p for g in groups for p in g['params']]
    assert trainable and all(p.requires_grad for p in trainable)
    names = {n for n, p in model.generator.named_parameters() if p.requires_grad}
    assert names and all('lora_' in n for n in names)
    assert not any(p.requires_grad for p in model.teacher.parameters())
    with torch.no_grad():  # make the adapters differ
        for n, p in model.generator.named_parameters():
            if 'lora_' in n:
                p.add_(0.1)
    fake_lora, fake_base = _split(model.fake_score)
    gen_lora, _ = _split(model.generator)
    align_fake_score(model.fake_score, model.generator, 0.9)
    lora_after, base_after = _split(model.fake_score)
    for n, v in lora_after.items():
        torch.testing.assert_close(v, 0.9 * fake_lora[n] + 0.1 * gen_lora[n], rtol=0, atol=1e-7)
    assert all(torch.equal(v, fake_base[n]) for n, v in base_after.items())


def test_lora_training_moves_adapters_only(tmp_path):
    cfg = load_config(REPO / 'yamls' / 'tiny_flux.yaml', [
        'trainer.progress_bar=false', 'trainer.max_duration=2ba', 'model.gen_every=1', 'model.lora.rank=4',
        'optimizer.lr=1e-2'])
    validate_config(cfg)
    trainer = build_trainer(cfg)
    model = trainer.state.model
    gen_lora, gen_base = _split(model.generator)
    trainer.fit()
    trainer.close()
    lora_after, base_after = _split(model.generator)
    assert all(torch.equal(v, gen_base[n]) for n, v in base_after.items())
    assert any(not torch.equal(v, gen_lora[n]) for n, v in lora_after.items())


def test_bad_lora_settings_are_named():
    with pytest.raises(ValueError, match=r"model.lora.target_modules=\['nope'\] does not fit"):
        build_dmd_model('flux', resolution=32, tiny=True, lora={'rank': 4, 'target_modules': ['nope']})
