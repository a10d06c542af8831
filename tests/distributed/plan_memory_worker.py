"""Worker for tests/plan/test_plan_distributed.py: train the tiny config under Composer's FSDP2 and then FSDP1 on 2 CPU
processes and write, per FSDP version and rank, the bytes FSDP really allocated for each network's sharded
parameters, gradients and AdamW moments.

    python -m composer.cli.launcher -n 2 tests/distributed/plan_memory_worker.py OUT yamls/tiny_flux.yaml [overrides]

writes ``OUT.fsdp<version>.rank<rank>.json``.

Allocation is read from storages (a view counts its whole storage once): FSDP1's flat parameters (``_local_shard``)
and their sharded gradients, FSDP2's padded per-parameter shards (``_sharded_param_data``) and the gradient
buffers their ``.grad`` views live in, and the optimizer's ``exp_avg`` / ``exp_avg_sq`` (local tensors). Gradients are
read after each phase's backward (a phase's gradients are dropped before the next phase runs). FSDP1 runs on the CPU
as tests/distributed/fsdp1_cpu_train.py arranges it (Composer's CUDA device id answered by the CPU).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from composer.core import Callback, Event  # noqa: E402
from composer.utils import dist  # noqa: E402

import senseflow_algos.builders as builders  # noqa: E402
from senseflow_algos.config import load_config  # noqa: E402

NETWORKS = ('generator', 'fake_score', 'teacher', 'discriminator')

# FSDP1 on CPU processes (as fsdp1_cpu_train.py): Composer's CUDA device id and this project's FSDP device are the CPU.
torch.cuda.current_device = lambda: torch.device('cpu')
builders.fsdp_device = lambda: torch.device('cpu')


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if hasattr(t, '_local_tensor') else t


def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        if t is not None:
            s = _local(t).untyped_storage()
            seen[s._cdata] = s.nbytes()
    return sum(seen.values())


def _sharded_param_storages(net: torch.nn.Module) -> list[torch.Tensor]:
    """The sharded (resting) parameter storage of every FSDP unit of ``net``."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(net, FullyShardedDataParallel):
        return [m._handle.flat_param._local_shard for m in FullyShardedDataParallel.fsdp_modules(net) if m._handle]
    out = []
    for m in net.modules():
        state = getattr(m, '_get_fsdp_state', None)
        group = state()._fsdp_param_group if state is not None else None
        if group is not None:
            out += [p._sharded_param_data for p in group.fsdp_params]
    return out


def _grads(net: torch.nn.Module) -> list[torch.Tensor]:
    from torch.distributed.fsdp import FullyShardedDataParallel

    grads = [p.grad for p in net.parameters()]
    if isinstance(net, FullyShardedDataParallel):
        grads += [m._handle.flat_param.grad for m in FullyShardedDataParallel.fsdp_modules(net) if m._handle]
    return grads


class AllocationProbe(Callback):
    """Records per-network sharded gradient bytes after every backward (keyed by phase)."""

    def __init__(self):
        self.grads: dict[str, dict[str, int]] = {}

    def run_event(self, event, state, logger):
        if event == Event.AFTER_BACKWARD:
            model = state.model
            phase = self.grads.setdefault(model.phase.value, {})
            for name in NETWORKS:
                phase[name] = max(phase.get(name, 0), _storage_bytes(_grads(getattr(model, name))))


def measure(version: str, out: str, config: str, overrides: list[str]) -> None:
    """Train under FSDP ``version`` and write this rank's allocation."""
    os.environ['FSDP_VERSION'] = version
    cfg = load_config(config, overrides)
    trainer = builders.build_trainer(cfg)
    probe = AllocationProbe()
    trainer.state.callbacks.append(probe)
    trainer.fit()
    model = trainer.state.model
    optimizer = trainer.state.optimizers[0]
    moments = {}
    for group in optimizer.param_groups:
        tensors = [v for p in group['params'] for k, v in optimizer.state[p].items() if k.startswith('exp_avg')]
        moments[group['role']] = moments.get(group['role'], 0) + _storage_bytes(tensors)
    result = {
        'rank': dist.get_global_rank(),
        'params': {name: _storage_bytes(_sharded_param_storages(getattr(model, name))) for name in NETWORKS},
        'grads': probe.grads,
        'optimizer': moments,
    }
    Path(f'{out}.fsdp{version}.rank{dist.get_global_rank()}.json').write_text(json.dumps(result))
    trainer.close()


if __name__ == '__main__':
    for fsdp_version in ('2', '1'):  # one launch (start-up is most of the time), two trainers
        measure(fsdp_version, sys.argv[1], sys.argv[2], sys.argv[3:])
