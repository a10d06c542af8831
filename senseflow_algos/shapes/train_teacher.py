"""Train the shapes-world teacher: a toy FLUX.1-dev (guidance-distilled) pipeline, on 2 CPU cores.

    python -m senseflow_algos.shapes.train_teacher --out senseflow_algos/shapes/assets/teacher

Stages (each resumable from ``--work``; ``--stages`` picks a subset):

1. ``data``: render a fixed pool of world samples (seed :data:`WORLD_SEED`) to ``work/pool.npz``.
2. ``vae``: train the ``AutoencoderKL`` on the pool (L1 + MSE + a small KL), then set its ``shift_factor`` /
   ``scaling_factor`` from the latent statistics (normalised latents: mean 0, std 1 over the pool).
3. ``t2i``: flow matching of the transformer and both text encoders on the VAE latents: ``x_t = (1 - s) x0 + s
   eps``, target ``eps - x0``, ``s`` logit-normal(0, 1), 10% of captions dropped to ``""`` (the unconditional
   branch), embedded guidance fixed at 1 (= the plain conditional model). EMA of the weights.
4. ``t2i_ft``: the same, continued from ``t2i`` at a lower learning rate with half of each batch drawn from
   captions that name a position (``on the left`` ...), in ``--ft-rounds`` rounds (``t2i_ft``, ``t2i_ft2``, ...),
   each continuing from the previous one with a fresh cosine schedule at ``--ft-lr-decay`` times the rate. Trained on the world's caption distribution alone, the
   model stays translation-equivariant and ignores position words (FLUX has no absolute position embedding: an
   image token learns where it is only through RoPE attention to the text tokens at position 0, and only the 25%
   of captions with a position reward that); the rebalanced batches bootstrap it. The conditional
   distribution of every caption is unchanged; only how often each caption is seen changes.
5. ``guidance``: FLUX-dev style guidance distillation. A copy of the stage-4 transformer learns, with guidance
   ``w ~ U(1, 8)`` in its guidance embedding, to reproduce the frozen stage-4 model's classifier-free guidance
   ``v_u + w (v_c - v_u)`` in one pass. Text encoders are frozen from here on.
6. ``save``: the EMA weights as a diffusers ``FluxPipeline`` folder (safetensors) at ``--out``.

All randomness is seeded; on the same machine and thread count the run is reproducible.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from composer.functional import compute_ema

from senseflow_algos import flow
from senseflow_algos.models.families.flux import FluxFamily
from senseflow_algos.shapes import components as C
from senseflow_algos.shapes.text_probe import TextProbe, caption_labels
from senseflow_algos.shapes.training import log, optimizer_step, warmup_cosine
from senseflow_algos.shapes.world import RELATIONS, parse_caption, prompt_set, render, sample_scene

WORLD_SEED = 1000
STAGES = ('data', 'vae', 'text', 't2i', 't2i_ft', 'guidance', 'save')


class EMA:
    """Exponential moving average of a module's state with warm-up: ``composer.functional.compute_ema`` at smoothing
    ``min(decay, (1+n)/(10+n))`` on update ``n`` (Composer's own EMA algorithm has no such warm-up).

    Non-floating-point state (e.g. integer buffers) is copied, not averaged. Note: the shipped ``assets/teacher`` was
    trained with a fused ``ema.mul_(d).add_(w, alpha=1 - d)``; ``compute_ema``'s two rounded products differ from it
    in the last bits (measured on the teacher's modules: up to 4.8e-7 after 100 updates), so a retrain reproduces the
    assets to that precision, not bit for bit.
    """

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay, self.n = decay, 0
        self.average = copy.deepcopy(module).requires_grad_(False)

    @property
    def shadow(self) -> dict[str, torch.Tensor]:
        """The averaged state dict (what a stage checkpoint stores)."""
        return self.average.state_dict()

    def load(self, shadow: dict[str, torch.Tensor], n: int) -> None:
        """Resume from a stage checkpoint's :attr:`shadow` after ``n`` updates."""
        self.average.load_state_dict(shadow)
        self.n = n

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.n += 1
        compute_ema(module, self.average, smoothing=min(self.decay, (1 + self.n) / (10 + self.n)))
        average = self.average.state_dict()
        for k, v in module.state_dict().items():
            if not v.dtype.is_floating_point:
                average[k].copy_(v)

    def copy_to(self, module: torch.nn.Module) -> torch.nn.Module:
        module.load_state_dict(self.average.state_dict())
        return module


def _set_lr(opt, step: int, total: int, base: float, warmup: int) -> None:
    """Linear warm-up, then cosine to 10% of ``base``."""
    for g in opt.param_groups:
        g['lr'] = base * warmup_cosine(step, total, warmup, floor=0.1)


def _progress(name: str, step: int, steps: int, losses: list[float], done: int, batch: int, t0: float) -> None:
    """Every 50 steps and at the last: mean loss of the last 50, samples/s over the ``done`` steps of this process,
    ETA."""
    if step % 50 == 0 or step == steps - 1:
        el = time.time() - t0
        log(f'{name} {step}/{steps} loss {np.mean(losses[-50:]):.4f} {done * batch / el:.1f} samples/s, '
            f'eta {el / done * (steps - step - 1) / 60:.1f} min')


# ---------------------------------------------------------------------------------------------------------------------
# data


def stage_data(work: Path, pool_size: int) -> None:
    path = work / 'pool.npz'
    if path.exists():
        log(f'data: {path} exists')
        return
    t = time.time()
    images = np.empty((pool_size, 3, C.RESOLUTION, C.RESOLUTION), dtype=np.uint8)
    captions = []
    for i in range(pool_size):
        scene = sample_scene(WORLD_SEED, i)
        images[i] = np.round(render(scene) * 255).astype(np.uint8)
        captions.append(scene.caption)
    np.savez(path, images=images, captions=np.array(captions))
    log(f'data: rendered {pool_size} samples in {time.time() - t:.0f}s')


def _load_pool(work: Path):
    d = np.load(work / 'pool.npz')
    images = torch.from_numpy(d['images']).float().div_(127.5).sub_(1.0)
    return images, _pool_captions(work)


def _pool_captions(work: Path) -> list[str]:
    return [str(c) for c in np.load(work / 'pool.npz')['captions']]


# ---------------------------------------------------------------------------------------------------------------------
# VAE


def stage_vae(work: Path, steps: int, batch: int, lr: float, kl_weight: float, seed: int) -> None:
    path = work / 'vae'
    if (path / 'config.json').exists():
        log(f'vae: {path} exists')
        return
    images, _ = _load_pool(work)
    vae = C.build_vae(seed).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    rng = torch.Generator().manual_seed(seed)
    start, ckpt = 0, work / 'vae_ckpt.pt'
    if ckpt.exists():
        state = torch.load(ckpt)
        vae.load_state_dict(state['vae']), opt.load_state_dict(state['opt']), rng.set_state(state['rng'])
        start = state['step']
        log(f'vae: resumed at step {start}')
    t0 = time.time()
    for step in range(start, steps):
        _set_lr(opt, step, steps, lr, 50)
        x = images[torch.randint(len(images), (batch,), generator=rng)]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=rng)
        rec = vae.decode(z).sample
        l1, mse = (rec - x).abs().mean(), F.mse_loss(rec, x)
        kl = post.kl().mean() / post.mean[0].numel()
        loss = l1 + mse + kl_weight * kl
        optimizer_step(opt, loss, vae, max_grad_norm=1.0)
        if step % 50 == 0 or step == steps - 1:
            el, done = time.time() - t0, step + 1 - start
            log(f'vae {step}/{steps} l1 {l1.item():.4f} mse {mse.item():.5f} kl {kl.item():.3f} '
                f'{done * batch / el:.1f} img/s, eta {el / done * (steps - step - 1) / 60:.1f} min')
        if (step + 1) % 500 == 0 and step + 1 < steps:
            torch.save({'vae': vae.state_dict(), 'opt': opt.state_dict(), 'rng': rng.get_state(), 'step': step + 1},
                       ckpt)
    vae.eval()
    n_stats = min(2048, len(images) // 2)
    held_out = images[-512:]  # the pool's tail: also trained on, but a PSNR over fresh samples is similar
    with torch.no_grad():
        z = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mode() for i in range(0, n_stats, 256)])
        rec = torch.cat([vae.decode(vae.encode(held_out[i:i + 256]).latent_dist.mode()).sample
                         for i in range(0, len(held_out), 256)])
    psnr = 10 * math.log10(4.0 / F.mse_loss(rec.clamp(-1, 1), held_out).item())
    shift, scale = z.mean().item(), 1.0 / z.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    vae.save_pretrained(path, safe_serialization=True)
    log(f'vae: saved, PSNR {psnr:.2f} dB, shift {shift:.4f} scale {scale:.4f}, '
        f'{(time.time() - t0) / 60:.1f} min; {_reconstruction_check(vae)}')


def _reconstruction_check(vae, n: int = 512) -> str:
    """Shape by pixel geometry of ``n`` fresh renderer images (evaluation seed 5000) and of their reconstructions: the
    teacher cannot draw crisper shapes than its VAE decodes."""
    from senseflow_algos.shapes.geometry import geometry_accuracy

    scenes = [sample_scene(5000, i) for i in range(n)]
    x = torch.from_numpy(np.stack([render(s) for s in scenes])).float().mul(2).sub(1)
    with torch.no_grad():
        rec = torch.cat([vae.decode(vae.encode(x[i:i + 256]).latent_dist.mode()).sample for i in range(0, n, 256)])
    captions = [s.caption for s in scenes]
    real, got = geometry_accuracy(x, captions), geometry_accuracy(rec, captions)
    return (f'shape by geometry, renderer {real["single"]:.3f} / {real["two"]:.3f}, '
            f'reconstructions {got["single"]:.3f} / {got["two"]:.3f} (single / two)')


# ---------------------------------------------------------------------------------------------------------------------
# text-to-image flow matching


def _encode_pool_latents(work: Path, vae, images: torch.Tensor) -> torch.Tensor:
    path = work / 'latents.pt'
    if path.exists():
        return torch.load(path)
    fam = FluxFamily()
    t = time.time()
    with torch.no_grad():
        lat = torch.cat([fam.encode_images(vae, images[i:i + 256]) for i in range(0, len(images), 256)])
    torch.save(lat, path)
    log(f't2i: encoded {len(images)} latents in {time.time() - t:.0f}s (std {lat.std():.3f})')
    return lat


def _text_modules(seed: int):
    tok, tok2 = C.build_tokenizers()
    clip, t5 = C.build_text_encoders(tok, tok2, seed)
    return tok, tok2, clip, t5


def stage_text(work: Path, steps: int, batch: int, lr: float, seed: int) -> None:
    """Pre-train CLIP and T5 on the pool's captions alone to carry the caption's structure
    (:class:`~senseflow_algos.shapes.text_probe.TextProbe`), as a real T5 arrives pre-trained."""
    path = work / 'text.pt'
    if path.exists():
        log(f'text: {path} exists')
        return
    captions = _pool_captions(work)
    tok, tok2, clip, t5 = _text_modules(seed)
    probe = TextProbe(C.T5_WIDTH, C.CLIP_WIDTH)
    modules = torch.nn.ModuleDict({'text_encoder': clip.train(), 'text_encoder_2': t5.train(), 'probe': probe})
    opt = torch.optim.AdamW(modules.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    held_out = prompt_set(512, 5000)
    t0, losses = time.time(), []
    for step in range(steps):
        rng = torch.Generator().manual_seed(seed * 1_000_003 + 11 * step + 5)
        _set_lr(opt, step, steps, lr, 50)
        prompts = [captions[i] for i in torch.randint(len(captions), (batch,), generator=rng).tolist()]
        loss, accuracy = probe.loss(C.encode_prompts(prompts, tok, clip, tok2, t5), caption_labels(prompts))
        optimizer_step(opt, loss, modules, max_grad_norm=1.0)
        losses.append(loss.item())
        _progress('text', step, steps, losses, step + 1, batch, t0)
    modules.eval()
    with torch.no_grad():
        _, accuracy = probe.loss(C.encode_prompts(held_out, tok, clip, tok2, t5), caption_labels(held_out))
    torch.save({'modules': modules.state_dict(), 'losses': losses, 'held_out_accuracy': accuracy}, path)
    log(f'text: done in {(time.time() - t0) / 60:.1f} min; structure read back from both encoders on 512 held-out '
        f'captions: {accuracy:.3f}')


def _names_a_place(caption: str) -> bool:
    """A position (``on the left``) or an ordering relation (``above``, ``to the left of``...): the captions whose
    layout the model must learn from the words, not from the shapes' colours."""
    return ' on the ' in caption or any(f' {r} ' in caption for r in RELATIONS if r != 'and')


def _place_or_two(caption: str) -> bool:
    """A position, or two objects (with or without a relation): everything but the plain one-shape caption."""
    return ' on the ' in caption or len(parse_caption(caption)['objects']) == 2


#: Which captions a stage's ``position_fraction`` draws from (``--t2i-focus`` / ``--ft-focus``).
FOCUS = {'place': _names_a_place, 'place_or_two': _place_or_two}


CHECKPOINT_EVERY = 500


def _resume(ckpt: Path, trained: torch.nn.Module, opt: torch.optim.Optimizer, ema: EMA, name: str) -> int:
    """Load a stage's mid-way checkpoint into ``trained`` / ``opt`` / ``ema`` if there is one; the step to go on at."""
    if not ckpt.exists():
        return 0
    state = torch.load(ckpt)
    trained.load_state_dict(state['modules']), opt.load_state_dict(state['opt'])
    ema.load(state['ema'], state['ema_n'])
    log(f'{name}: resumed at step {state["step"]}')
    return state['step']


def _checkpoint(ckpt: Path, step: int, steps: int, trained: torch.nn.Module, opt: torch.optim.Optimizer,
                ema: EMA) -> None:
    """Every ``CHECKPOINT_EVERY`` steps (not after the last: the stage's output follows) save what ``_resume`` reads."""
    if (step + 1) % CHECKPOINT_EVERY == 0 and step + 1 < steps:
        torch.save({'modules': trained.state_dict(), 'opt': opt.state_dict(), 'ema': ema.shadow, 'ema_n': ema.n,
                    'step': step + 1}, ckpt)


def stage_t2i(work: Path, steps: int, batch: int, lr: float, dropout: float, ema_decay: float, seed: int,
              arch: dict, name: str = 't2i', init: str | None = None, position_fraction: float = 0.0,
              sigma_mean: float = 0.0, text_weight: float = 0.0, focus: str = 'place') -> None:
    """Flow matching of transformer and text encoders.

    Args:
        init: Continue from this stage's weights (``None``: a fresh transformer and the ``text`` stage's encoders
            when it ran).
        position_fraction: Share of each batch drawn from the ``focus`` captions (the rest from the world's
            distribution).
        focus: Which captions (:data:`FOCUS`): ``place`` (a position or an ordering relation) or ``place_or_two``
            (a position, or two objects).
        sigma_mean: Mean of the logit-normal noise level (the shift the sampler applies: more weight on the high
            noise where the layout is decided).
        text_weight: Weight of the :class:`~senseflow_algos.shapes.text_probe.TextProbe` loss that keeps the
            caption's structure readable in the jointly trained encoders (0: off).
    """
    path = work / f'{name}.pt'
    if path.exists():
        log(f'{name}: {path} exists')
        return
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(work / 'vae').eval()
    images, captions = _load_pool(work)
    latents = _encode_pool_latents(work, vae, images)
    tok, tok2, clip, t5 = _text_modules(seed)
    net = C.build_transformer(seed, **arch).train()
    clip.train(), t5.train()
    modules = torch.nn.ModuleDict({'transformer': net, 'text_encoder': clip, 'text_encoder_2': t5})
    probe = TextProbe(C.T5_WIDTH, C.CLIP_WIDTH)
    if init is not None:
        source = torch.load(work / init)
        modules.load_state_dict(source['modules'])
        if 'probe' in source:
            probe.load_state_dict(source['probe'])
    elif (work / 'text.pt').exists():
        text = torch.nn.ModuleDict({'text_encoder': clip, 'text_encoder_2': t5, 'probe': probe})
        text.load_state_dict(torch.load(work / 'text.pt')['modules'])
        log(f'{name}: text encoders from the text stage')
    trained = torch.nn.ModuleDict({'networks': modules, 'probe': probe.train()})
    ema = EMA(modules, ema_decay)
    opt = torch.optim.AdamW(trained.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    chosen = torch.tensor([i for i, c in enumerate(captions) if FOCUS[focus](c)])
    ckpt = work / f'{name}_ckpt.pt'
    start = _resume(ckpt, trained, opt, ema, name)
    fam = FluxFamily()
    n_params = sum(p.numel() for p in net.parameters())
    log(f'{name}: transformer {n_params / 1e6:.2f}M params, {len(latents)} pool latents, sigma logit-normal '
        f'({sigma_mean:.2f}, 1), {position_fraction:.0%} of each batch from {focus} captions, text loss x{text_weight}')
    t0, losses, read = time.time(), [], []
    for step in range(start, steps):
        rng = torch.Generator().manual_seed(seed * 1_000_003 + step)
        _set_lr(opt, step, steps, lr, 100)
        idx = torch.randint(len(latents), (batch,), generator=rng)
        if position_fraction > 0:
            pick = chosen[torch.randint(len(chosen), (batch,), generator=rng)]
            idx = torch.where(torch.rand(batch, generator=rng) < position_fraction, pick, idx)
        x0 = latents[idx]
        drop = torch.rand(batch, generator=rng) < dropout
        prompts = ['' if d else captions[i] for d, i in zip(drop.tolist(), idx.tolist())]
        cond = C.encode_prompts(prompts, tok, clip, tok2, t5)
        sigma = flow.sample_logit_normal(batch, rng, mean=sigma_mean).float()
        noise = flow.sample_noise(x0.shape, rng)
        x_t = flow.add_noise(x0, noise, sigma)
        v = fam.velocity(net, x_t, sigma, cond, torch.ones(batch))
        loss = F.mse_loss(v, noise - x0)
        total = loss
        if text_weight > 0:
            text_loss, accuracy = probe.loss(cond, caption_labels(prompts))
            total = loss + text_weight * text_loss
            read.append(accuracy)
        optimizer_step(opt, total, trained, max_grad_norm=1.0)
        ema.update(modules)
        losses.append(loss.item())
        _progress(name, step, steps, losses, step + 1 - start, batch, t0)
        if read and (step % 500 == 0 or step == steps - 1):
            log(f'{name} {step}: caption structure read back {np.nanmean(read[-500:]):.3f}')
        _checkpoint(ckpt, step, steps, trained, opt, ema)
    ema.copy_to(modules)
    torch.save({'modules': modules.state_dict(), 'probe': probe.state_dict(), 'arch': arch, 'losses': losses}, path)
    log(f'{name}: done in {(time.time() - t0) / 60:.1f} min')


# ---------------------------------------------------------------------------------------------------------------------
# guidance distillation


def _ft_name(r: int) -> str:
    return 't2i_ft' if r == 0 else f't2i_ft{r + 1}'


def stage_guidance(work: Path, steps: int, batch: int, lr: float, guidance_range: tuple[float, float],
                   ema_decay: float, seed: int, arch: dict, ft_rounds: int = 1) -> None:
    path = work / 'guidance.pt'
    if path.exists():
        log(f'guidance: {path} exists')
        return
    captions = _pool_captions(work)  # the pool is used through its encoded latents here
    latents = torch.load(work / 'latents.pt')
    tok, tok2, clip, t5 = _text_modules(seed)
    base = C.build_transformer(seed, **arch)
    modules = torch.nn.ModuleDict({'transformer': base, 'text_encoder': clip, 'text_encoder_2': t5})
    done = [f'{_ft_name(r)}.pt' for r in range(ft_rounds) if (work / f'{_ft_name(r)}.pt').exists()]
    source = done[-1] if done else 't2i.pt'
    modules.load_state_dict(torch.load(work / source)['modules'])
    log(f'guidance: distilling {source}')
    modules.eval().requires_grad_(False)
    student = copy.deepcopy(base).train().requires_grad_(True)
    ema = EMA(student, ema_decay)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    fam = FluxFamily()
    with torch.no_grad():
        uncond1 = C.encode_prompts([''], tok, clip, tok2, t5)
    ckpt = work / 'guidance_ckpt.pt'
    start = _resume(ckpt, student, opt, ema, 'guidance')
    t0, losses = time.time(), []
    lo, hi = guidance_range
    for step in range(start, steps):
        rng = torch.Generator().manual_seed(seed * 1_000_003 + 7 * step + 1)
        _set_lr(opt, step, steps, lr, 50)
        idx = torch.randint(len(latents), (batch,), generator=rng)
        x0 = latents[idx]
        with torch.no_grad():
            cond = C.encode_prompts([captions[i] for i in idx.tolist()], tok, clip, tok2, t5)
            # Half logit-normal, half uniform sigmas: the sampler visits the whole [0, 1].
            sigma = torch.where(torch.rand(batch, generator=rng) < 0.5, flow.sample_logit_normal(batch, rng),
                                torch.rand(batch, generator=rng, dtype=torch.float64)).float()
            noise = flow.sample_noise(x0.shape, rng)
            x_t = flow.add_noise(x0, noise, sigma)
            w = lo + (hi - lo) * torch.rand(batch, generator=rng)
            both = {k: torch.cat([cond[k], uncond1[k].expand_as(cond[k])]) for k in cond}
            v = fam.velocity(base, torch.cat([x_t, x_t]), torch.cat([sigma, sigma]), both, torch.ones(2 * batch))
            v_c, v_u = v.chunk(2)
            target = v_u + w.view(-1, 1, 1, 1) * (v_c - v_u)
        pred = fam.velocity(student, x_t, sigma, cond, w)
        loss = F.mse_loss(pred, target)
        optimizer_step(opt, loss, student, max_grad_norm=1.0)
        ema.update(student)
        losses.append(loss.item())
        _progress('guidance', step, steps, losses, step + 1 - start, batch, t0)
        _checkpoint(ckpt, step, steps, student, opt, ema)
    ema.copy_to(student)
    modules['transformer'] = student
    torch.save({'modules': modules.state_dict(), 'arch': arch, 'losses': losses}, path)
    log(f'guidance: done in {(time.time() - t0) / 60:.1f} min')


# ---------------------------------------------------------------------------------------------------------------------
# export


def stage_save(work: Path, out: Path, seed: int, arch: dict, source: str = 'guidance.pt') -> None:
    from diffusers import AutoencoderKL, FluxPipeline

    tok, tok2, clip, t5 = _text_modules(seed)
    net = C.build_transformer(seed, **arch)
    modules = torch.nn.ModuleDict({'transformer': net, 'text_encoder': clip, 'text_encoder_2': t5})
    modules.load_state_dict(torch.load(work / source)['modules'])
    pipe = FluxPipeline(scheduler=C.build_scheduler(), vae=AutoencoderKL.from_pretrained(work / 'vae'),
                        text_encoder=clip.eval(), tokenizer=tok, text_encoder_2=t5.eval(), tokenizer_2=tok2,
                        transformer=net.eval())
    pipe.save_pretrained(out, safe_serialization=True)
    size = sum(f.stat().st_size for f in out.rglob('*') if f.is_file())
    (out / 'README.md').write_text(model_card(pipe, size, work))
    log(f'save: {out} ({size / 2**20:.2f} MiB)')


def model_card(pipe, size_bytes: int, work: Path) -> str:
    """The teacher folder's short model card: what it is, the one correct call, how it was trained."""
    def millions(m):
        return f'{sum(p.numel() for p in m.parameters()) / 1e6:.2f}M'

    args = json.loads((work / 'args.json').read_text()) if (work / 'args.json').exists() else {}
    t = pipe.transformer.config
    lo, hi = args.get('guidance_range', (1.0, 8.0))
    return f"""# Shapes-world teacher (toy FLUX.1-dev)

A guidance-distilled text-to-image `FluxPipeline` trained from scratch on the project's shapes world (32x32 images of
one or two flat shapes, captions such as `a red circle above a blue square`). It is the embedded default teacher of
senseflow-composer: `composer train.py yamls/shapes.yaml` distils it into a 4-step student on a CPU.

## Call it like this

```python
import torch
from diffusers import FluxPipeline

pipe = FluxPipeline.from_pretrained('senseflow_algos/shapes/assets/teacher', torch_dtype=torch.float32)
image = pipe('a red circle above a blue square', height={C.RESOLUTION}, width={C.RESOLUTION}, num_inference_steps={C.DEFAULT_STEPS},
             guidance_scale={C.DEFAULT_GUIDANCE:g}, max_sequence_length={C.MAX_SEQUENCE_LENGTH}).images[0]
```

- `max_sequence_length={C.MAX_SEQUENCE_LENGTH}`: the T5 length it was trained with (FLUX's default 512 pads tokens it never saw).
- `height` / `width` {C.RESOLUTION}: its only resolution (the default 1024 is 32x outside it).
- `guidance_scale`: embedded (FLUX.1-dev style) guidance, trained for {lo:g} to {hi:g}; {C.DEFAULT_GUIDANCE:g} is the reference.

## What is inside ({size_bytes / 2**20:.1f} MiB, fp32 safetensors)

- transformer: `FluxTransformer2DModel`, {millions(pipe.transformer)} parameters, {t.num_layers} double + {t.num_single_layers} single
  blocks, {t.num_attention_heads} heads x {t.attention_head_dim}, guidance embedding;
- vae: `AutoencoderKL`, {millions(pipe.vae)}, {pipe.vae.config.latent_channels} latent channels, 32x32 <-> 8x8 (16 image tokens);
- text_encoder: `CLIPTextModel` ({millions(pipe.text_encoder)}, pooled), text_encoder_2: `T5EncoderModel`
  ({millions(pipe.text_encoder_2)}, {pipe.text_encoder_2.config.num_layers} layers), with the project's word-level tokenizers.

## How it was trained

`python -m senseflow_algos.shapes.train_teacher` (resumable stages data, vae, text, t2i, t2i_ft, guidance, save;
seed {args.get('seed', 0)}, on 2 CPU cores). Measured quality, method and reasons: `senseflow_algos/shapes/README.md`
in senseflow-composer.
"""


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog='python -m senseflow_algos.shapes.train_teacher', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default=str(C.TEACHER_DIR), help='pipeline folder to write')
    p.add_argument('--work', default='runs/shapes_teacher', help='stage outputs and checkpoints')
    p.add_argument('--stages', default=','.join(STAGES))
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int, default=1, help='torch intra-op threads (1: fastest on a shared 2-core machine)')
    p.add_argument('--pool', type=int, default=40000, help='rendered training samples')
    p.add_argument('--vae-steps', type=int, default=3000)
    p.add_argument('--vae-batch', type=int, default=32)
    p.add_argument('--vae-lr', type=float, default=1e-3)
    p.add_argument('--kl-weight', type=float, default=1e-4)
    p.add_argument('--text-steps', type=int, default=3000, help='stage text: caption-structure pre-training steps')
    p.add_argument('--text-batch', type=int, default=128)
    p.add_argument('--text-lr', type=float, default=1e-3)
    p.add_argument('--text-weight', type=float, default=0.1, help='caption-structure loss weight in t2i stages')
    p.add_argument('--sigma-mean', type=float, default=FluxFamily().mu((8, 8)),
                   help="logit-normal mean of the training noise level (default: FLUX's shift at 16 tokens)")
    p.add_argument('--t2i-steps', type=int, default=6000)
    p.add_argument('--t2i-batch', type=int, default=64)
    p.add_argument('--t2i-lr', type=float, default=6e-4)
    p.add_argument('--t2i-place-fraction', type=float, default=0.25,
                   help='share of each t2i batch drawn from the --t2i-focus captions')
    p.add_argument('--t2i-focus', choices=sorted(FOCUS), default='place')
    p.add_argument('--caption-dropout', type=float, default=0.1)
    p.add_argument('--ft-steps', type=int, default=2500, help='stage t2i_ft: steps (0 skips the stage)')
    p.add_argument('--ft-lr', type=float, default=3e-4)
    p.add_argument('--ft-position-fraction', type=float, default=0.5,
                   help='share of each t2i_ft batch drawn from the --ft-focus captions')
    p.add_argument('--ft-focus', choices=sorted(FOCUS), default='place_or_two')
    p.add_argument('--ft-rounds', type=int, default=3, help='t2i_ft rounds, each continuing from the previous')
    p.add_argument('--ft-lr-decay', type=float, default=0.67, help='learning-rate factor per t2i_ft round')
    p.add_argument('--guidance-steps', type=int, default=1200)
    p.add_argument('--guidance-batch', type=int, default=64)
    p.add_argument('--guidance-lr', type=float, default=3e-4)
    p.add_argument('--guidance-range', type=float, nargs=2, default=(1.0, 8.0))
    p.add_argument('--ema', type=float, default=0.998)
    p.add_argument('--heads', type=int, default=4)
    p.add_argument('--head-dim', type=int, default=32)
    p.add_argument('--double', type=int, default=3)
    p.add_argument('--single', type=int, default=3)
    a = p.parse_args(argv)
    C.num_threads(a.threads)
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    arch = dict(heads=a.heads, head_dim=a.head_dim, double=a.double, single=a.single)
    (work / 'args.json').write_text(json.dumps(vars(a), indent=1))
    stages = a.stages.split(',')
    t = time.time()
    if 'data' in stages:
        stage_data(work, a.pool)
    if 'vae' in stages:
        stage_vae(work, a.vae_steps, a.vae_batch, a.vae_lr, a.kl_weight, a.seed)
    if 'text' in stages and a.text_steps > 0:
        stage_text(work, a.text_steps, a.text_batch, a.text_lr, a.seed)
    flow_kwargs = dict(sigma_mean=a.sigma_mean, text_weight=a.text_weight)
    if 't2i' in stages:
        stage_t2i(work, a.t2i_steps, a.t2i_batch, a.t2i_lr, a.caption_dropout, a.ema, a.seed, arch,
                  position_fraction=a.t2i_place_fraction, focus=a.t2i_focus, **flow_kwargs)
    if 't2i_ft' in stages and a.ft_steps > 0:
        for r in range(a.ft_rounds):
            name, init = _ft_name(r), 't2i.pt' if r == 0 else f'{_ft_name(r - 1)}.pt'
            stage_t2i(work, a.ft_steps, a.t2i_batch, a.ft_lr * a.ft_lr_decay**r, a.caption_dropout, a.ema,
                      a.seed + 1 + r, arch, name=name, init=init, position_fraction=a.ft_position_fraction,
                      focus=a.ft_focus, **flow_kwargs)
    if 'guidance' in stages:
        stage_guidance(work, a.guidance_steps, a.guidance_batch, a.guidance_lr, tuple(a.guidance_range), a.ema,
                       a.seed, arch, a.ft_rounds if a.ft_steps > 0 else 0)
    if 'save' in stages:
        stage_save(work, out, a.seed, arch)
    log(f'total {(time.time() - t) / 60:.1f} min')


if __name__ == '__main__':
    main()
