"""GPU step benchmark: the full SenseFlow step on a FLUX-width transformer at 1024x1024, bf16.

A FLUX.1-dev-width transformer (hidden 3072 = 24 heads x 128) at reduced depth (``--double``/``--single``
blocks), FLUX's VAE architecture (16 latent channels, 128x128 latents = 4096 image tokens), precomputed-size text
embeddings (512 T5 tokens of 4096, CLIP pooled 768), a DINOv2 ViT-L/14 VFM discriminator at 1022 px; all random
weights. Runs DMD + IDA + ISG + VFM discriminator through the real Composer Trainer and PhasedAdamW, and reports
seconds per generator update split by phase, peak memory, and model FLOP utilisation (FLOPs counted with
``torch.utils.flop_counter`` over one TTUR cycle).

    bash bench/run_gpu_step.sh            # one command; sized for < 5 minutes on one H200
    python bench/gpu_step.py --tiny       # CPU smoke test of the script itself
    python bench/gpu_step.py --fsdp [--cpu-offload]   # the same step FSDP-wrapped as in yamls/flux.yaml (1 process)

Writes ``bench/results/gpu_step{_fsdp,_fsdp_offload}{_tiny}.{md,json}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from composer import Trainer
from composer.core import Callback, Event
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from senseflow_algos.algorithms import ImplicitDistributionAlignment, IntraSegmentGuidance, VFMDiscriminator  # noqa
from senseflow_algos.models.dmd import DMDModel  # noqa: E402
from senseflow_algos.models.families import Components, FluxFamily  # noqa: E402
from senseflow_algos.models.families.flux import without_guidance_embedding  # noqa: E402
from senseflow_algos.models.fsdp import prepare_for_fsdp  # noqa: E402
from senseflow_algos.models.fsdp_offload import GPUWithCPUCollectives, fsdp2_cpu_offload  # noqa: E402
from senseflow_algos.models.offload_report import ComputeDevices, offload_report  # noqa: E402
from senseflow_algos.optim import PhasedAdamW  # noqa: E402

#: bf16 dense peak of one H200 (H100 SXM class), for MFU.
PEAK_TFLOPS = {'cuda': 989.0, 'cpu': float('nan')}


class PhaseTimer(Callback):
    """Wall time of each closure phase (BEFORE_TRAIN_BATCH .. AFTER_TRAIN_BATCH) and of each whole batch."""

    def __init__(self, sync):
        self.sync, self.times, self._start, self._batch = sync, defaultdict(list), None, None

    def run_event(self, event, state, logger):
        if event == Event.BATCH_START:
            self.sync()
            self._batch = time.perf_counter()
        elif event == Event.BEFORE_TRAIN_BATCH:
            self.sync()
            self._start = time.perf_counter()
        elif event == Event.AFTER_TRAIN_BATCH:
            self.sync()
            self.times[state.model.phase.value].append(time.perf_counter() - self._start)
        elif event == Event.BATCH_END:
            self.sync()
            self.times['batch'].append(time.perf_counter() - self._batch)


def build_components(args, device) -> tuple[Components, dict]:
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    dims = dict(hidden=3072, heads=24, head_dim=128, text=4096, pooled=768, tokens=512, rope=(16, 56, 56))
    vae_channels = [128, 256, 512, 512]
    if args.tiny:
        dims = dict(hidden=64, heads=2, head_dim=32, text=32, pooled=16, tokens=8, rope=(8, 12, 12))
        vae_channels = [8, 8, 16, 16]
    teacher = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=args.double, num_single_layers=args.single,
        attention_head_dim=dims['head_dim'], num_attention_heads=dims['heads'], joint_attention_dim=dims['text'],
        pooled_projection_dim=dims['pooled'], guidance_embeds=True, axes_dims_rope=dims['rope'])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=vae_channels,
                        down_block_types=['DownEncoderBlock2D'] * 4, up_block_types=['UpDecoderBlock2D'] * 4,
                        layers_per_block=1 if args.tiny else 2, norm_num_groups=4 if args.tiny else 32,
                        scaling_factor=0.3611, shift_factor=0.1159)
    teacher = teacher.to(device, torch.bfloat16)
    student = without_guidance_embedding(teacher, torch.float32)
    components = Components(teacher=teacher, student=student, vae=vae.to(device), conditioner=torch.nn.Identity(),
                            scheduler_config={})
    return components, dims


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--double', type=int, default=2, help='FLUX double-stream blocks (FLUX.1-dev: 19)')
    parser.add_argument('--single', type=int, default=4, help='FLUX single-stream blocks (FLUX.1-dev: 38)')
    parser.add_argument('--resolution', type=int, default=1024)
    parser.add_argument('--cycles', type=int, default=2, help='generator updates timed (after one warm-up cycle)')
    parser.add_argument('--gen-every', type=int, default=5)
    parser.add_argument('--tiny', action='store_true', help='tiny widths and 64 px: a CPU smoke test of this script')
    parser.add_argument('--fsdp', action='store_true', help='wrap as yamls/flux.yaml does: per-block FULL_SHARD, '
                        'activation checkpointing of generator and fake score (FSDP1 on a GPU, FSDP2 on a CPU)')
    parser.add_argument('--cpu-offload', action='store_true', help='FSDP2 with sharded parameters, gradients and '
                        'optimizer state in CPU memory (trainer.parallelism_config.fsdp.cpu_offload); implies --fsdp')
    parser.add_argument('--out', type=Path, default=REPO / 'bench' / 'results')
    args = parser.parse_args(argv)
    if args.tiny:
        args.resolution = 64
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    torch.manual_seed(0)
    components, dims = build_components(args, device)
    model = DMDModel(FluxFamily(), components, resolution=args.resolution, gen_every=args.gen_every)
    model.frozen_modules.remove('conditioner')  # precomputed embeddings: no text encoder
    n = 1
    latent = model.latent_shape
    batch = {
        'prompt_embeds': torch.randn(n, dims['tokens'], dims['text']),
        'pooled_prompt_embeds': torch.randn(n, dims['pooled']),
        'latents': torch.randn(n, *latent),
        'image': torch.rand(n, 3, args.resolution, args.resolution) * 2 - 1,
    }
    batches = args.gen_every * (args.cycles + 2)  # warm-up cycle, FLOP-count cycle, timed cycles
    loader = DataLoader([{k: v[0] for k, v in batch.items()}] * batches, batch_size=1)
    vfm = VFMDiscriminator(pretrained=False, input_size=1022, generator_weight=2.0) if not args.tiny else \
        VFMDiscriminator(backbone='vit_small_patch14_dinov2', pretrained=False, input_size=28, hidden_channels=16,
                         backbone_kwargs={'img_size': 28, 'depth': 4, 'embed_dim': 32, 'num_heads': 2})
    algorithms = [ImplicitDistributionAlignment(0.97), IntraSegmentGuidance(1.0, (1.0, 8.0)), vfm]
    optimizer = PhasedAdamW(model.param_groups(), controller=model, lr=1e-5, betas=(0.9, 0.999), weight_decay=0.0,
                            max_grad_norm=1.0)
    timer = PhaseTimer(sync)
    args.fsdp = args.fsdp or args.cpu_offload
    trainer_device, parallelism, offload = ('gpu' if device.type == 'cuda' else 'cpu'), None, contextlib.nullcontext()
    if args.fsdp:
        if args.cpu_offload or device.type == 'cpu':
            os.environ['FSDP_VERSION'] = '2'  # Composer's FSDP1 offloads nothing and needs CUDA
        prepare_for_fsdp(model, device)
        parallelism = {'fsdp': {'sharding_strategy': 'FULL_SHARD', 'mixed_precision': 'DEFAULT',
                                'activation_checkpointing': True, 'activation_checkpointing_reentrant': False,
                                'use_orig_params': True, 'state_dict_type': 'sharded'}}
    if args.cpu_offload:
        offload = fsdp2_cpu_offload(pin_memory=device.type == 'cuda')
        if device.type == 'cuda':
            trainer_device = GPUWithCPUCollectives()
    with offload:
        trainer = Trainer(model=model, train_dataloader=loader, optimizers=optimizer, algorithms=algorithms,
                          callbacks=[timer], max_duration=f'{batches}ba', device=trainer_device,
                          precision='amp_bf16' if device.type == 'cuda' else 'fp32', progress_bar=False,
                          log_to_console=False, parallelism_config=parallelism)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    # Where the trained networks' blocks compute (for the CPU-offload check: on the GPU while their shards live on the
    # CPU).
    compute = ComputeDevices([model.generator.transformer_blocks[0], model.fake_score.transformer_blocks[0]])
    from torch.utils.flop_counter import FlopCounterMode

    # Warm-up cycle (allocations, kernels), then one counted cycle for FLOPs, then timed cycles.
    trainer.fit(duration=f'{args.gen_every}ba')
    counter = FlopCounterMode(display=False)
    with counter:
        trainer.fit(duration=f'{args.gen_every}ba')
    flops_per_update = counter.get_total_flops()
    timer.times.clear()
    trainer.fit(duration=f'{args.gen_every * args.cycles}ba')
    placement = offload_report(trainer.state.model, trainer.state.optimizers[0])  # between steps: after the last one
    placement['compute'] = dict(compute.devices)
    compute.remove()
    trainer.close()
    offload_failures = []
    if args.cpu_offload:  # every unit offloads; shards, gradients and Adam moments on the CPU; compute on the device
        if not placement['fsdp_groups'] or placement['offloading_groups'] != placement['fsdp_groups']:
            offload_failures.append('not every FSDP2 param group has the CPU offload policy')
        for what in ('shards', 'grads', 'optimizer_state'):
            if set(placement[what]) - {'cpu'}:
                offload_failures.append(f'{what} not all on the CPU: {placement[what]}')
        if set(placement['compute']) != {device.type}:
            offload_failures.append(f'blocks computed on {placement["compute"]}, expected {device.type}')
    times = {k: sum(v) / args.cycles for k, v in timer.times.items()}  # per generator update (one TTUR cycle)
    seconds = times.pop('batch')
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == 'cuda' else float('nan')
    mfu = flops_per_update / seconds / (PEAK_TFLOPS[device.type] * 1e12)
    result = {
        'device': torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu',
        'config': {'double_blocks': args.double, 'single_blocks': args.single, 'hidden': dims['hidden'],
                   'resolution': args.resolution, 'latent': list(latent), 'gen_every': args.gen_every,
                   'batch_per_device': n, 'precision': 'amp_bf16' if device.type == 'cuda' else 'fp32',
                   'fsdp': f'FSDP{os.environ.get("FSDP_VERSION", "1")}' if args.fsdp else None,
                   'cpu_offload': args.cpu_offload},
        'seconds_per_generator_update': seconds, 'seconds_by_phase': times, 'peak_memory_gib': peak,
        'peak_host_memory_gib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # Linux: KiB
        'tflops_per_generator_update': flops_per_update / 1e12, 'mfu': mfu,
        'state_placement': placement, 'cpu_offload_failures': offload_failures if args.cpu_offload else None,
        'command': 'python bench/gpu_step.py ' + ' '.join(argv if argv is not None else sys.argv[1:]),
    }
    name = 'gpu_step' + ('_fsdp' if args.fsdp else '') + ('_offload' if args.cpu_offload else '') + \
        ('_tiny' if args.tiny else '')
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f'{name}.json').write_text(json.dumps(result, indent=2))
    lines = [f'# SenseFlow step on {result["device"]}\n', f'Command: `{result["command"].strip()}`  ',
             f'FLUX width {dims["hidden"]}, {args.double} double + {args.single} single blocks, '
             f'{args.resolution}px, TTUR {args.gen_every}, batch {n}/device, {result["config"]["precision"]}'
             + (f', {result["config"]["fsdp"]} per-block FULL_SHARD + activation checkpointing' if args.fsdp else '')
             + (', parameters/gradients/optimizer state offloaded to CPU' if args.cpu_offload else '') + '.\n',
             '| metric | value |', '|---|---|',
             f'| seconds per generator update ({args.gen_every} batches) | {seconds:.3f} |']
    lines += [f'| of which {phase} phases | {t:.3f} |' for phase, t in times.items()]
    lines += [f'| peak GPU memory (GiB) | {peak:.1f} |',
              f'| peak host memory (GiB) | {result["peak_host_memory_gib"]:.1f} |',
              f'| TFLOPs per generator update | {flops_per_update / 1e12:.2f} |',
              f'| MFU (vs {PEAK_TFLOPS[device.type]} TFLOP/s bf16) | {mfu:.1%} |']
    lines += [f'| FSDP2 groups offloading / all | {placement["offloading_groups"]} / {placement["fsdp_groups"]} |',
              f'| trained shards / grads / Adam state by device, between steps | {placement["shards"]} / '
              f'{placement["grads"]} / {placement["optimizer_state"]} |',
              f'| trained blocks computed on | {placement["compute"]} |']
    if args.cpu_offload:
        lines.append(f'| CPU offload check | {"; ".join(offload_failures) or "passed"} |')
    (args.out / f'{name}.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    return 1 if offload_failures else 0


if __name__ == '__main__':
    sys.exit(main())
