"""Parameter CPU offload under Composer's FSDP2: ``trainer.parallelism_config.fsdp.cpu_offload: true``.

Composer 0.32.1 has no working switch for it: its FSDP1 path raises ``FSDP CPU Offload not supported yet`` and its
FSDP2 config drops an unknown ``cpu_offload`` key with a warning. torch's FSDP2 supports it per ``fully_shard`` call
(``offload_policy=CPUOffloadPolicy()``): sharded parameters, their gradients and the optimizer state live in CPU
memory, each block's shard is copied to the GPU for its all-gather, and the optimizer step runs on the CPU. So every
``fully_shard`` Composer applies while the Trainer is built gets that policy here.

Gradient clipping reduces norms of those CPU-resident gradient shards across ranks, which NCCL cannot do; on GPUs the
process group therefore gets a gloo backend for CPU tensors beside NCCL (:class:`GPUWithCPUCollectives`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from composer.devices import DeviceGPU
from torch.distributed.fsdp import CPUOffloadPolicy

__all__ = ['GPUWithCPUCollectives', 'OffloadCount', 'fsdp2_cpu_offload', 'pop_cpu_offload']

KEY = 'trainer.parallelism_config.fsdp.cpu_offload'


class GPUWithCPUCollectives(DeviceGPU):
    """Composer's GPU device with a process group that runs CPU-tensor collectives on gloo and GPU ones on NCCL."""

    dist_backend = 'cuda:nccl,cpu:gloo'


class OffloadCount:
    """How many modules ``fully_shard`` put under the CPU offload policy (read after the Trainer is built)."""

    def __init__(self) -> None:
        self.modules = 0


def pop_cpu_offload(trainer_cfg: dict[str, Any], fsdp_version: str) -> tuple[dict[str, Any], bool]:
    """Take ``cpu_offload`` out of the trainer config's FSDP section (Composer must not see it).

    Args:
        trainer_cfg (dict): The ``trainer:`` section; not modified.
        fsdp_version (str): ``FSDP_VERSION`` from the environment (Composer's choice between FSDP1 and FSDP2).

    Returns:
        The trainer section for Composer, and whether parameters are offloaded.

    Raises:
        ValueError: ``cpu_offload`` is not a bool, or it is ``true`` under FSDP1.
    """
    fsdp = (trainer_cfg.get('parallelism_config') or {}).get('fsdp')
    if not fsdp or 'cpu_offload' not in fsdp:
        return trainer_cfg, False
    offload = fsdp['cpu_offload']
    if not isinstance(offload, bool):
        raise ValueError(f'{KEY} must be true or false, got {offload!r}')
    if offload and fsdp_version != '2':
        raise ValueError(f'{KEY}=true needs FSDP2: launch with FSDP_VERSION=2 (Composer 0.32.1\'s FSDP1 refuses '
                         'parameter CPU offload), or set it to false')
    rest = {k: v for k, v in fsdp.items() if k != 'cpu_offload'}
    return {**trainer_cfg, 'parallelism_config': {**trainer_cfg['parallelism_config'], 'fsdp': rest}}, offload


@contextlib.contextmanager
def fsdp2_cpu_offload(pin_memory: bool) -> Iterator[OffloadCount]:
    """Inside this block, every ``fully_shard`` Composer's FSDP2 path applies offloads to the CPU.

    Args:
        pin_memory (bool): Pin the CPU shards (faster host-to-device copies; needs CUDA).

    Yields:
        OffloadCount: The number of modules sharded with the offload policy so far.
    """
    from composer.distributed import fsdp2 as composer_fsdp2

    original, count = composer_fsdp2.fully_shard, OffloadCount()

    def fully_shard_offloaded(module, **kwargs):
        count.modules += 1
        return original(module, **kwargs, offload_policy=CPUOffloadPolicy(pin_memory=pin_memory))

    composer_fsdp2.fully_shard = fully_shard_offloaded
    try:
        yield count
    finally:
        composer_fsdp2.fully_shard = original
