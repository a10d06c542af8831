"""Measure activation memory of real passes on the CPU, for tests/plan/test_plan_activations.py.

    MALLOC_MMAP_THRESHOLD_=65536 python tests/plan/activation_probe.py

Prints one JSON line: for each probe, the peak increase of the process's resident memory (``VmHWM`` after resetting
it through ``/proc/self/clear_refs``) from the start of the forward to the end of the loss, i.e. while autograd
builds the graph that holds every tensor saved for backward. With a fixed mmap threshold glibc returns each freed
tensor's pages at once, so resident memory follows live tensors. The probes are the shapes of the planner's passes:

* ``transformer``: a FLUX transformer (2 double + 2 single blocks, width 512) taking a generator step with the DMD
  loss through ``FluxFamily.velocity`` (1024 image + 128 text tokens, batch 1), trainable, fp32;
* ``vae_decode``: a FLUX-architecture VAE decoding 16x16 latents to 128 px, frozen, with gradient to the latents;
* ``vae_decode_checkpointed``: the same with diffusers' gradient checkpointing (mid and up blocks), measured over
  forward and backward (the recomputation happens in backward).
"""

from __future__ import annotations

import gc
import json
import os

import torch

torch.set_num_threads(1)


def transformer(device: str = 'cpu') -> tuple[torch.nn.Module, dict]:
    from diffusers import FluxTransformer2DModel

    with torch.device(device):
        torch.manual_seed(0)
        net = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                                     attention_head_dim=64, num_attention_heads=8, joint_attention_dim=256,
                                     pooled_projection_dim=128, guidance_embeds=False, axes_dims_rope=(16, 24, 24))
    return net, {'latents': (1, 16, 64, 64), 'tokens': 128}


def vae(device: str = 'cpu') -> tuple[torch.nn.Module, dict]:
    from diffusers import AutoencoderKL

    with torch.device(device):
        torch.manual_seed(0)
        net = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=('DownEncoderBlock2D',) * 4,
                            up_block_types=('UpDecoderBlock2D',) * 4, latent_channels=16, layers_per_block=2,
                            use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
                            shift_factor=0.1159).requires_grad_(False)
    return net, {'latents': (1, 16, 16, 16)}


def inputs(shape: dict, make) -> dict:
    """The passes' inputs, made by ``make(*size)`` (random on the CPU, empty on the meta device)."""
    b, c, h, w = shape['latents']
    out = {'latents': make(b, c, h, w), 'real': make(b, c, h, w), 'fake': make(b, c, h, w), 'sigma': make(b)}
    if 'tokens' in shape:
        out['cond'] = {'prompt_embeds': make(b, shape['tokens'], 256), 'pooled_prompt_embeds': make(b, 128)}
    return out


def generator_step(net, x: dict) -> torch.Tensor:
    """The planner's generator pass: velocity through ``FluxFamily.velocity``, x0 and the DMD loss."""
    from senseflow_algos import flow
    from senseflow_algos.models.families import FluxFamily

    v = FluxFamily().velocity(net, x['latents'], x['sigma'], x['cond'])
    return flow.dmd_loss(flow.x0_from_velocity(x['latents'], v, x['sigma']), x['real'], x['fake'])


def decode(net, x: dict) -> torch.Tensor:
    from senseflow_algos.models.families import FluxFamily

    return FluxFamily().decode_latents(net, x['latents'])


def _status(key: str) -> int:
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _peak_during(fn) -> int:
    gc.collect()
    base = _status('VmRSS')
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # reset the high-water mark to the current resident size
    out = fn()
    peak = _status('VmHWM') - base
    del out
    return peak


def _random(*size):
    return torch.randn(*size) if len(size) > 1 else torch.rand(*size)


def main() -> None:
    result = {'mmap_threshold': os.environ.get('MALLOC_MMAP_THRESHOLD_')}
    torch.manual_seed(1)
    for name, build, run, grad_input in (('transformer', transformer, generator_step, False),
                                         ('vae_decode', vae, decode, True)):
        net, shape = build()
        x = inputs(shape, _random)
        x['latents'].requires_grad_(grad_input)
        run(net, x)  # warm-up: lazily created buffers and kernels do not count as activations
        result[name] = _peak_during(lambda net=net, run=run, x=x: run(net, x))
    net.enable_gradient_checkpointing()

    def forward_backward():
        decode(net, x).sum().backward()
        x['latents'].grad = None

    forward_backward()
    result['vae_decode_checkpointed'] = _peak_during(forward_backward)
    print(json.dumps(result))


if __name__ == '__main__':
    main()
