"""Worker for test_sr_fsdp.py (2 processes, gloo, CPU): PhasedAdamW with stochastic rounding on sharded bf16 weights.

``python sr_fsdp_worker.py fsdp2|fsdp1``. Two units of 256 x 200 bf16 weights drawn from N(0, 0.02), each its own FSDP
unit under a root (FULL_SHARD; FSDP1 with ``use_orig_params``, as Composer wraps), 20 steps at lr 1e-5. The loss is
``sum(W * G_t)``, so every weight's gradient is the known ``G_t`` (the same on both ranks; FSDP averages them) and
the fp64 AdamW reference needs no model. Prints one line of measures, checked by the test.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy, StateDictType, fully_shard
from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

from senseflow_algos.optim import Phase, PhasedAdamW

STEPS, LR, BETAS, EPS, WD = 20, 1e-5, (0.9, 0.999), 1e-8, 0.0
GEN = Phase('generator', ('generator',))


class Unit(nn.Module):

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return (self.weight.float() * g).sum()


class Net(nn.Module):

    def __init__(self, weights):
        super().__init__()
        self.units = nn.ModuleList(Unit(w) for w in weights)

    def forward(self, grads):
        return sum(u(g) for u, g in zip(self.units, grads))


class Controller:
    """Like DMDModel: a per-batch stream seeded by (batch, purpose), the same on every rank for per_rank=False."""

    def __init__(self):
        self.batch = 0

    def training_phases(self):
        return [GEN]

    def begin_phase(self, phase):
        pass

    def end_phase(self, phase):
        pass

    def end_batch(self):
        self.batch += 1

    def rng(self, purpose, per_rank=True):
        rank = dist.get_rank() if per_rank else -1
        seed = int.from_bytes(hashlib.blake2b(repr((rank, self.batch, purpose)).encode(), digest_size=8).digest(),
                              'little') >> 2
        return torch.Generator().manual_seed(seed)


def reference(theta0: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    """fp64 AdamW (Loshchilov & Hutter; torch docs)."""
    theta, m, v = theta0.double().clone(), torch.zeros_like(theta0, dtype=torch.float64), \
        torch.zeros_like(theta0, dtype=torch.float64)
    b1, b2 = BETAS
    for t, g in enumerate(grads, start=1):
        g = g.double()
        theta = theta - LR * WD * theta
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        theta = theta - LR * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + EPS)
    return theta


def full_weights(net: nn.Module, version: str) -> list[torch.Tensor]:
    if version == 'fsdp2':
        return [u.weight.full_tensor().detach().clone() for u in net.units]
    with FullyShardedDataParallel.state_dict_type(net, StateDictType.FULL_STATE_DICT):
        state = net.state_dict()
    return [state[f'units.{i}.weight'].clone() for i in range(len(net.units))]


def main(version: str) -> int:
    dist.init_process_group('gloo')
    rank = dist.get_rank()
    rng = torch.Generator().manual_seed(0)  # same draws on every rank
    weights = [(torch.randn(256, 200, generator=rng) * 0.02).to(torch.bfloat16) for _ in range(2)]
    grads = [[torch.randn(256, 200, generator=rng) for _ in range(2)] for _ in range(STEPS)]
    net = Net([w.clone() for w in weights])
    if version == 'fsdp2':
        mesh = torch.distributed.device_mesh.init_device_mesh('cpu', (dist.get_world_size(),))
        for unit in net.units:
            fully_shard(unit, mesh=mesh)
        fully_shard(net, mesh=mesh)
    else:
        policy = functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda m: isinstance(m, Unit))
        net = FullyShardedDataParallel(net, auto_wrap_policy=policy, sharding_strategy=ShardingStrategy.FULL_SHARD,
                                       use_orig_params=True, device_id=torch.device('cpu'))
    params = [p for p in net.parameters()]
    opt = PhasedAdamW([{'params': params, 'role': 'generator'}], controller=Controller(), lr=LR, betas=BETAS, eps=EPS,
                      weight_decay=WD, stochastic_rounding=True)
    for step_grads in grads:

        def closure(step_grads=step_grads):
            opt.zero_grad(set_to_none=True)
            loss = net(step_grads)
            loss.backward()
            return loss.item()

        opt.step(closure)
    sharded = all(type(p).__name__ == 'DTensor' for p in params) if version == 'fsdp2' else \
        all(p.numel() < 256 * 200 for p in params)
    held = [p for p in params if p.numel() > 0]
    moments_fp32 = all(opt.state[p]['exp_avg'].dtype == torch.float32 for p in held)
    bf16 = all(p.dtype == torch.bfloat16 for p in params)
    after = full_weights(net, version)  # collective
    moved = taken = 0.0
    for w0, w, i in zip(weights, after, range(2)):
        ref = reference(w0, [g[i].to(torch.bfloat16) for g in grads])  # FSDP hands bf16 gradients to the optimizer
        d = ref - w0.double()
        moved += (w != w0).float().mean().item() / 2
        taken += ((w.double() - w0.double()).flatten() @ d.flatten() / (d.flatten() @ d.flatten())).item() / 2
    if rank == 0:
        print(f'SR_{version.upper()} sharded={sharded} held={len(held)} bf16={bf16} moments_fp32={moments_fp32} '
              f'moved={moved:.4f} taken={taken:.4f}', flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == '__main__':
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    sys.exit(main(sys.argv[1]))
