"""VFM discriminator algorithm: what it trains, the gradient split, the per-anchor weight and its errors."""

from __future__ import annotations

import pytest
import torch
from composer.core import Event
from torch.utils.data import DataLoader

from senseflow_algos.algorithms import VFMDiscriminator
from senseflow_algos.functional import discriminator_logits, hinge_g_loss, reference_features
from tests.algorithms.conftest import EventRecorder, LossRecorder, snapshot, tiny_config

TINY_VFM = {
    'backbone': 'vit_small_patch14_dinov2', 'pretrained': False, 'input_size': 28,
    'backbone_kwargs': {'img_size': 28, 'depth': 4, 'embed_dim': 32, 'num_heads': 2},
    'hidden_channels': 16, 'num_downsample': 1, 'generator_weight': 2.0,
}


def test_heads_join_model_optimizer_and_checkpoint(algo_trainer):
    trainer = algo_trainer(tiny_config({'vfm_discriminator': TINY_VFM}))
    model, optimizer = trainer.state.model, trainer.state.optimizers[0]
    disc_group = [g for g in optimizer.param_groups if g['role'] == 'discriminator']
    assert len(disc_group) == 1
    assert {id(p) for p in disc_group[0]['params']} == {id(p) for p in model.discriminator.parameters()}
    assert not any(p.requires_grad for p in model.vfm_backbone.parameters())
    keys = model.state_dict().keys()
    assert any(k.startswith('discriminator.') for k in keys)
    assert not any(k.startswith('vfm_backbone.') for k in keys), 'the frozen backbone is not checkpointed'


def test_only_heads_change_and_generator_term_leaves_heads_alone(algo_trainer):
    cfg = tiny_config({'vfm_discriminator': TINY_VFM}, 'model.gen_every=2', 'trainer.max_duration=3ba')

    def record(event, state):
        model = state.model
        if event == Event.BEFORE_TRAIN_BATCH:
            # Parameters only: spectral norm's power-iteration buffers advance on every forward by design.
            heads = {k: v.detach().clone() for k, v in model.discriminator.named_parameters()}
            return (model.phase, int(model.batches_seen), heads, snapshot(model.generator))
        return None

    recorder, losses = EventRecorder(record), LossRecorder()
    trainer = algo_trainer(cfg, callbacks=[recorder, losses])
    model = trainer.state.model
    backbone_before, teacher_before = snapshot(model.vfm_backbone), snapshot(model.teacher)
    trainer.fit()
    recs = recorder.records
    assert [(phase.value, step) for phase, step, *_ in recs] == [('generator', 0), ('critic', 0), ('critic', 1),
                                                           ('generator', 2), ('critic', 2)]
    # Generator phase -> critic phase of batch 0: the generator moved, the heads did not.
    heads_gen, gen_gen = recs[0][2], recs[0][3]
    heads_crit, gen_crit = recs[1][2], recs[1][3]
    assert all(torch.equal(v, heads_crit[k]) for k, v in heads_gen.items())
    assert not all(torch.equal(v, gen_crit[k]) for k, v in gen_gen.items())
    # The critic phase trains the heads.
    heads_next = recs[2][2]
    assert not all(torch.equal(v, heads_next[k]) for k, v in heads_crit.items())
    assert all(torch.equal(v, backbone_before[k]) for k, v in snapshot(model.vfm_backbone).items())
    assert all(torch.equal(v, teacher_before[k]) for k, v in snapshot(model.teacher).items())
    assert all('loss/train/discriminator/hinge' in entry for entry in losses.losses)
    assert ['loss/train/generator/adversarial' in entry for entry in losses.losses] == [True, False, True]


def test_generator_term_gradient_reaches_pixels_not_backbone():
    from senseflow_algos.algorithms.vfm_discriminator import VFMBackbone, VFMDiscriminatorHeads

    torch.manual_seed(0)
    backbone = VFMBackbone('vit_small_patch14_dinov2', pretrained=False, input_size=28,
                           model_kwargs=TINY_VFM['backbone_kwargs'])
    heads = VFMDiscriminatorHeads([32] * backbone.num_features_maps, c_dim=8, hidden_channels=16, num_downsample=1)
    images, text, ref = torch.rand(2, 3, 32, 32) * 2 - 1, torch.randn(2, 8), torch.rand(2, 3, 32, 32)

    def pixel_grad(weight):
        pixels = images.clone().requires_grad_(True)
        logits = discriminator_logits(backbone, heads, pixels, text, reference_features(backbone, ref),
                                      'color,translation,cutout',
                                      torch.Generator().manual_seed(0))
        hinge_g_loss(logits, weight).backward()
        return pixels.grad

    backbone_before = snapshot(backbone)
    heads_before = {k: v.detach().clone() for k, v in heads.named_parameters()}
    assert pixel_grad(torch.tensor([1.0, 1.0])).abs().sum() > 0
    # A step over every parameter of backbone and heads: the heads move, the frozen backbone stays bit-identical.
    torch.optim.SGD([*backbone.parameters(), *heads.parameters()], lr=1.0).step()
    assert any(not torch.equal(v, heads_before[k]) for k, v in heads.named_parameters())
    assert all(torch.equal(v, backbone_before[k]) for k, v in snapshot(backbone).items())
    # Weight 0 at every sample (all at anchor sigma = 1) gives no adversarial gradient at all.
    assert pixel_grad(torch.tensor([0.0, 0.0])).abs().sum() == 0


def _expected_gan_weight(family: str, sigma: torch.Tensor) -> torch.Tensor:
    """The reference code's per-anchor GAN weight (method notes 1.5), derived without the family code.

    FLUX: ``(1 - sigma)^2``. SD 3.5: ``scheduler.sigmas[t_idx]^2`` of diffusers' shift-3 scheduler, with the anchor
    index ``t_idx`` recovered by hand from ``sigma = shift3((t_idx + 1) / 1000)``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    if family == 'flux':
        return (1 - sigma.double())**2
    s = sigma.double()
    t_idx = torch.round(1000 * s / (3 - 2 * s) - 1).long()
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).sigmas.double()[t_idx]**2


@pytest.mark.parametrize('family', ['flux', 'sd35'])
def test_anchor_weight_used_in_training_is_the_reference_codes(algo_trainer, monkeypatch, family):
    """The weight the generator and discriminator hinge terms receive, per sample, during real training batches."""
    import senseflow_algos.algorithms.vfm_discriminator.vfm_discriminator as vfm_module

    cfg = tiny_config({'vfm_discriminator': TINY_VFM}, 'model.gen_every=1', 'trainer.max_duration=4ba', family=family)
    trainer = algo_trainer(cfg)
    seen = []

    def recording(loss_fn, term):
        def wrapped(*args):
            seen.append((term, args[-1].detach().clone(), trainer.state.outputs.sigma.detach().clone()))
            return loss_fn(*args)
        return wrapped

    monkeypatch.setattr(vfm_module, 'hinge_g_loss', recording(vfm_module.hinge_g_loss, 'generator'))
    monkeypatch.setattr(vfm_module, 'hinge_d_loss', recording(vfm_module.hinge_d_loss, 'discriminator'))
    trainer.fit()
    assert [term for term, *_ in seen] == ['generator', 'discriminator'] * 4
    anchors = set()
    for _, weight, sigma in seen:
        torch.testing.assert_close(weight.double(), _expected_gan_weight(family, sigma), atol=1e-6, rtol=0)
        anchors |= {round(float(s), 4) for s in sigma}
    assert len(anchors) >= 2  # more than one anchor seen, so the weight really varies per sample


def test_clear_error_without_real_images(algo_trainer):
    trainer = algo_trainer(tiny_config({'vfm_discriminator': TINY_VFM}))
    prompts = [{'prompt': 'a red square'}] * 4
    with pytest.raises(KeyError, match="needs real images: the batch has no 'image'"):
        trainer.fit(train_dataloader=DataLoader(prompts, batch_size=2), duration='1ba')


def test_bad_settings_fail_at_construction():
    with pytest.raises(ValueError, match='unknown'):
        VFMDiscriminator(augment='color,blur')
    with pytest.raises(ValueError, match='generator_weight'):
        VFMDiscriminator(generator_weight=-1.0)
