"""Per-rank bytes of weights, gradients and optimizer state under Composer's FSDP (or DDP / one device).

Each sharded network is one FSDP root whose units are the modules its ``fsdp_wrap_fn`` selects (transformer blocks)
plus the root itself; a parameter belongs to the innermost unit containing it. The per-rank sizes follow torch's
allocation rules (torch 2.7):

* FSDP1 (``use_orig_params=True``): each unit is one flat parameter; every original parameter starts at a 16-byte
  aligned offset (alignment in the forward/backward dtype), the total is padded to a multiple of the shard degree,
  and each rank holds an equal slice. The sharded gradient is that whole slice (also for a unit whose parameters are
  only partly trainable, e.g. under LoRA); AdamW's moments are sized by each parameter's own piece of the slice.
* FSDP2: every parameter is split along dim 0 in chunks of ``ceil(d0 / S)`` rows; every rank allocates the padded
  chunk; a unit's gradients are views into one buffer of the padded chunks of its trainable parameters; AdamW's
  moments are the unpadded local chunk.

Buffers are not sharded (FSDP1 casts them to the mixed-precision buffer dtype). Unwrapped networks (VAE, text
encoders, VFM backbone) are whole on every rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from senseflow_algos.plan.networks import Network
from senseflow_algos.plan.settings import RunSettings

__all__ = ['Sharding', 'resolve_sharding', 'Unit', 'fsdp_units', 'NetworkMemory', 'network_memory',
           'moment_bytes']

_PRECISION_DTYPE = {'amp_bf16': torch.bfloat16, 'fp32': torch.float32}


@dataclass
class Sharding:
    """How the sharded networks are split (``None`` from :func:`resolve_sharding`: no FSDP).

    Attributes:
        version: 1 or 2 (Composer's FSDP1 or FSDP2, chosen by ``FSDP_VERSION``).
        strategy: The strategy Composer ends up using (after its 1-D / 2-D mesh conversions).
        shard_degree: Ranks one unit is split over.
        world: All ranks.
        param_dtype / reduce_dtype / buffer_dtype: Composer's mixed precision (``None``: the parameter's own).
        offload: Sharded parameters, gradients and optimizer state in host memory (FSDP2).
    """
    version: int
    strategy: str
    shard_degree: int
    world: int
    param_dtype: Optional[torch.dtype]
    reduce_dtype: Optional[torch.dtype]
    buffer_dtype: Optional[torch.dtype]
    offload: bool
    notes: list[str] = field(default_factory=list)


def resolve_sharding(settings: RunSettings, world: int, gpus_per_node: int, version: int) -> Optional[Sharding]:
    """The effective sharding of the run on ``world`` ranks, as Composer 0.32.1 sets it up."""
    fsdp = settings.fsdp
    if fsdp is None:
        return None
    notes = []
    precision = _PRECISION_DTYPE.get(settings.precision, torch.float32)
    mp = fsdp.mixed_precision
    param_dtype = reduce_dtype = buffer_dtype = None
    if mp == 'DEFAULT':
        param_dtype, reduce_dtype, buffer_dtype = precision, torch.float32, precision
    elif mp == 'PURE':
        param_dtype = reduce_dtype = buffer_dtype = precision
    if version == 2:
        if fsdp.strategy != 'FULL_SHARD' or fsdp.replicate_degree is not None:
            notes.append(f'FSDP2 (Composer 0.32.1) ignores sharding_strategy={fsdp.strategy} and the data-parallel '
                         'degrees: FULL_SHARD over all ranks')
        return Sharding(2, 'FULL_SHARD', world, world, param_dtype, reduce_dtype, None, fsdp.cpu_offload, notes)
    strategy = fsdp.strategy
    shard = world
    if fsdp.replicate_degree is not None:  # a 2-D mesh (replicate x shard)
        replicate, shard = fsdp.replicate_degree, fsdp.shard_degree
        if replicate == -1 and shard == -1:
            raise ValueError('data_parallel_replicate_degree and data_parallel_shard_degree cannot both be -1')
        replicate = world // shard if replicate == -1 else replicate
        shard = world // replicate if shard == -1 else shard
        if replicate * shard != world:
            raise ValueError(f'data_parallel_replicate_degree x data_parallel_shard_degree = {replicate} x {shard} '
                             f'does not equal the world size {world}')
        if strategy == 'FULL_SHARD':
            strategy = 'HYBRID_SHARD'
            notes.append('FULL_SHARD with a 2-D mesh: Composer uses HYBRID_SHARD')
        if shard > gpus_per_node:
            notes.append(f'the shard group ({shard} ranks) spans nodes: all-gathers cross the inter-node network')
    elif strategy == 'HYBRID_SHARD':
        notes.append('HYBRID_SHARD needs a 2-D mesh (data_parallel_shard_degree=<GPUs per node>, '
                     'data_parallel_replicate_degree=-1); with a 1-D mesh Composer 0.32.1 falls back to FULL_SHARD')
        strategy = 'FULL_SHARD'
    if strategy == 'NO_SHARD':
        shard = 1
    if fsdp.cpu_offload:
        raise ValueError('trainer.parallelism_config.fsdp.cpu_offload needs FSDP2 (FSDP_VERSION=2)')
    return Sharding(1, strategy, shard, world, param_dtype, reduce_dtype, buffer_dtype, False, notes)


@dataclass
class Unit:
    """One FSDP unit: its module and the parameters it flattens (in FSDP1's order)."""
    module: nn.Module
    params: list[nn.Parameter]
    is_root: bool

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.params)


def fsdp_units(net: Network) -> list[Unit]:
    """The network's FSDP units, innermost first, root last (a parameter belongs to the innermost unit)."""
    root = net.module
    wrapped = [m for m in root.modules() if m is not root and net.wrap_fn is not None and net.wrap_fn(m)]
    owned: set[int] = set()
    units = []
    for module in [*reversed(wrapped), root]:  # FSDP wraps bottom-up: a nested unit claims its parameters first
        params = []
        for _, sub in module.named_modules(remove_duplicate=False):
            for p in sub.parameters(recurse=False):
                if id(p) not in owned:
                    owned.add(id(p))
                    params.append(p)
        if params or module is root:
            units.append(Unit(module, params, module is root))
    return units


def _fsdp1_flat(unit: Unit, shard: int, align_dtype: torch.dtype) -> tuple[int, list[tuple[int, int]]]:
    """FSDP1 flat parameter of a unit: total padded numel and each parameter's ``(start, numel)`` in it."""
    aligned = 16 // torch.empty((), dtype=align_dtype).element_size()
    total, spans = 0, []
    for p in unit.params:
        if total % aligned:
            total += aligned - total % aligned
        spans.append((total, p.numel()))
        total += p.numel()
    if total % shard:
        total += shard - total % shard
    return total, spans


def _fsdp2_chunk_rows(d0: int, shard: int, rank: int) -> tuple[int, int]:
    """FSDP2 dim-0 split: ``(padded rows every rank allocates, this rank's real rows)``."""
    rows = math.ceil(d0 / shard)
    return rows, max(0, min(rows, d0 - rank * rows))


def moment_bytes(numel: int, full_numel: int, param_dtype: torch.dtype, settings: RunSettings) -> int:
    """Bytes of AdamW's two moments for ``numel`` local elements of a parameter of ``full_numel`` elements."""
    if settings.optimizer_kind == 'adamw_8bit':
        if full_numel < settings.min_8bit_size:
            return 8 * numel
        return 2 * numel + 2 * 4 * math.ceil(numel / 256)  # uint8 moments, fp32 absmax per 256-element block
    low = param_dtype in (torch.bfloat16, torch.float16)
    itemsize = 4 if low and settings.stochastic_rounding else torch.empty((), dtype=param_dtype).element_size()
    return 2 * itemsize * numel


@dataclass
class NetworkMemory:
    """Per-rank bytes of one network (``device_*``: on the GPU; ``host_*``: in host RAM under CPU offload)."""
    name: str
    params: int = 0
    buffers: int = 0
    grads: int = 0
    optimizer: int = 0
    offloaded: int = 0  # parameters + gradients + optimizer state kept in host RAM
    units: int = 0
    largest_unit_numel: int = 0
    root_numel: int = 0
    unsharded_compute_bytes: int = 0
    largest_unit_bytes: int = 0  # all-gathered, in the compute dtype
    root_bytes: int = 0
    mixed_dtype_units: int = 0


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def network_memory(net: Network, sharding: Optional[Sharding], rank: int, settings: RunSettings) -> NetworkMemory:
    """Per-rank bytes of ``net`` on rank ``rank`` (parameters in their stored dtypes)."""
    mem = NetworkMemory(net.name)
    buffer_dtype = sharding.buffer_dtype if sharding is not None and sharding.version == 1 else None
    mem.buffers = sum(b.numel() * _itemsize(buffer_dtype if (buffer_dtype and net.sharded and b.is_floating_point())
                                              else b.dtype) for b in net.module.buffers())
    params = list(net.module.parameters())
    if not net.sharded or sharding is None:
        mem.params = sum(p.numel() * p.element_size() for p in params)
        trainable = [p for p in params if p.requires_grad]
        mem.grads = sum(p.numel() * p.element_size() for p in trainable)
        mem.optimizer = sum(moment_bytes(p.numel(), p.numel(), p.dtype, settings) for p in trainable)
        return mem
    shard = sharding.shard_degree
    local_rank = rank % shard
    units = fsdp_units(net)
    mem.units = len(units)
    for unit in units:
        if not unit.params:
            continue
        dtype = unit.params[0].dtype
        if len({p.dtype for p in unit.params}) > 1:
            mem.mixed_dtype_units += 1
        compute = sharding.param_dtype or dtype
        if sharding.version == 1:
            total, spans = _fsdp1_flat(unit, shard, compute)
            local = total // shard
            lo, hi = local_rank * local, (local_rank + 1) * local
            mem.params += local * _itemsize(dtype)
            if unit.trainable:
                mem.grads += local * _itemsize(dtype)
            for p, (start, numel) in zip(unit.params, spans):
                if p.requires_grad:
                    piece = max(0, min(hi, start + numel) - max(lo, start))
                    mem.optimizer += moment_bytes(piece, p.numel(), p.dtype, settings)
            gathered = total
        else:
            gathered = 0
            for p in unit.params:
                rows, own = _fsdp2_chunk_rows(p.shape[0] if p.ndim else 1, shard, local_rank)
                rest = p.numel() // max(p.shape[0] if p.ndim else 1, 1)
                padded = rows * rest * _itemsize(dtype)
                mem.params += padded
                gathered += rows * rest * shard
                if p.requires_grad:
                    mem.grads += own * rest * _itemsize(dtype) if sharding.offload else padded
                    mem.optimizer += moment_bytes(own * rest, p.numel(), p.dtype, settings)
        bytes_gathered = gathered * _itemsize(compute)
        mem.unsharded_compute_bytes += bytes_gathered
        if unit.is_root:
            mem.root_numel, mem.root_bytes = unit.numel, bytes_gathered
        elif unit.numel > mem.largest_unit_numel:
            mem.largest_unit_numel, mem.largest_unit_bytes = unit.numel, bytes_gathered
    if sharding.offload:
        mem.offloaded = mem.params + mem.grads + mem.optimizer
    return mem
