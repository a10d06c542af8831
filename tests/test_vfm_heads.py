"""VFM discriminator heads: the reference-map combination (per location / pooled) and the heads' parameter count."""

import inspect
import math
from pathlib import Path

import pytest
import torch

from senseflow_algos.algorithms import VFMDiscriminator
from senseflow_algos.algorithms.vfm_discriminator.heads import DiscriminatorHead, VFMDiscriminatorHeads
from senseflow_algos.config import ConfigError, load_config, validate_config

C_DIM, CMAP = 16, 4
TINY_YAML = Path(__file__).resolve().parents[1] / 'yamls' / 'tiny_flux.yaml'


def head(reference_map: str) -> DiscriminatorHead:
    torch.manual_seed(0)
    # eval: spectral norm's power iteration holds still, so the head and the hand computation see the same weights.
    return DiscriminatorHead(8, c_dim=C_DIM, cmap_dim=CMAP, num_downsample=1, reference_map=reference_map).eval()


def test_per_location_logit_formula():
    """Method notes 4.2 (released code): per location, logit = sum_c out_c * (cmap_c + refmap_c) / sqrt(cmap_dim)."""
    h = head('per_location')
    g = torch.Generator().manual_seed(1)
    x, c, ref = torch.randn(2, 8, 6, 6, generator=g), torch.randn(2, C_DIM, generator=g), torch.randn(2, 8, 6, 6, generator=g)
    out, cmap, refmap = h.cls(h.main(x)), h.cmapper(c), h.refmapper(ref)
    assert out.shape == refmap.shape == (2, CMAP, 3, 3)
    expected = torch.empty(2, 3, 3)
    for b in range(2):
        for i in range(3):
            for j in range(3):
                expected[b, i, j] = sum(out[b, k, i, j] * (cmap[b, k] + refmap[b, k, i, j]) for k in range(CMAP))
    torch.testing.assert_close(h(x, c, ref), expected.flatten(1) / math.sqrt(CMAP))


def test_pooled_uses_the_mean_reference_vector():
    """Pooled: every location sees the reference map averaged over the locations (one vector per sample)."""
    h = head('pooled')
    g = torch.Generator().manual_seed(2)
    x, c, ref = torch.randn(2, 8, 6, 6, generator=g), torch.randn(2, C_DIM, generator=g), torch.randn(2, 8, 6, 6, generator=g)
    out, cmap, refmap = h.cls(h.main(x)), h.cmapper(c), h.refmapper(ref)
    ref_vec = refmap.sum(dim=(2, 3)) / 9  # 3x3 locations
    expected = torch.einsum('bkij,bk->bij', out, cmap + ref_vec) / math.sqrt(CMAP)
    torch.testing.assert_close(h(x, c, ref), expected.flatten(1))
    # The two forms really differ: the per-location head with the same weights gives other logits.
    per_loc = head('per_location')
    per_loc.load_state_dict(h.state_dict())
    assert not torch.allclose(per_loc(x, c, ref), h(x, c, ref))


def test_per_location_needs_matching_grids():
    x, c = torch.randn(2, 8, 6, 6), torch.randn(2, C_DIM)
    with pytest.raises(ValueError, match=r"reference feature grid \(4, 4\) must equal the judged grid \(6, 6\).*"
                                         r'reference_map: pooled'):
        head('per_location')(x, c, torch.randn(2, 8, 4, 4))
    assert head('pooled')(x, c, torch.randn(2, 8, 4, 4)).shape == (2, 9)  # pooled takes any reference grid


def test_reference_map_setting_checked():
    with pytest.raises(ValueError, match='algorithms.vfm_discriminator.reference_map'):
        VFMDiscriminator(reference_map='spatial')
    with pytest.raises(ValueError, match='reference_map'):
        DiscriminatorHead(8, reference_map='spatial')
    for form in ('per_location', 'pooled'):
        validate_config(load_config(TINY_YAML, [f'algorithms.vfm_discriminator.reference_map={form}']))
    with pytest.raises(ConfigError, match='reference_map'):
        validate_config(load_config(TINY_YAML, ['algorithms.vfm_discriminator.reference_map=spatial']))


# ---------------------------------------------------------------------------------------------------------------------
# Parameter count


def trunk_params(c: int, h: int, stages: int) -> int:
    """Hand count of one conv trunk (method notes 4.2): 1x1 conv block, then ``stages`` x [res 3x3 block] + down.

    A conv ``a -> b`` of kernel ``k`` has ``a*b*k*k`` weights and ``b`` biases; a BatchNormLocal of ``b`` channels has
    ``2b`` affine parameters. Spectral norm's ``u``/``v`` vectors are buffers, not parameters.
    """
    stem = c * h + h + 2 * h
    down = 9 * h * h + h
    res = 9 * h * h + h + 2 * h
    return stem + stages * down + (stages - 1) * res


def heads_params(c: int, h: int, stages: int, c_dim: int, maps: int, k: int = 64) -> int:
    """main + refmapper trunks, two 1x1 convs to ``k`` (cls, refmapper's last), Linear(c_dim, k); per map."""
    return maps * (2 * trunk_params(c, h, stages) + 2 * (h * k + k) + c_dim * k + k)


def dinov2_l_heads(text_dim: int, **kwargs) -> VFMDiscriminatorHeads:
    """The heads VFMDiscriminator builds for DINOv2-L at 1022 px (73x73 patches), on the meta device."""
    algo = VFMDiscriminator(pretrained=False, input_size=1022, **kwargs)
    with torch.device('meta'):
        backbone = algo.build_backbone()
        assert (backbone.embed_dim, backbone.num_features_maps, backbone.grid_size) == (1024, 8, (73, 73))
        return algo.build_heads(backbone, text_dim)


def test_heads_parameter_count_dinov2_l():
    """Default width = backbone width (the reference's DiscHeadPlus_2d(channels=1024)): 773,391,872 parameters for
    FLUX's 768-d pooled text; 73 -> 37 -> 19 -> 10 takes all three stride-2 stages."""
    assert inspect.signature(VFMDiscriminator).parameters['hidden_channels'].default is None  # -> backbone width
    heads = dinov2_l_heads(768)
    count = sum(p.numel() for p in heads.parameters())
    assert count == heads_params(1024, 1024, 3, 768, 8) == 773_391_872
    assert all(p.requires_grad for p in heads.parameters())
    sn = heads.heads[0].main.stem[0].parametrizations.weight
    assert {n for n, _ in sn.named_parameters()} == {'original'}
    assert {n for n, _ in sn.named_buffers()} == {'0._u', '0._v'}
    # SD 3.5's pooled text is 2048-d (CLIP-L + CLIP-G): only the cmappers grow.
    sd3 = sum(p.numel() for p in dinov2_l_heads(2048).parameters())
    assert sd3 == heads_params(1024, 1024, 3, 2048, 8) == 773_391_872 + 8 * (2048 - 768) * 64


def test_heads_parameter_count_narrow():
    """The README's cheaper setting, hidden_channels=256."""
    heads = dinov2_l_heads(768, hidden_channels=256)
    assert sum(p.numel() for p in heads.parameters()) == heads_params(1024, 256, 3, 768, 8) == 52_086_272


def test_meta_build_skips_power_iteration_only_on_meta():
    """Heads on meta skip spectral norm's initial power iterations (planning speed); real heads still run them."""
    from torch.nn.utils import parametrizations

    original = parametrizations._SpectralNorm._power_method
    with torch.device('meta'):
        DiscriminatorHead(8, c_dim=C_DIM, cmap_dim=CMAP, num_downsample=1)
    assert parametrizations._SpectralNorm._power_method is original
    calls = []

    def counting(self, weight_mat, n):
        calls.append(n)
        return original(self, weight_mat, n)

    parametrizations._SpectralNorm._power_method = counting
    try:
        DiscriminatorHead(8, c_dim=C_DIM, cmap_dim=CMAP, num_downsample=1)
        # 6 SN convs (main: stem, down; cls; refmapper: stem, down, 1x1), each: 15 iterations at construction, then
        # 1 in the check forward pass register_parametrization runs.
        assert calls == [15, 1] * 6
    finally:
        parametrizations._SpectralNorm._power_method = original
