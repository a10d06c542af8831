"""Tests for the VFM discriminator networks, hinge losses and DiffAugment (CPU, tiny random ViTs)."""

import math

import pytest
import torch

from senseflow_algos.algorithms.vfm_discriminator.backbone import (
    DINOV2_VITL_BLOCK_INDICES,
    VFMBackbone,
    default_block_indices,
)
from senseflow_algos.algorithms.vfm_discriminator.diffaug import diff_augment, rand_cutout, rand_translation
from senseflow_algos.algorithms.vfm_discriminator.heads import BatchNormLocal, DiscriminatorHead, VFMDiscriminatorHeads
from senseflow_algos.algorithms.vfm_discriminator.losses import hinge_d_loss, hinge_g_loss

# A 4-block, 32-wide DINOv2-style ViT (patch 14, CLS token, layer scale) at 56 px: a 4x4 patch grid.
TINY_NAME = 'vit_small_patch14_dinov2'
TINY_KWARGS = {'img_size': 56, 'depth': 4, 'embed_dim': 32, 'num_heads': 2}
C_DIM = 16


def tiny_backbone(**kwargs) -> VFMBackbone:
    torch.manual_seed(0)
    return VFMBackbone(TINY_NAME, pretrained=False, model_kwargs=dict(TINY_KWARGS), **kwargs)


@pytest.fixture(scope='module')
def backbone() -> VFMBackbone:
    return tiny_backbone()


def images(b=2, h=56, w=56, seed=0, requires_grad=False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, h, w, generator=g) * 2 - 1
    return x.requires_grad_(requires_grad)


# ---------------------------------------------------------------------------------------------------------------------
# Backbone


def test_backbone_frozen_and_stays_eval(backbone):
    assert all(not p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert backbone.training
    assert not backbone.model.training
    assert all(not m.training for m in backbone.model.modules())
    backbone.eval()
    assert not backbone.model.training


def test_backbone_gradient_reaches_input_not_params():
    bb = tiny_backbone().double()  # float64 for the finite-difference check
    before = {k: v.clone() for k, v in bb.state_dict().items()}

    def loss(x):
        return sum(f.square().mean() for f in bb(x))

    x = images().double().requires_grad_(True)
    loss(x).backward()
    assert x.grad.abs().sum() > 0
    # The input gradient is the true derivative through the frozen backbone: a central difference along a direction.
    d = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h = 1e-5
    with torch.no_grad():
        numeric = (loss(x + h * d) - loss(x - h * d)) / (2 * h)
    assert float((x.grad * d).sum()) == pytest.approx(float(numeric), rel=1e-5)
    # An optimizer handed every backbone parameter (as a careless param group would) leaves them bit-identical.
    opt = torch.optim.AdamW(bb.parameters(), lr=1e-2)
    opt.step()
    assert all(torch.equal(v, before[k]) for k, v in bb.state_dict().items())


def test_backbone_feature_maps_count_and_shapes(backbone):
    assert backbone.block_indices == (0, 1, 2, 3)
    assert backbone.num_features_maps == 5
    assert backbone.embed_dim == 32
    assert backbone.grid_size == (4, 4)
    # Any input size is resized to the 56 px grid.
    for h, w in [(56, 56), (40, 72)]:
        feats = backbone(images(3, h, w))
        assert len(feats) == 5
        assert all(f.shape == (3, 32, 4, 4) for f in feats)


def test_backbone_explicit_indices_and_input_size():
    bb = tiny_backbone(block_indices=[1, 3], input_size=28)
    assert bb.num_features_maps == 3
    feats = bb(images(2, 56, 56))
    assert [tuple(f.shape) for f in feats] == [(2, 32, 2, 2)] * 3


def test_backbone_maps_are_cls_plus_patch_tokens(backbone):
    """Map 0 is the pos-embedded tokens, map k the output of block k-1, each with CLS added to the patches."""
    captured = {}
    m = backbone.model
    handles = [m.pos_drop.register_forward_hook(lambda mod, i, o: captured.__setitem__('embed', o))]
    handles.append(m.blocks[2].register_forward_hook(lambda mod, i, o: captured.__setitem__('block2', o)))
    try:
        feats = backbone(images())
    finally:
        for h in handles:
            h.remove()
    for key, idx in [('embed', 0), ('block2', 3)]:
        tok = captured[key]
        expected = (tok[:, 1:] + tok[:, :1]).transpose(1, 2).reshape(2, 32, 4, 4)
        torch.testing.assert_close(feats[idx], expected)


def test_backbone_preprocess(backbone):
    x = images()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(backbone.preprocess(x), ((x + 1) / 2 - mean) / std)
    assert backbone.preprocess(images(1, 30, 90)).shape == (1, 3, 56, 56)


def test_backbone_grad_checkpointing_matches(backbone):
    ckpt = tiny_backbone(grad_checkpointing=True)
    ckpt.load_state_dict(backbone.state_dict())
    grads = []
    for bb in (backbone, ckpt):
        x = images(requires_grad=True)
        sum(f.sum() for f in bb(x)).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize(
    'indices, match',
    [([], 'at least one'), ([0, 4], 'out of range'), ([-1], 'out of range'), ([2, 2], 'strictly increasing'),
     ([3, 1], 'strictly increasing'), ([1.0], 'ints')],
)
def test_backbone_invalid_block_indices(indices, match):
    with pytest.raises(ValueError, match=match):
        tiny_backbone(block_indices=indices)


def test_backbone_input_size_must_be_patch_multiple():
    with pytest.raises(ValueError, match='multiples of the patch size'):
        tiny_backbone(input_size=50)


def test_default_block_indices():
    assert default_block_indices(24) == DINOV2_VITL_BLOCK_INDICES == (2, 5, 8, 10, 14, 19, 23)
    assert default_block_indices(12) == (1, 2, 4, 6, 8, 9, 11)
    assert default_block_indices(4) == (0, 1, 2, 3)
    for depth in (7, 12, 32, 40):
        idx = default_block_indices(depth)
        assert len(idx) == 7 and idx[-1] == depth - 1 and list(idx) == sorted(set(idx))


# ---------------------------------------------------------------------------------------------------------------------
# Heads


def test_batchnorm_local_groups():
    bn = BatchNormLocal(4, virtual_batch_size=8)
    assert [bn.num_groups(b) for b in (1, 7, 8, 9, 10, 16)] == [1, 1, 1, 3, 2, 2]
    x = torch.randn(16, 4, 3, 3) * 5 + 2
    y = bn(x).view(2, 8, 4, 9)  # two groups of 8
    torch.testing.assert_close(y.mean(dim=(1, 3)), torch.zeros(2, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(dim=(1, 3), unbiased=False), torch.ones(2, 4), atol=1e-3, rtol=0)
    bn.eval()  # batch statistics in eval mode too
    torch.testing.assert_close(bn(x).view(2, 8, 4, 9), y)


def test_heads_output_shape(backbone):
    heads = VFMDiscriminatorHeads.from_backbone(backbone, c_dim=C_DIM, cmap_dim=8)
    assert len(heads) == 5
    feats = backbone(images(3))
    with torch.no_grad():
        ref = backbone(images(3, 80, 80, seed=1))
    logits = heads(feats, torch.randn(3, C_DIM), ref)
    # 4x4 maps: one stride-2 stage (4 -> 2), then stop at min_resolution 2 -> 4 logits per head.
    assert logits.shape == (3, 5 * 4)
    logits.sum().backward()
    assert all(p.grad is not None for p in heads.heads[0].cmapper.parameters())
    assert heads.heads[0].refmapper[0].stem[0].parametrizations.weight.original.grad is not None


def test_head_downsamples_official_grid():
    """A 37x37 map (518 px DINOv2) goes 37 -> 19 -> 10 -> 5 with three stride-2 stages."""
    torch.manual_seed(0)
    head = DiscriminatorHead(8, c_dim=C_DIM, cmap_dim=4, reference_map='pooled', num_downsample=3)
    x = torch.randn(2, 8, 37, 37)
    ref = torch.randn(2, 8, 20, 20)  # pooled, so any size works
    assert head(x, torch.randn(2, C_DIM), ref).shape == (2, 25)
    assert head(torch.randn(2, 8, 2, 2), torch.randn(2, C_DIM), ref).shape == (2, 4)  # too small: no downsampling


def test_head_logit_formula():
    """Logit = sum_c out_c * (cmap_c + refmap_c) / sqrt(cmap_dim)."""
    torch.manual_seed(0)
    head = DiscriminatorHead(8, c_dim=C_DIM, cmap_dim=4, reference_map='pooled', num_downsample=1).eval()
    x, c, ref = torch.randn(2, 8, 6, 6), torch.randn(2, C_DIM), torch.randn(2, 8, 6, 6)
    out = head.cls(head.main(x))
    cond = head.cmapper(c)[:, :, None, None] + head.refmapper(ref).mean(dim=(2, 3), keepdim=True)
    expected = ((out * cond).sum(1) / math.sqrt(4)).flatten(1)
    torch.testing.assert_close(head(x, c, ref), expected)


def test_head_ref_checks():
    head = DiscriminatorHead(8, c_dim=C_DIM, cmap_dim=4)
    x, c = torch.randn(2, 8, 4, 4), torch.randn(2, C_DIM)
    with pytest.raises(ValueError, match='reference'):
        head(x, c)
    no_ref = DiscriminatorHead(8, c_dim=C_DIM, cmap_dim=4, use_ref=False)
    assert no_ref.refmapper is None and no_ref(x, c).shape == (2, 4)
    with pytest.raises(ValueError, match='text embedding'):
        no_ref(x, torch.randn(2, C_DIM + 1))


# ---------------------------------------------------------------------------------------------------------------------
# Losses


REAL = torch.tensor([[2.0], [0.5]])
FAKE = torch.tensor([[-2.0], [0.3]])


def test_hinge_d_loss_exact():
    # real: relu(1 - [2, .5]) = [0, .5] -> .25; fake: relu(1 + [-2, .3]) = [0, 1.3] -> .65
    assert hinge_d_loss(REAL, FAKE).item() == pytest.approx(0.9)
    # weights [1, .5]: real (0 + .25) / 2 = .125, fake (0 + .65) / 2 = .325
    assert hinge_d_loss(REAL, FAKE, torch.tensor([1.0, 0.5])).item() == pytest.approx(0.45)
    # Per-sample mean over logits first: one sample with logits [2, .5] / [-2, .3].
    assert hinge_d_loss(REAL.T, FAKE.T, torch.tensor([2.0])).item() == pytest.approx(2 * 0.9)


def test_hinge_g_loss_exact_and_grad():
    fake = FAKE.clone().requires_grad_(True)
    assert hinge_g_loss(fake).item() == pytest.approx(-(-2.0 + 0.3) / 2)
    loss = hinge_g_loss(fake, torch.tensor([1.0, 0.5]))
    assert loss.item() == pytest.approx((2.0 * 1.0 + -0.3 * 0.5) / 2)
    loss.backward()
    torch.testing.assert_close(fake.grad, torch.tensor([[-0.5], [-0.25]]))
    # Several logits per sample: mean first, then weight.
    logits = torch.tensor([[1.0, 3.0], [-1.0, 0.0]])
    assert hinge_g_loss(logits, torch.tensor([1.0, 4.0])).item() == pytest.approx((-2.0 + 4.0 * 0.5) / 2)


def test_hinge_weight_shape_checked():
    with pytest.raises(ValueError, match='weight has 3 entries'):
        hinge_d_loss(REAL, FAKE, torch.ones(3))


# ---------------------------------------------------------------------------------------------------------------------
# DiffAugment


def test_diff_augment_reproducible_and_seed_dependent():
    x = images(4, 32, 32)
    a = diff_augment(x, rng=torch.Generator().manual_seed(1))
    b = diff_augment(x, rng=torch.Generator().manual_seed(1))
    c = diff_augment(x, rng=torch.Generator().manual_seed(2))
    assert a.shape == x.shape and a.dtype == x.dtype
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize('policy', ['color', 'translation', 'cutout', 'color,translation,cutout', ['color', 'cutout']])
def test_diff_augment_differentiable(policy):
    x = images(3, 32, 32, requires_grad=True)
    out = diff_augment(x, policy, rng=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_diff_augment_empty_policy_is_identity():
    x = images(2, 16, 16)
    assert torch.equal(diff_augment(x, ''), x)
    assert torch.equal(diff_augment(x, None), x)


def test_diff_augment_unknown_policy():
    with pytest.raises(ValueError, match='blur'):
        diff_augment(images(1, 8, 8), 'color,blur')


def test_translation_is_zero_padded_shift():
    x = images(6, 32, 32)
    out = rand_translation(x, torch.Generator().manual_seed(3))
    s = 4  # 32 / 8
    padded = torch.nn.functional.pad(x, [s, s, s, s])
    for i in range(x.shape[0]):
        shifts = [
            (dy, dx)
            for dy in range(-s, s + 1)
            for dx in range(-s, s + 1)
            if torch.equal(out[i], padded[i, :, s - dy : s - dy + 32, s - dx : s - dx + 32])
        ]
        assert shifts, f'sample {i} is not a shift of its input by at most {s} px'


def test_cutout_erases_one_half_side_square():
    x = torch.ones(8, 3, 32, 32)
    out = rand_cutout(x, torch.Generator().manual_seed(0))
    for i in range(x.shape[0]):
        erased = out[i, 0] == 0
        assert torch.equal(erased, (out[i] == 0).all(dim=0))  # same region in every channel
        rows, cols = erased.any(dim=1).nonzero().flatten(), erased.any(dim=0).nonzero().flatten()
        assert 0 < len(rows) <= 16 and 0 < len(cols) <= 16
        assert erased.sum() == len(rows) * len(cols)  # a rectangle (clipped square)


@pytest.mark.slow
def test_real_dinov2_vitl_architecture():
    """The default config (DINOv2 ViT-L/14, random weights): 8 maps of 1024 x 37 x 37 and 8 x 25 logits at 518 px."""
    bb = VFMBackbone(pretrained=False)
    assert bb.block_indices == DINOV2_VITL_BLOCK_INDICES and bb.grid_size == (37, 37)
    heads = VFMDiscriminatorHeads.from_backbone(bb, hidden_channels=64)
    with torch.no_grad():
        feats = bb(images(1, 256, 256))
        assert [tuple(f.shape) for f in feats] == [(1, 1024, 37, 37)] * 8
        assert heads(feats, torch.randn(1, 768), feats).shape == (1, 8 * 25)
