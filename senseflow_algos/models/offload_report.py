"""Where FSDP2 keeps the trained state between steps: the evidence that parameter CPU offload really offloads.

:func:`offload_report` reads FSDP2's own per-module state (each ``fully_shard`` module's ``FSDPParamGroup`` and its
offload policy, each ``FSDPParam``'s ``offload_to_cpu``) and the devices of the trained parameters' local shards, their
gradients and the optimizer state. :class:`ComputeDevices` records where forwards ran. On a GPU with
``trainer.parallelism_config.fsdp.cpu_offload: true`` the report should say: every group offloads, shards, gradients
and optimizer state on ``cpu``, compute on ``cuda`` (``bench/gpu_step.py --cpu-offload`` asserts that).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import nn

__all__ = ['ComputeDevices', 'offload_report']


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2 parameters, gradients and Adam moments), else the tensor itself."""
    return t.to_local() if hasattr(t, 'to_local') else t


def offload_report(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Count FSDP2 parameter groups by offload policy and the trained state's tensors by device type.

    Args:
        model (nn.Module): The model after Composer wrapped it with FSDP2.
        optimizer (torch.optim.Optimizer): Its optimizer; its param groups define "trained".

    Returns:
        dict: ``fsdp_groups`` (``fully_shard`` modules that hold parameters), ``offloading_groups`` (of those, with a
        ``CPUOffloadPolicy``), ``fsdp_params`` / ``offloaded_params`` (``FSDPParam`` objects and those with
        ``offload_to_cpu``), and ``shards`` / ``grads`` / ``optimizer_state``: ``{device type: tensor count}`` of the
        trained parameters' local shards, their gradients (where present) and the optimizer's non-scalar state.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule

    groups = offloading = params = offloaded = 0
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        group = module._get_fsdp_state()._fsdp_param_group  # torch 2.7 internals: no public accessor
        if group is None:
            continue
        groups += 1
        offloading += isinstance(group.offload_policy, CPUOffloadPolicy)
        params += len(group.fsdp_params)
        offloaded += sum(bool(p.offload_to_cpu) for p in group.fsdp_params)
    trained = [p for g in optimizer.param_groups for p in g['params']]
    state = [v for p in trained for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v) and v.ndim > 0]
    return {
        'fsdp_groups': groups,
        'offloading_groups': offloading,
        'fsdp_params': params,
        'offloaded_params': offloaded,
        'shards': dict(Counter(_local(p).device.type for p in trained)),
        'grads': dict(Counter(_local(p.grad).device.type for p in trained if p.grad is not None)),
        'optimizer_state': dict(Counter(_local(v).device.type for v in state)),
    }


class ComputeDevices:
    """Forward hooks that count the device types of the outputs of ``modules`` (where their compute ran).

    Args:
        modules: Modules to watch, e.g. one transformer block of each trained network.
    """

    def __init__(self, modules):
        self.devices: Counter[str] = Counter()
        self._handles = [m.register_forward_hook(self._record) for m in modules]

    def _record(self, module, args, output):
        out = output[0] if isinstance(output, (tuple, list)) else output
        if torch.is_tensor(out):
            self.devices[out.device.type] += 1

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
