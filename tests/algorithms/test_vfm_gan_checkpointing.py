"""Gradient checkpointing on the generator's GAN path (VAE decode -> DINOv2 backbone -> heads): the same gradient into
the generator's x0, fewer bytes saved for backward, and no effect on decodes without gradient."""

from __future__ import annotations

import itertools

import pytest
import torch
from diffusers import AutoencoderKL

from senseflow_algos.algorithms.vfm_discriminator import VFMBackbone, VFMDiscriminatorHeads
from senseflow_algos.algorithms.vfm_discriminator.vfm_discriminator import enable_decoder_checkpointing
from senseflow_algos.functional import discriminator_logits, hinge_g_loss
from senseflow_algos.models.families import get_family
from tests.algorithms.conftest import LossRecorder, snapshot, tiny_config

FAMILY = get_family('flux')  # decode_latents: z / scaling_factor + shift_factor -> VAE.decode


def tiny_vae() -> AutoencoderKL:
    """Three decoder levels (two 2x upsamples), a mid block with attention; 8x8 latents -> 32x32 pixels."""
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
                         down_block_types=('DownEncoderBlock2D',) * 3, up_block_types=('UpDecoderBlock2D',) * 3,
                         layers_per_block=1, norm_num_groups=4, sample_size=32).requires_grad_(False).eval()


def latents(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def saved_bytes_and_grad(loss_fn, x0: torch.Tensor, modules: list[torch.nn.Module]) -> tuple[int, torch.Tensor]:
    """Bytes of the distinct storages autograd saves for backward during ``loss_fn(x0)`` (parameters and buffers
    excluded), and the gradient into ``x0``."""
    weights = {t.untyped_storage()._cdata for m in modules for t in itertools.chain(m.parameters(), m.buffers())}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in weights:
            saved[storage._cdata] = storage.nbytes()
        return t

    x0 = x0.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(x0)
    loss.backward()
    return sum(saved.values()), x0.grad


class CheckpointCalls:
    """Counts torch.utils.checkpoint.checkpoint calls (diffusers looks the function up at call time)."""

    def __init__(self, monkeypatch):
        self.n, original = 0, torch.utils.checkpoint.checkpoint

        def counting(*args, **kwargs):
            self.n += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(torch.utils.checkpoint, 'checkpoint', counting)


def test_decoder_checkpointing_same_gradient_fewer_saved_bytes(monkeypatch):
    plain, ckpt = tiny_vae(), tiny_vae()
    enable_decoder_checkpointing(ckpt)
    probe = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # every pixel's gradient counts
    calls = CheckpointCalls(monkeypatch)
    bytes_plain, grad_plain = saved_bytes_and_grad(lambda x: (FAMILY.decode_latents(plain, x) * probe).sum(),
                                                   latents(), [plain])
    assert calls.n == 0
    bytes_ckpt, grad_ckpt = saved_bytes_and_grad(lambda x: (FAMILY.decode_latents(ckpt, x) * probe).sum(),
                                                 latents(), [ckpt])
    # Decoder: the mid block and each of the 3 up blocks; the mid block also checkpoints its 2 resnets.
    assert calls.n >= 1 + 3
    torch.testing.assert_close(grad_ckpt, grad_plain, rtol=1e-5, atol=1e-7)
    assert grad_plain.abs().sum() > 0
    # Kept: the blocks' inputs and the layers outside them (conv_in, output norm / act / conv).
    assert bytes_ckpt < 0.5 * bytes_plain


def test_decoder_checkpointing_leaves_no_grad_decodes_alone(monkeypatch):
    plain, ckpt = tiny_vae(), tiny_vae()
    enable_decoder_checkpointing(ckpt)
    assert ckpt.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    calls = CheckpointCalls(monkeypatch)
    with torch.no_grad():
        out_ckpt, out_plain = FAMILY.decode_latents(ckpt, latents(3)), FAMILY.decode_latents(plain, latents(3))
    assert calls.n == 0  # under no_grad the Decoder takes its plain path
    assert torch.equal(out_ckpt, out_plain)


def test_decoder_checkpointing_needs_diffusers_support():
    with pytest.raises(TypeError, match='decoder_grad_checkpointing'):
        enable_decoder_checkpointing(torch.nn.Conv2d(4, 3, 1))


def test_gan_path_gradient_identical_under_each_checkpointing():
    """x0 -> VAE decode -> DiffAugment -> backbone -> heads -> hinge: the same gradient into x0 with backbone and/or
    decoder checkpointing; each one saves fewer bytes, both the fewest."""
    torch.manual_seed(0)
    backbone = VFMBackbone('vit_small_patch14_dinov2', pretrained=False, input_size=56,
                           model_kwargs={'img_size': 56, 'depth': 4, 'embed_dim': 32, 'num_heads': 2})
    # eval: spectral norm's power iteration holds still between the runs.
    heads = VFMDiscriminatorHeads([32] * backbone.num_features_maps, c_dim=8, hidden_channels=16,
                                  num_downsample=1).eval()
    text = torch.randn(2, 8)
    with torch.no_grad():
        ref = backbone(torch.rand(2, 3, 32, 32) * 2 - 1)
    weight = torch.tensor([0.3, 0.8])
    results = {}
    for backbone_ckpt, decoder_ckpt in itertools.product((False, True), repeat=2):
        vae = tiny_vae()
        if decoder_ckpt:
            enable_decoder_checkpointing(vae)
        backbone.grad_checkpointing = backbone_ckpt

        def loss_fn(x0, vae=vae):
            pixels = FAMILY.decode_latents(vae, x0)
            logits = discriminator_logits(backbone, heads, pixels, text, ref, 'color,translation,cutout',
                                          torch.Generator().manual_seed(5))
            return hinge_g_loss(logits, weight)

        results[backbone_ckpt, decoder_ckpt] = saved_bytes_and_grad(loss_fn, latents(4), [vae, backbone, heads])
    bytes_none, grad_none = results[False, False]
    assert grad_none.abs().sum() > 0
    for key, (_, grad) in results.items():
        torch.testing.assert_close(grad, grad_none, rtol=1e-5, atol=1e-8, msg=f'checkpointing {key}')
    assert results[True, False][0] < bytes_none and results[False, True][0] < bytes_none
    assert results[True, True][0] < min(results[True, False][0], results[False, True][0])


def test_algorithm_checkpointing_switches_train_the_same(algo_trainer):
    """One batch (generator phase, then critic phase) with both checkpointing switches on moves the generator and
    the heads exactly as without them; the switch reaches the model's VAE at INIT."""
    vfm = {'backbone': 'vit_small_patch14_dinov2', 'pretrained': False, 'input_size': 28,
           'backbone_kwargs': {'img_size': 28, 'depth': 4, 'embed_dim': 32, 'num_heads': 2},
           'hidden_channels': 16, 'num_downsample': 1, 'generator_weight': 2.0}
    after = {}
    for on in (False, True):
        cfg = tiny_config({'vfm_discriminator': {**vfm, 'grad_checkpointing': on, 'decoder_grad_checkpointing': on}},
                          'trainer.max_duration=1ba')
        losses = LossRecorder()
        trainer = algo_trainer(cfg, callbacks=[losses])
        model = trainer.state.model
        assert model.vae.is_gradient_checkpointing is on and model.vfm_backbone.grad_checkpointing is on
        trainer.fit()
        assert 'loss/train/generator/adversarial' in losses.losses[0]
        after[on] = (snapshot(model.generator), snapshot(model.discriminator), losses.losses[0])
    for k, v in after[False][0].items():
        torch.testing.assert_close(after[True][0][k], v, rtol=1e-5, atol=1e-7, msg=f'generator {k}')
    for k, v in after[False][1].items():
        torch.testing.assert_close(after[True][1][k], v, rtol=1e-5, atol=1e-7, msg=f'heads {k}')
    assert after[True][2] == pytest.approx(after[False][2], rel=1e-5)
