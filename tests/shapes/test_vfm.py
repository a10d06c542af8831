"""The shipped shapes VFM: a DINOv2-architecture timm ViT whose pretrained weights load through timm."""

import pytest
import torch

from senseflow_algos.shapes import components as C
from senseflow_algos.shapes.train_vfm import VFM_KWARGS, VFM_MODEL, build_backbone
from senseflow_algos.shapes.world import render_sample

pytestmark = pytest.mark.skipif(not C.VFM_WEIGHTS.exists(), reason='VFM weights not shipped')


def test_shipped_vfm_loads_and_differs_from_random_init():
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(C.VFM_WEIGHTS), framework='pt') as f:
        assert f.metadata()['model'] == VFM_MODEL
    pretrained, random = build_backbone(C.VFM_WEIGHTS), build_backbone()
    shipped = load_file(str(C.VFM_WEIGHTS))
    state = pretrained.model.state_dict()
    assert set(state) == set(shipped) and all(torch.equal(state[k], shipped[k]) for k in state)
    assert not torch.equal(random.model.pos_embed, pretrained.model.pos_embed)
    assert type(pretrained.model).__name__ == 'VisionTransformer' and len(pretrained.model.blocks) == VFM_KWARGS['depth']


def test_vfm_features_tell_world_images_apart():
    b = build_backbone(C.VFM_WEIGHTS)
    x = torch.stack([render_sample(9, i)['image'] for i in range(4)])
    with torch.no_grad():
        feats = b(x)
    assert len(feats) == 1 + len(b.block_indices) and feats[-1].shape == (4, 64, 8, 8)
    last = feats[-1].flatten(1)
    assert torch.isfinite(last).all()
    assert (last[0] - last[1]).norm() > 1e-3 * last[0].norm()
