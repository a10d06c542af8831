"""Worker for test_ida_fsdp.py (2 processes, gloo, CPU): shard-local IDA under FSDP2 equals the full formula."""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from senseflow_algos.functional import align_fake_score
from senseflow_algos.models.families.flux import without_guidance_embedding
from senseflow_algos.models.tiny import build_tiny_flux_pipeline


def shard(module: torch.nn.Module, mesh) -> torch.nn.Module:
    # Per-block wrapping, as the FLUX configs do, then the root.
    for block in [*module.transformer_blocks, *module.single_transformer_blocks]:
        fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def main() -> int:
    dist.init_process_group('gloo')
    rank = dist.get_rank()
    mesh = torch.distributed.device_mesh.init_device_mesh('cpu', (dist.get_world_size(),))
    generator = without_guidance_embedding(build_tiny_flux_pipeline(seed=0).transformer)
    fake = copy.deepcopy(generator)
    with torch.no_grad():  # make generator and fake score differ, identically on every rank
        g = torch.Generator().manual_seed(1)
        for p in generator.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    lam = 0.97
    expected = {k: lam * fake.state_dict()[k] + (1 - lam) * v for k, v in generator.state_dict().items()}
    generator, fake = shard(generator, mesh), shard(fake, mesh)
    local_before = {n: p.to_local().clone() for n, p in fake.named_parameters()}
    align_fake_score(fake, generator, lam)
    # Shard-local: each rank's local shard changed in place, no parameter became a full tensor.
    changed = sum(not torch.equal(p.to_local(), local_before[n]) for n, p in fake.named_parameters())
    worst = 0.0
    for name, p in fake.named_parameters():
        worst = max(worst, (p.full_tensor() - expected[name]).abs().max().item())
    if rank == 0:
        print(f'IDA_FSDP params={len(local_before)} changed={changed} max_abs_err={worst:.3e}', flush=True)
    ok = worst < 1e-6 and changed > 0
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == '__main__':
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    sys.exit(main())
