"""Saved-activation memory of the generator's GAN path at 1024 px, with and without gradient checkpointing.

    python bench/gan_path_memory.py [--resolution 1024] [--check-resolution 128] [--batch 1] [--hidden-channels N]

The generator's adversarial term differentiates through ``VAE.decode(x0)`` (FLUX's VAE architecture, 1024 px),
DiffAugment, the frozen DINOv2 ViT-L/14 at 1022 px (73x73 patches) and the trainable heads. Everything the forward
pass saves for that backward is counted with ``torch.autograd.graph.saved_tensors_hooks`` (each storage once;
parameters and buffers excluded), per stage, for four settings: no checkpointing, ``grad_checkpointing`` (backbone
blocks), ``decoder_grad_checkpointing`` (VAE decoder blocks) and both. With checkpointing, backward recomputes one
checkpointed unit at a time, so the path's backward peak is about what is still saved when a unit is recomputed
plus that unit's own saved bytes (also reported).

The 1024-px networks are built on the ``meta`` device (no weights, no memory; saved-tensor hooks still see every
tensor's size), from the architecture configs: FLUX.1-dev's ``vae/config.json`` and timm's
``vit_large_patch14_dinov2.lvd142m``. Attention is counted as a fused kernel (``q, k, v, out, logsumexp`` saved,
as flash / memory-efficient attention on a GPU and PyTorch's CPU flash kernel do; on ``meta`` PyTorch would
otherwise pick the math kernel and count the full attention matrix). Cross-check: the same networks with real
fp32 tensors on the CPU at ``--check-resolution`` (narrow heads), where the meta and CPU counts must agree to the byte and the
gradients into ``x0`` must agree across the four settings. Writes ``bench/results/gan_path_memory.{md,json}``.
A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from senseflow_algos.algorithms.vfm_discriminator import VFMDiscriminator  # noqa: E402
from senseflow_algos.algorithms.vfm_discriminator.diffaug import diff_augment  # noqa: E402
from senseflow_algos.algorithms.vfm_discriminator.losses import hinge_g_loss  # noqa: E402
from senseflow_algos.algorithms.vfm_discriminator.vfm_discriminator import enable_decoder_checkpointing  # noqa: E402
from senseflow_algos.models.families import get_family  # noqa: E402

#: black-forest-labs/FLUX.1-dev vae/config.json (architecture keys).
FLUX_VAE_CONFIG = {
    'act_fn': 'silu', 'block_out_channels': [128, 256, 512, 512], 'down_block_types': ['DownEncoderBlock2D'] * 4,
    'force_upcast': True, 'in_channels': 3, 'latent_channels': 16, 'layers_per_block': 2,
    'mid_block_add_attention': True, 'norm_num_groups': 32, 'out_channels': 3, 'sample_size': 1024,
    'scaling_factor': 0.3611, 'shift_factor': 0.1159, 'up_block_types': ['UpDecoderBlock2D'] * 4,
    'use_post_quant_conv': False, 'use_quant_conv': False,
}
FLUX_POOLED_TEXT_DIM = 768  # CLIP ViT-L/14 pooled text embedding (FLUX's pooled_projection_dim)
SETTINGS = {  # name -> (backbone grad_checkpointing, decoder_grad_checkpointing)
    'none': (False, False), 'backbone': (True, False), 'decoder': (False, True), 'both': (True, True)}
STAGES = ('vae_decode', 'augment', 'backbone', 'heads')
DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16}
GIB = 2**30


class SavedTensorMeter:
    """Bytes of the distinct storages autograd saves for backward, per stage; parameters and buffers excluded."""

    def __init__(self, exclude: Iterator[torch.Tensor]):
        self.excluded = {t.untyped_storage()._cdata for t in exclude}
        self.seen: dict[int, int] = {}
        self.by_stage: dict[str, int] = defaultdict(int)
        self.stage = 'other'

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.excluded and key not in self.seen:
            self.seen[key] = storage.nbytes()
            self.by_stage[self.stage] += storage.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.by_stage.values())

    @contextlib.contextmanager
    def measuring(self) -> Iterator[SavedTensorMeter]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """Route mask-free, dropout-free SDPA calls to PyTorch's flash kernel (runs on CPU and meta)."""
    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if attn_mask is None and dropout_p == 0.0 and not is_causal and not kwargs:
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, scale=scale)[0]
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, **kwargs)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


class CppSizeOneStrides(TorchDispatchMode):
    """On ``meta``, give size-1 dimensions the strides PyTorch's C++ kernels give them.

    Some meta kernels (Python elementwise decompositions such as ``div`` by a scalar) stride a size-1 dimension
    differently from the CPU/CUDA kernels. That is harmless for the values (a size-1 dimension is never stepped
    along) but changes the memory format a following convolution suggests, and with it whether diffusers'
    ``.contiguous()`` before a 1x1 shortcut conv copies (an extra saved tensor on meta only). Copying the strides of a
    same-shaped input that differ only at size-1 dimensions removes that artefact.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.device.type == 'meta':
            src = next((a for a in args if isinstance(a, torch.Tensor) and a.shape == out.shape), None)
            if src is not None and src.stride() != out.stride() and all(
                    a == b or n == 1 for a, b, n in zip(src.stride(), out.stride(), out.shape)):
                out = out.as_strided(out.shape, src.stride(), out.storage_offset())
        return out


class GanPath:
    """FLUX VAE + DINOv2-L backbone + heads of the production VFM configuration, on one device and dtype."""

    def __init__(self, resolution: int, device: str, dtype: torch.dtype, hidden_channels: Optional[int]):
        from diffusers import AutoencoderKL

        self.resolution, self.device, self.dtype = resolution, torch.device(device), dtype
        patch = 14
        algo = VFMDiscriminator(pretrained=False, input_size=resolution // patch * patch, hidden_channels=hidden_channels)
        with torch.device(device):
            torch.manual_seed(0)
            self.vae = AutoencoderKL(**FLUX_VAE_CONFIG).to(dtype).requires_grad_(False).eval()
            self.backbone = algo.build_backbone().to(dtype)
            # eval: spectral norm's power iteration holds still, so every setting sees the same weights.
            self.heads = algo.build_heads(self.backbone, FLUX_POOLED_TEXT_DIM).to(dtype).eval()
        self.family = get_family('flux')
        self.augment = algo.augment
        self.head_params = sum(p.numel() for p in self.heads.parameters())
        self.units = {'decoder': [self.vae.decoder.mid_block, *self.vae.decoder.up_blocks],
                      'backbone': list(self.backbone.model.blocks[:self.backbone.block_indices[-1] + 1])}

    def inputs(self, batch: int, seed: int = 0) -> dict:
        g = torch.Generator().manual_seed(seed)
        side = self.resolution // 8

        def rand(*shape):
            t = torch.randn(*shape, generator=g) if self.device.type == 'cpu' else torch.empty(*shape)
            return t.to(self.device)

        real = rand(batch, 3, self.resolution, self.resolution).clamp(-1, 1).to(self.dtype)
        with torch.no_grad(), fused_attention(), CppSizeOneStrides():
            ref = self.backbone(real)
        return {'x0': rand(batch, 16, side, side), 'text': rand(batch, FLUX_POOLED_TEXT_DIM).to(self.dtype),
                'ref': ref, 'weight': torch.ones(batch, device=self.device)}

    def run(self, inputs: dict, backbone_ckpt: bool, decoder_ckpt: bool, backward: bool = False) -> dict:
        """One generator-term forward (and optionally backward) under the meter; returns bytes and x0's gradient."""
        self.backbone.grad_checkpointing = backbone_ckpt
        if decoder_ckpt:  # as algorithms.vfm_discriminator.decoder_grad_checkpointing does at INIT
            enable_decoder_checkpointing(self.vae)
        else:
            self.vae.disable_gradient_checkpointing()
        params = [*self.vae.parameters(), *self.vae.buffers(), *self.backbone.parameters(), *self.backbone.buffers(),
                  *self.heads.parameters(), *self.heads.buffers()]
        meter = SavedTensorMeter(params)
        unit_bytes: dict[str, list[int]] = {k: [] for k in self.units}
        hooks = []
        if not (backbone_ckpt or decoder_ckpt):  # per-unit saved bytes: what one unit's recomputation holds
            for kind, modules in self.units.items():
                for m in modules:
                    start = {}
                    hooks.append(m.register_forward_pre_hook(lambda mod, a, s=start: s.update(n=meter.total)))
                    hooks.append(m.register_forward_hook(
                        lambda mod, a, o, s=start, k=kind: unit_bytes[k].append(meter.total - s['n'])))
        x0 = inputs['x0'].clone().requires_grad_(True)
        rng = torch.Generator(self.device).manual_seed(1) if self.device.type == 'cpu' else None
        with fused_attention(), CppSizeOneStrides(), meter.measuring():
            meter.stage = 'vae_decode'
            pixels = self.family.decode_latents(self.vae, x0)  # fp32 pixels, as in training
            meter.stage = 'augment'
            images = diff_augment(pixels, self.augment, rng=rng)
            meter.stage = 'backbone'
            feats = self.backbone(images)
            meter.stage = 'heads'
            loss = hinge_g_loss(self.heads(feats, inputs['text'], inputs['ref']).float(), inputs['weight'])
        for h in hooks:
            h.remove()
        grad = None
        if backward:
            with fused_attention():
                loss.backward()
            grad = x0.grad.detach().clone()
        return {'bytes': {s: meter.by_stage.get(s, 0) for s in STAGES}, 'total': meter.total,
                'unit_max': {k: max(v) if v else None for k, v in unit_bytes.items()}, 'grad': grad}


def measure(resolution: int, device: str, dtype: torch.dtype, batch: int, hidden: Optional[int],
            backward: bool = False) -> dict:
    path = GanPath(resolution, device, dtype, hidden)
    inputs = path.inputs(batch)
    out = {name: path.run(inputs, *flags, backward=backward) for name, flags in SETTINGS.items()}
    units = out['none']['unit_max']
    for name, (bb, dec) in SETTINGS.items():
        # Backward runs heads -> backbone -> augment -> decoder and frees each node's saved tensors once it ran: a
        # backbone block is recomputed while the decoder's and the backbone's saved tensors are still held, a decoder
        # block once only the decoder's are. Gradient buffers (about one activation at a time) are not counted.
        b = out[name]['bytes']
        out[name]['backward_peak_estimate'] = max(
            out[name]['total'],
            b['vae_decode'] + b['augment'] + b['backbone'] + units['backbone'] if bb else 0,
            b['vae_decode'] + units['decoder'] if dec else 0)
    return {'head_params': path.head_params, 'grid': path.backbone.grid_size, 'settings': out}


def _gib(b: Optional[int]) -> str:
    return '-' if b is None else f'{b / GIB:.2f}'


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--resolution', type=int, default=1024)
    p.add_argument('--check-resolution', type=int, default=128, help='real-tensor CPU cross-check resolution')
    p.add_argument('--check-hidden-channels', type=int, default=64,
                   help='head width of the cross-check (the default-width heads hold 773M parameters and their '
                        'gradients: 6 GB of host RAM for a check of the counting, not of the width)')
    p.add_argument('--batch', type=int, default=1, help='images per GPU in the generator term')
    p.add_argument('--hidden-channels', type=int, default=None, help='head trunk width (default: the backbone width)')
    p.add_argument('--dtypes', default='bf16,fp32')
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    # Cross-check first: meta and real CPU tensors count the same bytes; every setting gives the same gradient.
    print(f'cross-check at {a.check_resolution} px: meta vs real CPU tensors (fp32)', flush=True)
    meta = measure(a.check_resolution, 'meta', torch.float32, 1, a.check_hidden_channels)
    cpu = measure(a.check_resolution, 'cpu', torch.float32, 1, a.check_hidden_channels, backward=True)
    check = {}
    for name in SETTINGS:
        m, c = meta['settings'][name], cpu['settings'][name]
        g0, g = cpu['settings']['none']['grad'], c['grad']
        check[name] = {'meta_bytes': m['total'], 'cpu_bytes': c['total'], 'equal': m['total'] == c['total'],
                       'grad_max_abs_diff_vs_none': float((g - g0).abs().max()),
                       'grad_max_abs': float(g0.abs().max())}
        print(f'  {name}: meta {m["total"]} B, cpu {c["total"]} B, grad diff {check[name]["grad_max_abs_diff_vs_none"]:.2e}',
              flush=True)
    results = {}
    for dname in [d for d in a.dtypes.split(',') if d]:
        print(f'{a.resolution} px on meta, {dname}', flush=True)
        results[dname] = measure(a.resolution, 'meta', DTYPES[dname], a.batch, a.hidden_channels)
    for r in (meta, cpu, *results.values()):
        for s in r['settings'].values():
            s.pop('grad', None)

    command = 'python ' + ' '.join(sys.argv)
    first = next(iter(results.values()))
    grid = first['grid']
    lines = [f'# GAN-path saved activations at {a.resolution} px (generator term, batch {a.batch} per GPU)', '',
             f'Command: `{command}`  ',
             f'torch {torch.__version__}, {platform.machine()}, {time.time() - t0:.0f} s.', '',
             f'Path: FLUX VAE decode ({a.resolution} px) -> DiffAugment -> DINOv2 ViT-L/14 at '
             f'{grid[0] * 14} px ({grid[0]}x{grid[1]} patches, 8 feature maps) -> 8 heads of width '
             f'{a.hidden_channels or "1024 (backbone width)"} ({first["head_params"]:,} parameters) -> hinge. '
             'Bytes autograd saves for the backward pass (distinct storages, parameters and buffers excluded), GiB. '
             'Networks built on the meta device from the architecture configs; attention counted as a fused kernel. '
             '"Backward peak" adds the largest checkpointed unit that backward recomputes (one at a time) to what is '
             'still held when it runs (backward goes heads -> DINOv2 -> decoder, freeing as it goes).', '']
    for dname, r in results.items():
        lines += [f'## {dname} activations', '',
                  '| checkpointing | VAE decode | augment | DINOv2-L | heads | total saved | backward peak (est.) |',
                  '|---|---|---|---|---|---|---|']
        for name, s in r['settings'].items():
            b = s['bytes']
            lines.append(f'| {name} | {_gib(b["vae_decode"])} | {_gib(b["augment"])} | {_gib(b["backbone"])} | '
                         f'{_gib(b["heads"])} | **{_gib(s["total"])}** | {_gib(s["backward_peak_estimate"])} |')
        u = r['settings']['none']['unit_max']
        lines += ['', f'Largest recomputed unit: VAE decoder block {_gib(u["decoder"])} GiB, ViT block '
                  f'{_gib(u["backbone"])} GiB.', '']
    lines += [f'## Cross-check at {a.check_resolution} px (fp32, heads of width {a.check_hidden_channels}): meta vs '
              'real CPU tensors', '',
              '| checkpointing | meta bytes | CPU bytes | equal | max abs grad diff into x0 vs none (max abs grad) |',
              '|---|---|---|---|---|']
    for name, c in check.items():
        lines.append(f'| {name} | {c["meta_bytes"]:,} | {c["cpu_bytes"]:,} | {c["equal"]} | '
                     f'{c["grad_max_abs_diff_vs_none"]:.2e} ({c["grad_max_abs"]:.2e}) |')
    out_dir = REPO / 'bench' / 'results'
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / 'gan_path_memory.md').write_text('\n'.join(lines) + '\n')
    (out_dir / 'gan_path_memory.json').write_text(json.dumps(
        {'command': command, 'resolution': a.resolution, 'batch': a.batch, 'hidden_channels': a.hidden_channels,
         'results': results, 'cross_check': {'resolution': a.check_resolution,
                                             'hidden_channels': a.check_hidden_channels, 'settings': check,
                                             'meta': meta, 'cpu': cpu}}, indent=1, default=str))
    print('\n'.join(lines))
    return 0 if all(c['equal'] for c in check.values()) else 1


if __name__ == '__main__':
    sys.exit(main())
