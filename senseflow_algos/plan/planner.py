"""The launch plan of a run config on given hardware, and the smallest change that makes it fit (found by planning
each candidate change, not by rule of thumb)."""

from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

from senseflow_algos.config import ConfigError, validate_config
from senseflow_algos.plan.flops import CycleFlops, cycle_flops, cycle_passes, expected_draws
from senseflow_algos.plan.memory import (
    GPUMemory,
    HostMemory,
    checkpointed_networks,
    gpu_memory,
    host_memory,
)
from senseflow_algos.plan.networks import MetaModel, build_meta_model, compute_dtype, dtype_name
from senseflow_algos.plan.passes import PassCosts, measure_passes
from senseflow_algos.plan.settings import RunSettings, read_run_settings
from senseflow_algos.plan.sharding import NetworkMemory, Sharding, network_memory, resolve_sharding

__all__ = ['Hardware', 'Plan', 'Fix', 'PlanCache', 'plan_run', 'find_fix', 'cast_to_compute', 'GiB', 'parse_bytes',
           'PEAK_TFLOPS']

GiB = 2**30
#: Dense bf16 peak per GPU (TFLOP/s): the ``--gpu`` choices.
PEAK_TFLOPS = {'H100': 989.0, 'H200': 989.0, 'A100': 312.0, 'B200': 2250.0}


def parse_bytes(text: str) -> int:
    """``80GB`` / ``80GiB`` / ``1.5TB`` -> bytes (GB and GiB both mean 2**30 here, as GPU memory is quoted)."""
    t = text.strip().upper().replace('IB', 'B')
    for suffix, scale in (('TB', 2**40), ('GB', 2**30), ('MB', 2**20)):
        if t.endswith(suffix):
            return int(float(t[:-len(suffix)]) * scale)
    return int(float(t))


@dataclass
class Hardware:
    """The machines the plan is for.

    Attributes:
        gpus: All GPUs (= ranks).
        gpu_memory: Bytes per GPU.
        gpus_per_node: GPUs per node.
        host_memory_per_node: Host RAM per node (bytes), checked if given.
        peak_tflops: Dense bf16 peak per GPU.
        mfu: Fraction of the peak the run achieves, counting executed FLOPs (recomputation included).
        fsdp_version: 1 or 2; ``None``: ``FSDP_VERSION`` from the environment, 2 if CPU offload is on.
        reserve: Bytes per GPU the plan leaves for the CUDA context, NCCL buffers and allocator slack.
    """
    gpus: int = 8
    gpu_memory: int = 80 * GiB
    gpus_per_node: int = 8
    host_memory_per_node: Optional[int] = None
    peak_tflops: float = 989.0
    mfu: float = 0.26
    fsdp_version: Optional[int] = None
    reserve: int = 2 * GiB


@dataclass
class NetworkRow:
    """One network in the plan's table."""
    name: str
    kind: str
    trainable: int
    frozen: int
    buffers: int
    dtype: str
    compute_dtype: str
    units: str
    per_gpu: int


@dataclass
class Plan:
    """Everything the planner derived for one config on one hardware setup (bytes, FLOPs, seconds)."""
    settings: RunSettings
    hardware: Hardware
    sharding: Optional[Sharding]
    networks: list[NetworkRow]
    gpu: GPUMemory
    host: HostMemory
    flops: CycleFlops
    micro_batch: int
    micro_batches: int
    checkpointed: list[str]
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    fix: Optional['Fix'] = None
    candidates: list['Fix'] = field(default_factory=list)

    @property
    def flops_per_update(self) -> float:
        """Model FLOPs (forward + backward, no recomputation) of one generator update, all GPUs."""
        return self.flops.total_model * self.micro_batches * self.hardware.gpus

    @property
    def executed_flops_per_update(self) -> float:
        """FLOPs the GPUs execute per generator update (activation-checkpointing recomputation included)."""
        return (self.flops.total_model + self.flops.total_recompute) * self.micro_batches * self.hardware.gpus

    @property
    def seconds_per_update(self) -> float:
        hw = self.hardware
        return self.executed_flops_per_update / (hw.gpus * hw.peak_tflops * 1e12 * hw.mfu)

    @property
    def seconds_per_batch(self) -> float:
        """Seconds per training batch (Composer's ``ba``; a generator update spans ``gen_every`` of them)."""
        return self.seconds_per_update / self.settings.gen_every

    @property
    def hours(self) -> Optional[float]:
        batches = self.settings.max_batches
        return None if batches is None else batches * self.seconds_per_batch / 3600

    @property
    def peak(self) -> int:
        return self.gpu.peak()

    @property
    def host_startup(self) -> int:
        """Host RAM of the busiest node at start-up, with the start this run gets."""
        return self.host.lean_node0 if self.host.lean_applies else self.host.old_per_node

    @property
    def fits(self) -> bool:
        hw = self.hardware
        if self.problems or self.peak > hw.gpu_memory - hw.reserve:
            return False
        if hw.host_memory_per_node is not None:
            return max(self.host_startup, self.host.offload_training_per_node) <= hw.host_memory_per_node
        return True


@dataclass
class Fix:
    """A candidate change and the plan with it."""
    label: str
    overrides: list[str]
    plan: Plan
    gpus: Optional[int] = None


class PlanCache:
    """Meta models and measured passes, shared by the plans of one invocation (candidates reuse them)."""

    def __init__(self) -> None:
        self.models: dict[str, MetaModel] = {}
        self.passes: dict[str, PassCosts] = {}


def _model_key(s: RunSettings) -> str:
    return json.dumps([s.family, s.tiny, s.pretrained, s.dtype, s.teacher_dtype, s.encoder_dtype, s.lora,
                       s.text_encoders, s.vae_encoder, s.vfm, s.family_kwargs, s.resolution, s.seed], sort_keys=True,
                      default=str)


def _pass_key(s: RunSettings, batch: int) -> str:
    # Pass costs depend on compute dtypes, not stored ones: bf16 and fp32 master weights measure alike under amp_bf16.
    # Checkpointing flags do not change a pass: each is measured unwrapped, with its checkpointable units attributed.
    vfm = {k: v for k, v in (s.vfm or {}).items() if k not in ('grad_checkpointing', 'decoder_grad_checkpointing')}
    return json.dumps([s.family, s.tiny, s.pretrained, s.lora, s.text_encoders, s.vae_encoder, vfm, s.vfm is None,
                       s.family_kwargs, s.resolution, s.isg, s.precision,
                       s.dtype if s.precision != 'amp_bf16' else 'amp', batch], sort_keys=True, default=str)


@contextlib.contextmanager
def cast_to_compute(meta: MetaModel, settings: RunSettings) -> Iterator[None]:
    """Cast every floating tensor of every network to the network's compute dtype for the measured passes; restore
    each tensor's own dtype afterwards (a network may mix dtypes, e.g. fp32 LoRA adapters on bf16 weights)."""
    stored = []
    for net in meta.networks:
        dtype = compute_dtype(settings, next(net.module.parameters()).dtype)
        for t in [*net.module.parameters(), *net.module.buffers()]:
            if t.is_floating_point():
                stored.append((t, t.dtype))
                t.data = t.data.to(dtype)
    try:
        yield
    finally:
        for t, dtype in stored:
            t.data = t.data.to(dtype)


def _units_text(net, mem: NetworkMemory) -> str:
    if not net.sharded:
        return 'replicated'
    blocks = mem.units - 1
    return f'{blocks} blocks + root' if blocks else 'root'


def _fsdp_version(settings: RunSettings, hw: Hardware) -> int:
    if hw.fsdp_version is not None:
        return hw.fsdp_version
    if settings.fsdp is not None and settings.fsdp.cpu_offload:
        return 2
    return int(os.environ.get('FSDP_VERSION', '1'))


def _optimizer_problems(settings: RunSettings) -> list[str]:
    """What the optimizer of this checkout refuses (read from its signature: absent options keep today's rules)."""
    from senseflow_algos.optim import PhasedAdamW
    from senseflow_algos.plan.architectures import accepts

    low = settings.dtype in ('bf16', 'fp16')
    if not low:
        return []
    if settings.optimizer_kind == 'adamw_8bit':
        return [f'optimizer.kind=adamw_8bit trains fp32 weights only (model.dtype={settings.dtype})']
    if accepts(PhasedAdamW.__init__, 'stochastic_rounding') and not settings.stochastic_rounding:
        return [f'model.dtype={settings.dtype} trained weights need optimizer.stochastic_rounding: true (a plain '
                'low-precision AdamW step rounds small updates away)']
    return []


def plan_run(cfg: dict[str, Any], hardware: Hardware, cache: Optional[PlanCache] = None) -> Plan:
    """Plan a validated run config on ``hardware``."""
    cache = cache or PlanCache()
    settings = read_run_settings(cfg)
    hw = hardware
    problems, notes = [], []
    world = hw.gpus
    per_device = settings.global_batch_size // world if settings.global_batch_size % world == 0 else 0
    if not per_device:
        problems.append(f'dataset.global_batch_size={settings.global_batch_size} is not a positive multiple of the '
                        f'{world} GPUs')
    micro = min(per_device, settings.microbatch_size) if settings.microbatch_size and per_device else per_device
    micro = max(micro, 1)
    micro_batches = max(1, per_device // micro) if per_device else 1
    version = _fsdp_version(settings, hw)
    try:
        sharding = resolve_sharding(settings, world, hw.gpus_per_node, version)
    except ValueError as e:
        problems.append(str(e))
        sharding = resolve_sharding(settings, world, hw.gpus_per_node, 2) if settings.fsdp else None
    if sharding is not None:
        notes += sharding.notes
        notes.append('FSDP transients (modelled): every network root stays gathered after its forward, at most two '
                     'block units are gathered at once (limit_all_gathers), and one trained unit\'s unsharded gradient '
                     'exists in the compute and the reduce dtype')
    notes.append('time (modelled): executed FLOPs / (GPUs x peak x MFU); communication is not modelled separately '
                 '(HYBRID_SHARD keeps parameter all-gathers inside a node)')
    if settings.fsdp is not None and settings.optimizer_kind == 'adamw_8bit':
        problems.append('optimizer.kind=adamw_8bit is refused with FSDP (its block-wise state is not a sharded '
                        'tensor): use it without trainer.parallelism_config')
    problems += _optimizer_problems(settings)
    key = _model_key(settings)
    if key not in cache.models:
        cache.models[key] = build_meta_model(settings)
    meta = cache.models[key]
    nets = {n.name: network_memory(n, sharding, 0, settings) for n in meta.networks}
    mixed = [name for name, m in nets.items() if m.mixed_dtype_units]
    if mixed and sharding is not None and sharding.version == 1:
        problems.append(f'FSDP1 flattens each unit into one tensor and refuses mixed dtypes; units of {mixed} mix '
                        'dtypes (e.g. LoRA adapters kept fp32 on bf16 weights)')
    online_images = settings.dataset_kind in ('synthetic', 'shapes', 'image_caption')
    if online_images and not settings.vae_encoder:
        problems.append(f'dataset.kind={settings.dataset_kind} delivers images but model.vae_encoder=false')
    pkey = _pass_key(settings, micro)
    if pkey not in cache.passes:
        with cast_to_compute(meta, settings):
            cache.passes[pkey] = measure_passes(meta, settings, micro)
    costs = cache.passes[pkey]
    ckpt = checkpointed_networks(settings, meta)
    passes = cycle_passes(settings, expected_draws(settings, meta.model.num_anchors), online_images and
                          settings.vae_encoder, meta.vfm is not None)
    flops = cycle_flops(passes, costs, ckpt)
    gpu = gpu_memory(meta, settings, sharding, nets, costs, world)
    host = host_memory(meta, settings, sharding, world, hw.gpus_per_node)
    if sharding is not None and sharding.offload:
        host.offload_training_per_node = min(hw.gpus_per_node, world) * gpu.offloaded_per_rank
    rows = []
    for net in meta.networks:
        mem = nets[net.name]
        stored = next(net.module.parameters()).dtype
        rows.append(NetworkRow(net.name, type(net.module).__name__, net.trainable_params, net.frozen_params,
                               net.buffer_numel, net.dtypes, dtype_name(compute_dtype(settings, stored)),
                               _units_text(net, mem), gpu.weights_by_network[net.name]))
    return Plan(settings, hw, sharding, rows, gpu, host, flops, micro, micro_batches, ckpt, problems, notes)


# -- the smallest change that fits ---------------------------------------------------------------------------------


def _set(cfg: dict[str, Any], dotted: str, value: Any) -> None:
    node = cfg
    *path, last = dotted.split('.')
    for key in path:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[last] = value


def _candidates(cfg: dict[str, Any], settings: RunSettings) -> list[tuple[str, dict[str, Any]]]:
    """Single changes, least intrusive first: ``(label, {dotted key: value})``."""
    out = []
    fsdp_key = 'trainer.parallelism_config.fsdp'
    if settings.fsdp is not None and not settings.fsdp.activation_checkpointing:
        out.append(('activation checkpointing of generator and fake score',
                    {f'{fsdp_key}.activation_checkpointing': True}))
    if settings.vfm is not None:
        if not settings.vfm.get('grad_checkpointing'):
            out.append(('VFM backbone gradient checkpointing',
                        {'algorithms.vfm_discriminator.grad_checkpointing': True}))
        if not settings.vfm.get('decoder_grad_checkpointing'):
            out.append(('VAE decoder gradient checkpointing (GAN path)',
                        {'algorithms.vfm_discriminator.decoder_grad_checkpointing': True}))
    if settings.text_encoders and not settings.precomputed:
        out.append(('precomputed text embeddings and latents (data_prep/precompute.py)',
                    {'dataset.kind': 'precomputed', 'dataset.num_samples': None, 'dataset.load_images':
                     settings.vfm is not None, 'model.text_encoders': False, 'model.vae_encoder': False}))
    if settings.dtype == 'fp32':
        out.append(('bf16 trained weights with stochastic rounding',
                    {'model.dtype': 'bf16', 'optimizer.stochastic_rounding': True}))
    if settings.fsdp is not None and not settings.fsdp.cpu_offload:
        out.append(('FSDP2 CPU offload of parameters, gradients and Adam state (FSDP_VERSION=2)',
                    {f'{fsdp_key}.cpu_offload': True}))
    if settings.lora is None:
        out.append(('LoRA rank 64 on generator and fake score', {'model.lora': {'rank': 64}}))
    if settings.fsdp is None and settings.optimizer_kind != 'adamw_8bit' and settings.dtype == 'fp32':
        out.append(('8-bit AdamW (bitsandbytes; unsharded runs only)', {'optimizer.kind': 'adamw_8bit'}))
    return out


def _with(cfg: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    new = copy.deepcopy(cfg)
    for key, value in changes.items():
        _set(new, key, value)
    return new


def _overrides(changes: dict[str, Any]) -> list[str]:
    def fmt(v):
        if isinstance(v, bool):
            return 'true' if v else 'false'
        if v is None:
            return 'null'
        if isinstance(v, dict):
            return '{' + ', '.join(f'{k}: {fmt(x)}' for k, x in v.items()) + '}'
        return str(v)
    return [f'{k}={fmt(v)}' for k, v in changes.items()]


def find_fix(cfg: dict[str, Any], plan: Plan, cache: PlanCache, progress: Optional[Callable[[str], None]] = None,
             max_gpus: int = 512) -> Optional[Fix]:
    """The least intrusive single change (then pair of changes, then more GPUs) whose plan fits, or ``None``.

    Every candidate is planned in full (FLOPs, memory, host RAM); candidates that do not validate against the schema
    (a key this checkout does not know yet) are skipped. All evaluated candidates are kept in ``plan.candidates``.
    """
    settings = plan.settings
    singles = _candidates(cfg, settings)
    tried: list[Fix] = []

    def attempt(label: str, changes: dict[str, Any], gpus: Optional[int] = None) -> Optional[Fix]:
        new_cfg = _with(cfg, changes)
        try:
            validate_config(new_cfg, source='candidate')
        except ConfigError:
            return None
        if progress:
            progress(label)
        hw = copy.copy(plan.hardware)
        if gpus is not None:
            hw.gpus = gpus
        if 'trainer.parallelism_config.fsdp.cpu_offload' in changes:
            hw.fsdp_version = 2
        try:
            new_plan = plan_run(new_cfg, hw, cache)
        except (ConfigError, ValueError, TypeError) as e:
            if progress:
                progress(f'  skipped: {e}')
            return None
        fix = Fix(label, _overrides(changes), new_plan, gpus)
        tried.append(fix)
        return fix if new_plan.fits else None

    found = None
    for label, changes in singles:
        found = attempt(label, changes)
        if found:
            break
    if found is None:
        for i, (label_a, a) in enumerate(singles):
            for label_b, b in singles[i + 1:]:
                found = attempt(f'{label_a} + {label_b}', {**a, **b})
                if found:
                    break
            if found:
                break
    if found is None:
        per_device = max(1, settings.global_batch_size // plan.hardware.gpus)
        gpus = plan.hardware.gpus * 2
        while found is None and gpus <= max_gpus:
            found = attempt(f'{gpus} GPUs (dataset.global_batch_size={gpus * per_device}: {per_device} per GPU)',
                            {'dataset.global_batch_size': gpus * per_device}, gpus)
            gpus *= 2
    plan.candidates = tried
    plan.fix = found
    return found

