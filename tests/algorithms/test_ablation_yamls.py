"""Every ablation YAML resolves to the intended algorithm set and trains on the tiny models."""

from __future__ import annotations

import pytest

from senseflow_algos.builders import build_trainer
from senseflow_algos.config import load_config, validate_config
from tests.algorithms.conftest import REPO

ABLATIONS = sorted((REPO / 'yamls' / 'ablations').glob('*.yaml'))
EXPECTED = {
    'dmd': set(),
    'dmd_ida': {'ImplicitDistributionAlignment'},
    'dmd_ida_isg': {'ImplicitDistributionAlignment', 'IntraSegmentGuidance'},
    'senseflow': {'ImplicitDistributionAlignment', 'IntraSegmentGuidance', 'VFMDiscriminator'},
}
# The FLUX, SDXL and Qwen-Image ablations run on their family's tiny models (same classes) on synthetic data
# with a tiny random ViT instead of DINOv2-L.
TINY_OVERRIDES = [
    'model.tiny=true', 'model.resolution=32', 'model.dtype=fp32', 'model.teacher_dtype=fp32', 'trainer.device=cpu',
    'trainer.precision=fp32', 'trainer.autoresume=false', 'trainer.parallelism_config=null', 'dataset.global_batch_size=2',
    'dataset.kind=synthetic', 'dataset.num_samples=64',
    'algorithms.vfm_discriminator.pretrained=false', 'algorithms.vfm_discriminator.backbone=vit_small_patch14_dinov2',
    'algorithms.vfm_discriminator.input_size=28', 'algorithms.vfm_discriminator.hidden_channels=16',
    'algorithms.vfm_discriminator.backbone_kwargs={img_size: 28, depth: 4, embed_dim: 32, num_heads: 2}',
]


def _variant(path) -> str:
    stem = path.stem
    for key in sorted(EXPECTED, key=len, reverse=True):
        if stem.endswith('_' + key):
            return key
    raise AssertionError(f'{path.name} names no known ablation')


def test_four_ablations_per_base():
    bases = {p.stem[:-len(_variant(p)) - 1] for p in ABLATIONS}
    assert bases == {'flux', 'tiny_flux', 'tiny_sd35', 'sdxl', 'tiny_sdxl', 'qwenimage', 'tiny_qwenimage'}
    assert len(ABLATIONS) == 4 * len(bases)


@pytest.mark.parametrize('path', ABLATIONS, ids=lambda p: p.stem)
def test_ablation_trains_on_tiny_models(path, tmp_path):
    overrides = ['trainer.max_duration=2ba', 'trainer.progress_bar=false', 'model.gen_every=1',
                 f'trainer.save_folder={tmp_path}']
    if not path.stem.startswith('tiny'):
        overrides += [o for o in TINY_OVERRIDES if 'vfm' not in o or _variant(path) == 'senseflow']
    cfg = load_config(path, overrides)
    validate_config(cfg, str(path))
    trainer = build_trainer(cfg)
    assert {type(a).__name__ for a in trainer.state.algorithms} == EXPECTED[_variant(path)]
    trainer.fit()
    assert int(trainer.state.timestamp.batch) == 2
    trainer.close()
