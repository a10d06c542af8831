"""Train the shapes-world evaluator CNN on the renderer's ground truth and ship its weights.

    python -m senseflow_algos.shapes.train_evaluator --out senseflow_algos/shapes/assets/evaluator/model.safetensors

Training images come from world seed 2000 (the teacher trains on 1000, evaluation prompts use 3000+), with 4%
background-only images (nothing present) and augmentations that imitate generated images: Gaussian noise,
blur, and small brightness / contrast shifts (hue-preserving); the embedding also regresses the blur, noise and
contrast applied, so that the FD feature space sees image quality, not only content. Losses: presence BCE of dense heat-map targets (a Gaussian bump
at each object's centre) and of the embedding head, L1 of the soft-argmax centres and of the embedding head's centres and sizes (present
combinations only). At the end it prints the accuracy on fresh renderer images with their captions and with
shuffled captions.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from senseflow_algos.shapes import components as C
from senseflow_algos.shapes.evaluator import COMBOS, EvaluatorNet, ShapesEvaluator, combo_index
from senseflow_algos.shapes.training import log, optimizer_step, warmup_cosine
from senseflow_algos.shapes.world import BACKGROUND, RESOLUTION, render, sample_scene

TRAIN_SEED, VAL_SEED = 2000, 3000
BLANK_FRACTION = 0.04


def render_targets(seed: int, n: int, blank_fraction: float = 0.0):
    """Images (N, 3, 32, 32) in [-1, 1] and targets: presence (N, 18), centre (N, 18, 2) and size (N, 18) in
    [0, 1] units of the image side; plus captions."""
    rng = np.random.default_rng([seed, 99])
    images = np.empty((n, 3, RESOLUTION, RESOLUTION), dtype=np.float32)
    presence = np.zeros((n, len(COMBOS)), dtype=np.float32)
    centre = np.zeros((n, len(COMBOS), 2), dtype=np.float32)
    size = np.zeros((n, len(COMBOS)), dtype=np.float32)
    captions = []
    for i in range(n):
        scene = sample_scene(seed, i)
        captions.append(scene.caption)
        if rng.random() < blank_fraction:
            scene.objects = []
        images[i] = render(scene)
        for o in scene.objects:
            k = combo_index(o.colour, o.shape)
            presence[i, k] = 1
            centre[i, k] = (o.x / RESOLUTION, o.y / RESOLUTION)
            size[i, k] = o.size / RESOLUTION
    return (torch.from_numpy(images) * 2 - 1, torch.from_numpy(presence), torch.from_numpy(centre),
            torch.from_numpy(size), captions)


def augment(x: torch.Tensor, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Blur (p 0.5, Gaussian std U(0.3, 1.5) px), hue-preserving contrast / brightness jitter and noise (std
    U(0, 0.1)), per image. Returns the images and the degradation parameters ``(B, 3)``: blur std, noise std,
    contrast - 1 (targets of the embedding's quality head)."""
    b = x.shape[0]
    bg = torch.tensor(BACKGROUND).view(1, 3, 1, 1) * 2 - 1
    contrast = 0.85 + 0.3 * torch.rand(b, 1, 1, 1, generator=rng)
    shift = 0.16 * torch.rand(b, 1, 1, 1, generator=rng) - 0.08 + 0.06 * torch.rand(b, 3, 1, 1, generator=rng) - 0.03
    x = (x - bg) * contrast + bg + shift
    blur = torch.where(torch.rand(b, generator=rng) < 0.5, 0.3 + 1.2 * torch.rand(b, generator=rng), torch.zeros(b))
    t = torch.arange(-3, 4, dtype=torch.float32)
    k1 = torch.exp(-t**2 / (2 * blur.clamp_min(1e-3)[:, None]**2))
    k1 = k1 / k1.sum(1, keepdim=True)
    kernel = (k1[:, :, None] * k1[:, None, :]).repeat_interleave(3, 0).unsqueeze(1)  # (B*3, 1, 7, 7)
    x = F.conv2d(F.pad(x, (3, 3, 3, 3), mode='replicate').reshape(1, b * 3, x.shape[2] + 6, x.shape[3] + 6),
                 kernel, groups=b * 3).view_as(x)
    sigma = 0.1 * torch.rand(b, 1, 1, 1, generator=rng)
    x = (x + sigma * torch.randn(x.shape, generator=rng)).clamp(-1, 1)
    return x, torch.stack([blur, sigma.flatten(), contrast.flatten() - 1], 1)


def heat_targets(presence: torch.Tensor, centre: torch.Tensor, side: int = RESOLUTION // 2,
                 radius: float = 1.0) -> torch.Tensor:
    """Dense targets (B, 18, side * side): a Gaussian bump (std ``radius`` cells) at each present object's centre."""
    coords = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    dx = coords.view(1, 1, 1, side) - centre[..., 0, None, None]
    dy = coords.view(1, 1, side, 1) - centre[..., 1, None, None]
    bump = torch.exp(-(dx**2 + dy**2) * side**2 / (2 * radius**2))
    return (bump * presence[..., None, None]).flatten(2)


def loss_fn(out, presence, centre, size, quality):
    mask = presence.unsqueeze(-1)
    n_obj = presence.sum().clamp_min(1)
    # Dense (CenterNet-style) heat-map supervision; the positives are up-weighted against the many empty cells.
    target = heat_targets(presence, centre)
    weight = 1 + 20 * target
    bce = (F.binary_cross_entropy_with_logits(out['heat'], target, reduction='none') * weight).mean()
    loc = ((out['centre'] - centre).abs() * mask).sum() / n_obj
    aux = out['aux']
    aux_bce = F.binary_cross_entropy_with_logits(aux[..., 0], presence)
    aux_loc = ((aux[..., 1:3] - centre).abs() * mask).sum() / n_obj
    aux_size = ((aux[..., 3] - size).abs() * presence).sum() / n_obj
    aux_quality = (out['quality'] - quality).abs().mean()
    return bce + 5 * loc + aux_bce + 5 * (aux_loc + aux_size + aux_quality), {'bce': bce.item(), 'loc_px': loc.item() * 16}


def evaluate_renderer(evaluator: ShapesEvaluator, n: int = 2000, seed: int = VAL_SEED) -> dict:
    images, _, _, _, captions = render_targets(seed, n)
    true = evaluator.score(images, captions)
    shuffled_captions = list(captions)
    random.Random(0).shuffle(shuffled_captions)
    shuffled = evaluator.score(images, shuffled_captions)
    return {'true': {g: true[g] for g in ('single', 'two', 'all')},
            'shuffled': {g: shuffled[g] for g in ('single', 'two', 'all')}}


def main(argv=None):
    p = argparse.ArgumentParser(prog='python -m senseflow_algos.shapes.train_evaluator', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default=str(C.EVALUATOR_WEIGHTS))
    p.add_argument('--pool', type=int, default=16000)
    p.add_argument('--steps', type=int, default=3000)
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--lr', type=float, default=2e-3)
    p.add_argument('--width', type=int, default=32)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int, default=1, help='torch intra-op threads (1: fastest on a shared 2-core machine)')
    a = p.parse_args(argv)
    C.num_threads(a.threads)
    torch.manual_seed(a.seed)
    t0 = time.time()
    images, presence, centre, size, _ = render_targets(TRAIN_SEED, a.pool, BLANK_FRACTION)
    log(f'rendered {a.pool} training images in {time.time() - t0:.0f}s')
    net = EvaluatorNet(width=a.width).train()
    opt = torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=1e-4)
    warm = max(1, a.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, a.steps, warm))
    rng = torch.Generator().manual_seed(a.seed)
    t1 = time.time()
    for step in range(a.steps):
        idx = torch.randint(a.pool, (a.batch,), generator=rng)
        x, quality = augment(images[idx], rng)
        out = net(x)
        loss, parts = loss_fn(out, presence[idx], centre[idx], size[idx], quality)
        optimizer_step(opt, loss)
        sched.step()
        if step % 100 == 0 or step == a.steps - 1:
            el = time.time() - t1
            log(f'step {step}/{a.steps} loss {loss.item():.4f} bce {parts["bce"]:.4f} centre err '
                f'{parts["loc_px"]:.2f}px(16-grid) {(step + 1) * a.batch / el:.0f} img/s')
    net.eval()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out),
              metadata={'width': str(a.width), 'embed_dim': '128'})
    res = evaluate_renderer(ShapesEvaluator(out))
    (out.parent / 'renderer_accuracy.json').write_text(json.dumps(res, indent=1))
    log(f'saved {out} ({out.stat().st_size / 1024:.0f} KiB) in {(time.time() - t0) / 60:.1f} min')
    for k in ('true', 'shuffled'):
        log(f'{k} captions: ' + ', '.join(f'{g} prompt acc {res[k][g]["prompt"]:.3f}' for g in ('single', 'two')) +
            f'; single colour {res[k]["single"]["colour"]:.3f} shape {res[k]["single"]["shape"]:.3f}')


if __name__ == '__main__':
    main()
