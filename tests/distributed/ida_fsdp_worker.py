"""Worker for test_ida_fsdp.py (2 processes, gloo, CPU): shard-local IDA under FSDP2 or FSDP1 equals the full formula.

``python ida_fsdp_worker.py fsdp2|fsdp1``. FSDP1 is wrapped as Composer wraps the production configs (per-block units,
FULL_SHARD, ``use_orig_params``): the lerp then runs on each rank's views into its flat-parameter shard.
"""

from __future__ import annotations

import copy
import functools
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy, StateDictType, fully_shard
from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

from senseflow_algos.functional import align_fake_score
from senseflow_algos.models.families.flux import without_guidance_embedding
from senseflow_algos.models.fsdp import transformer_block_types
from senseflow_algos.models.tiny import build_tiny_flux_pipeline


def shard_fsdp2(module: torch.nn.Module, mesh) -> torch.nn.Module:
    # Per-block wrapping, as the FLUX configs do, then the root.
    for block in [*module.transformer_blocks, *module.single_transformer_blocks]:
        fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def shard_fsdp1(module: torch.nn.Module) -> torch.nn.Module:
    blocks = transformer_block_types(module)
    policy = functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda m: isinstance(m, blocks))
    return FullyShardedDataParallel(module, auto_wrap_policy=policy, sharding_strategy=ShardingStrategy.FULL_SHARD,
                                    use_orig_params=True, device_id=torch.device('cpu'))


def local_shards(module: torch.nn.Module, version: str) -> dict[str, torch.Tensor]:
    """This rank's piece of every parameter (FSDP1: a 1-D view into the flat shard, possibly empty)."""
    return {n: (p.to_local() if version == 'fsdp2' else p).detach().clone() for n, p in module.named_parameters()}


def full_parameters(module: torch.nn.Module, version: str) -> dict[str, torch.Tensor]:
    if version == 'fsdp2':
        return {n: p.full_tensor() for n, p in module.named_parameters()}
    with FullyShardedDataParallel.state_dict_type(module, StateDictType.FULL_STATE_DICT):
        return module.state_dict()


def main(version: str) -> int:
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
    shard = (lambda m: shard_fsdp2(m, mesh)) if version == 'fsdp2' else shard_fsdp1
    generator, fake = shard(generator), shard(fake)
    local_before = local_shards(fake, version)
    align_fake_score(fake, generator, lam)
    # Shard-local: each rank's local shard changed in place, no parameter became a full tensor.
    local_after = local_shards(fake, version)
    changed = sum(p.numel() > 0 and not torch.equal(p, local_before[n]) for n, p in local_after.items())
    held = sum(p.numel() > 0 for p in local_after.values())
    full = full_parameters(fake, version)  # collective: every rank takes part
    worst = max((full[name.replace('_fsdp_wrapped_module.', '')] - expected[name.replace('_fsdp_wrapped_module.', '')])
                .abs().max().item() for name in local_after)
    if rank == 0:
        print(f'IDA_{version.upper()} params={len(local_after)} held={held} changed={changed} max_abs_err={worst:.3e} '
              f'full_keys={len(full)}/{len(expected)}', flush=True)
    ok = worst < 1e-6 and changed == held > 0 and len(full) == len(expected)
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == '__main__':
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    sys.exit(main(sys.argv[1]))
