"""Per-GPU memory of a run: weights, gradients, optimizer state, activations and FSDP's transient buffers, per
training phase; and host RAM per node at start-up (lean start and the old start) and under CPU offload."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from senseflow_algos.plan.metarun import PassCost
from senseflow_algos.plan.networks import MetaModel
from senseflow_algos.plan.passes import PassCosts
from senseflow_algos.plan.settings import RunSettings
from senseflow_algos.plan.sharding import NetworkMemory, Sharding

__all__ = ['PhaseMemory', 'GPUMemory', 'HostMemory', 'gpu_memory', 'host_memory', 'activation_peak',
           'TRAINED_BIG', 'checkpointed_networks']

#: The three transformers a lean start loads on global rank 0 only.
TRAINED_BIG = ('teacher', 'generator', 'fake_score')


@dataclass
class PhaseMemory:
    """One training phase on one GPU (bytes)."""
    grads: int
    activations: int
    activations_no_checkpointing: int
    activations_all_checkpointing: int
    transient: int


@dataclass
class GPUMemory:
    """Per-GPU bytes: what stays resident plus the larger of the two phases."""
    weights: int
    weights_by_network: dict[str, int]
    optimizer: int
    phases: dict[str, PhaseMemory]
    offloaded_per_rank: int = 0

    def peak(self, which: str = 'activations') -> int:
        """Resident bytes plus the worst phase (``which``: the activation variant)."""
        return self.weights + self.optimizer + max(p.grads + getattr(p, which) + p.transient
                                                   for p in self.phases.values())

    def worst_phase(self) -> str:
        return max(self.phases, key=lambda k: self.phases[k].grads + self.phases[k].activations +
                   self.phases[k].transient)


@dataclass
class HostMemory:
    """Host RAM per node at start-up (bytes): every network a rank builds in host RAM before it moves to the GPU."""
    lean_node0: int
    lean_other_nodes: int
    old_per_node: int
    per_rank_replicated: int
    transformers: int
    lean_applies: bool
    offload_training_per_node: int = 0
    notes: list[str] = field(default_factory=list)
    #: ``python export.py``, one process: the generator, VAE and text encoders (senseflow_algos.restore).
    export: int = 0
    #: The same export when it rebuilt the whole model (teacher, generator, fake score, VAE, text encoders).
    export_whole_model: int = 0


def checkpointed_networks(settings: RunSettings, meta: MetaModel) -> list[str]:
    """Networks whose units recompute in backward, as configured."""
    names = []
    if settings.fsdp is not None and settings.fsdp.activation_checkpointing:
        names += ['generator', 'fake_score']  # Composer wraps their blocks (prepare_for_fsdp's checkpointing fn)
    if meta.vfm is not None:
        # The VFM discriminator's flag, or diffusers' switch on the VAE where the algorithm turned it on.
        if getattr(meta.vfm, 'decoder_grad_checkpointing', False) or getattr(meta.model.vae,
                                                                              'is_gradient_checkpointing', False):
            names.append('vae_decoder')
        if meta.vfm.grad_checkpointing:
            names.append('vfm_backbone')
    return names


def activation_peak(components: Sequence[tuple[PassCost, bool, int]]) -> int:
    """Peak saved bytes of one phase whose passes run in the given forward order and backpropagate in reverse.

    Each component is ``(pass, checkpointed, copies)``. A checkpointed pass keeps only its units' inputs (and what is
    saved outside them) and, while backward runs through it, one unit's recomputed internals on top.
    """
    kept = [(c.saved_checkpointed if ckpt else c.saved) * n for c, ckpt, n in components]
    peak, running = sum(kept), 0
    for (cost, ckpt, _), k in zip(components, kept):
        running += k
        if ckpt:
            peak = max(peak, running + cost.unit_working)
    return peak


def _phase_components(costs: PassCosts, meta: MetaModel, ckpt: set[str]) -> dict[str, list[tuple[PassCost, bool,
                                                                                                     int]]]:
    generator = [(costs.generator, 'generator' in ckpt, 1)]
    critic = [(costs.generator, 'fake_score' in ckpt, 1)]
    if meta.vfm is not None:
        if meta.vfm.generator_weight > 0:
            generator += [(costs.vae_decode, 'vae_decoder' in ckpt, 1), (costs.backbone, 'vfm_backbone' in ckpt, 1),
                          (costs.heads_generator, False, 1)]
        critic += [(costs.heads_critic, False, 2)]  # fake and real logits, both kept until the loss backpropagates
    return {'generator': generator, 'critic': critic}


def _all_checkpointable(meta: MetaModel) -> set[str]:
    return {'generator', 'fake_score', 'vae_decoder', 'vfm_backbone'}


def gpu_memory(meta: MetaModel, settings: RunSettings, sharding: Optional[Sharding], nets: dict[str, NetworkMemory],
               costs: PassCosts, world: int) -> GPUMemory:
    """Per-GPU memory from per-network bytes (:func:`~senseflow_algos.plan.sharding.network_memory`) and measured
    passes."""
    offload = sharding is not None and sharding.offload
    weights_by = {}
    for net in meta.networks:
        mem = nets[net.name]
        weights_by[net.name] = mem.buffers + (0 if offload and net.sharded else mem.params)
    trained = {n.name for n in meta.networks if n.trained}
    optimizer = 0 if offload else sum(nets[n].optimizer for n in trained)
    grads_of = {n: (0 if offload else nets[n].grads) for n in trained}
    discriminator = grads_of.get('discriminator', 0) if meta.vfm is not None and meta.vfm.generator_weight > 0 else 0
    phase_grads = {'generator': grads_of['generator'] + discriminator,
                   'critic': grads_of['fake_score'] + grads_of.get('discriminator', 0)}
    if sharding is not None and sharding.version == 1:
        # FSDP1 frees a network's flat gradient at its next forward; the generator does not run in the critic phase
        # of a generator batch (the critic reuses the cached sample), so its gradient is still there.
        phase_grads['critic'] += grads_of['generator']
    if sharding is None and world > 1:  # DDP keeps a bucket copy of every trainable gradient
        bucket = sum(nets[n].grads for n in trained)
        phase_grads = {k: v + bucket for k, v in phase_grads.items()}
    configured = set(checkpointed_networks(settings, meta))
    transient = _transient(meta, sharding, nets)
    phases = {}
    for name in ('generator', 'critic'):
        phases[name] = PhaseMemory(
            grads=phase_grads[name],
            activations=activation_peak(_phase_components(costs, meta, configured)[name]),
            activations_no_checkpointing=activation_peak(_phase_components(costs, meta, set())[name]),
            activations_all_checkpointing=activation_peak(
                _phase_components(costs, meta, _all_checkpointable(meta))[name]),
            transient=transient)
    offloaded = sum(m.offloaded for m in nets.values()) if offload else 0
    return GPUMemory(sum(weights_by.values()), weights_by, optimizer, phases, offloaded)


def _transient(meta: MetaModel, sharding: Optional[Sharding], nets: dict[str, NetworkMemory]) -> int:
    """FSDP's gathered parameters and unsharded gradients (modelled, not measured).

    Every network root stays gathered after its forward (FSDP does not reshard a root after forward); at most two
    block units are gathered at once (``limit_all_gathers``); one trained unit's unsharded gradient exists in the
    compute dtype and, for the reduce-scatter, in the reduce dtype. SHARD_GRAD_OP reshards only in backward, so a
    network run without gradient (the teacher) stays gathered: every network counts whole.
    """
    if sharding is None or sharding.strategy == 'NO_SHARD':
        return 0
    sharded = [nets[n.name] for n in meta.networks if n.sharded]
    if sharding.strategy == 'SHARD_GRAD_OP':
        return sum(m.unsharded_compute_bytes for m in sharded)
    roots = sum(m.root_bytes for m in sharded)
    block = max((m.largest_unit_bytes for m in sharded), default=0)
    trained = [nets[n.name] for n in meta.networks if n.sharded and n.trained]
    grad_unit = max((max(m.largest_unit_bytes, m.root_bytes) for m in trained), default=0)
    reduce_copy = 0
    if sharding.param_dtype is not None and sharding.reduce_dtype not in (None, sharding.param_dtype):
        reduce_copy = grad_unit // sharding.param_dtype.itemsize * sharding.reduce_dtype.itemsize
    return roots + 2 * block + grad_unit + reduce_copy


def host_memory(meta: MetaModel, settings: RunSettings, sharding: Optional[Sharding], world: int,
                gpus_per_node: int) -> HostMemory:
    """Host RAM per node at start-up, for the lean start (rank 0 alone holds the transformers) and the old one."""
    transformers = sum(meta.network(n).param_bytes() + meta.network(n).buffer_bytes() for n in TRAINED_BIG)
    replicated = sum(n.param_bytes() + n.buffer_bytes() for n in meta.networks if n.name not in TRAINED_BIG)
    per_node = min(gpus_per_node, world)
    lean = (sharding is not None and world > 1 and not settings.tiny and bool(settings.pretrained)
            and not sharding.offload)
    notes = ['upper bound: every network a rank builds in host RAM (stored dtypes) counted as held at once, before '
             'FSDP moves it to the GPU; the VFM backbone and heads are built on the CPU at Event.INIT on every rank']
    if not lean:
        notes.append('this run does not start lean (lean start: FSDP, more than one rank, model.pretrained, no CPU '
                     'offload): every rank loads the three transformers')
    host = HostMemory(lean_node0=transformers + per_node * replicated, lean_other_nodes=per_node * replicated,
                      old_per_node=per_node * (transformers + replicated), per_rank_replicated=replicated,
                      transformers=transformers, lean_applies=lean, notes=notes)
    encoders = sum(n.param_bytes() + n.buffer_bytes() for n in meta.networks
                   if n.name == 'vae' or n.name.startswith('conditioner.'))
    generator = meta.network('generator').param_bytes() + meta.network('generator').buffer_bytes()
    host.export = generator + encoders
    host.export_whole_model = transformers + encoders
    return host
