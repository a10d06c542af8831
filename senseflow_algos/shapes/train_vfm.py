"""Pretrain the shapes world's vision foundation model: a tiny DINOv2-architecture timm ViT, self-supervised.

    python -m senseflow_algos.shapes.train_vfm --out senseflow_algos/shapes/assets/vfm/model.safetensors

Architecture: timm ``vit_small_patch14_dinov2`` (DINOv2's ViT: LayerScale, CLS token, learned position
embedding) at ``img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4`` (:data:`VFM_KWARGS`): an 8x8 grid
of patch tokens, 0.2M parameters.

Objective: masked image modelling (SimMIM): half of the patch embeddings are replaced by a learned mask token
and a linear head regresses the masked patches' pixels (mean squared error: with L1 the
median, i.e. background, is optimal wherever an object is uncertain). Masked-token prediction is one of DINOv2's two
objectives (iBOT); predicting pixels instead of a teacher's tokens is its simplest self-supervised form and needs
no labels, so the discriminator's backbone learns the world's image statistics (colours, edges, shapes, layout)
without ever seeing the attributes the evaluator measures. Images come from world seed 4000 and pass through the
same preprocessing (``VFMBackbone.preprocess``) as in the discriminator.

The saved state dict is that of the timm model created with ``num_classes=0``; the discriminator loads it with
``pretrained: true`` and ``backbone_kwargs: {..., pretrained_cfg_overlay: {file: <this file>}}``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from senseflow_algos.shapes import components as C
from senseflow_algos.shapes.training import log, optimizer_step, warmup_cosine
from senseflow_algos.shapes.world import render, sample_scene

VFM_MODEL = 'vit_small_patch14_dinov2'
VFM_KWARGS = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4)
WORLD_SEED = 4000


def build_backbone(weights: str | Path | None = None):
    """The shapes VFM as the discriminator builds it (random init, or ``weights``)."""
    from senseflow_algos.algorithms.vfm_discriminator.backbone import VFMBackbone

    kwargs = dict(VFM_KWARGS)
    if weights is not None:
        kwargs['pretrained_cfg_overlay'] = dict(file=str(weights))
    else:
        # DINOv2's LayerScale starts at 1e-5, which all but switches the blocks off at first; the tiny model
        # pretrains far faster from 0.1 (the gammas are parameters: loading the weights restores the trained ones).
        kwargs['init_values'] = 0.1
    return VFMBackbone(VFM_MODEL, pretrained=weights is not None, input_size=32, model_kwargs=kwargs)


class SimMIM(nn.Module):
    """Mask-token encoder + linear pixel decoder around a timm ViT."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        vit = backbone.model
        vit.requires_grad_(True)
        self.patch = vit.patch_embed.patch_size[0]
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, vit.embed_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.decoder = nn.Linear(vit.embed_dim, 3 * self.patch**2)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error on masked patches; ``images`` in [-1, 1], ``mask`` (B, Hp, Wp) bool."""
        vit = self.backbone.model
        tokens = vit.patch_embed(self.backbone.preprocess(images))  # (B, Hp, Wp, D) with dynamic_img_size
        tokens = torch.where(mask.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(tokens)))
        x = vit.norm(vit.blocks(x))[:, vit.num_prefix_tokens:]
        pred = self.decoder(x)  # (B, Hp*Wp, 3 p p)
        p = self.patch
        b, _, h, w = images.shape
        target = images.view(b, 3, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, 3 * p * p)
        m = mask.reshape(b, -1, 1).float()
        return ((pred - target)**2 * m).sum() / (m.sum() * pred.shape[-1]).clamp_min(1)


def linear_probe(backbone, n_train: int = 3000, n_test: int = 1000, steps: int = 500) -> float:
    """Held-out accuracy of a linear probe on the mean-pooled feature maps that predicts the exact set of
    (colour, shape) pairs in an image (18 logistic outputs, all right): how linearly the features read the world."""
    from senseflow_algos.shapes.train_evaluator import render_targets

    tr, te = render_targets(9100, n_train), render_targets(9101, n_test)

    def feats(x):
        with torch.no_grad():
            return torch.cat([f.mean((2, 3)) for f in backbone(x)], 1)

    ftr, fte = feats(tr[0]), feats(te[0])
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
    ftr, fte = (ftr - mu) / sd, (fte - mu) / sd
    torch.manual_seed(0)
    lin = nn.Linear(ftr.shape[1], tr[1].shape[1])
    opt = torch.optim.Adam(lin.parameters(), 1e-2)
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(lin(ftr), tr[1])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(((lin(fte) > 0) == te[1].bool()).all(1).float().mean())


def main(argv=None):
    p = argparse.ArgumentParser(prog='python -m senseflow_algos.shapes.train_vfm', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default=str(C.VFM_WEIGHTS))
    p.add_argument('--pool', type=int, default=16000)
    p.add_argument('--steps', type=int, default=1500)
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--mask-ratio', type=float, default=0.5)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int, default=1, help='torch intra-op threads (1: fastest on a shared 2-core machine)')
    a = p.parse_args(argv)
    C.num_threads(a.threads)
    torch.manual_seed(a.seed)
    t0 = time.time()
    images = torch.from_numpy(np.stack([render(sample_scene(WORLD_SEED, i)) for i in range(a.pool)])) * 2 - 1
    log(f'rendered {a.pool} images in {time.time() - t0:.0f}s')
    model = SimMIM(build_backbone()).train()
    model.backbone.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.05, betas=(0.9, 0.95))
    warm = max(1, a.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, a.steps, warm))
    rng = torch.Generator().manual_seed(a.seed)
    grid = 32 // model.patch
    background_mse = float((images - images[:, :, :1, :1]).pow(2).mean())  # predicting the background everywhere
    log(f'baseline (background everywhere) MSE {background_mse:.4f}')
    t1, losses = time.time(), []
    for step in range(a.steps):
        x = images[torch.randint(a.pool, (a.batch,), generator=rng)]
        mask = torch.rand(a.batch, grid, grid, generator=rng).flatten(1).argsort(1) < int(a.mask_ratio * grid * grid)
        loss = model(x, mask.view(a.batch, grid, grid))
        optimizer_step(opt, loss, model, max_grad_norm=1.0)
        sched.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == a.steps - 1:
            el = time.time() - t1
            log(f'step {step}/{a.steps} masked-patch MSE {np.mean(losses[-100:]):.4f} '
                f'{(step + 1) * a.batch / el:.0f} img/s')
    vit = model.backbone.model.eval()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(out),
              metadata={'model': VFM_MODEL, **{k: str(v) for k, v in VFM_KWARGS.items()}})
    log(f'saved {out} ({out.stat().st_size / 1024:.0f} KiB); final masked-patch MSE {np.mean(losses[-100:]):.4f}, '
        f'{(time.time() - t0) / 60:.1f} min')
    log(f'linear probe (exact set of colour-shape pairs, held out): pretrained {linear_probe(build_backbone(out)):.3f}'
        f', random init {linear_probe(build_backbone()):.3f}')


if __name__ == '__main__':
    main()
