"""FSDP wiring of a DMD model for Composer's ``parallelism_config: {fsdp: ...}``.

Composer wraps every direct child of the ``ComposerModel`` as its own FSDP root and reads two hooks on each child:
``fsdp_wrap_fn(module)`` (wrap this submodule as its own unit) and ``activation_checkpointing_fn(module)``. Here the
transformer blocks of generator, fake score and teacher become FSDP units (per-block sharding, as for a 12B
FLUX), activation checkpointing is on for the two trained networks only, and the small frozen networks (VAE, text
encoders, the VFM backbone) stay unwrapped, replicated on every rank. With ``parallelism_config`` set, Composer does
not move the model to the GPU, so the unwrapped children and the model's own buffers are moved here.

Lean start: under FSDP with more than one rank, only global rank 0 reads the transformer weights (teacher, generator,
fake score); every other rank builds the same three networks on the meta device from the teacher's config, and FSDP
fills their shards from rank 0 while it wraps them (``sync_module_states``). Host RAM at start-up is then one copy of
each transformer per job instead of one per rank. The VAE and text encoders are still loaded by every rank (they stay
unwrapped, replicated). :func:`lean_start` decides; ``SENSEFLOW_LEAN_START=0`` restores the old start, in which every
rank loads everything (for benchmarks: ``bench/lean_start.py``).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist
from torch import nn

from senseflow_algos.models.blocks import TRANSFORMER_NETWORKS, transformer_blocks
from senseflow_algos.models.dmd import DMDModel

__all__ = [
    'LEAN_START_ENV', 'LeanStartCheck', 'fsdp_device', 'lean_start', 'lean_start_trainer_config', 'prepare_for_fsdp',
    'prepare_lean_start', 'transformer_block_types'
]

#: Environment variable: ``0`` turns the lean start off (every rank loads every network), for benchmarks.
LEAN_START_ENV = 'SENSEFLOW_LEAN_START'
#: The networks a lean start builds on the meta device on every rank but global rank 0.
LEAN_NETWORKS = TRANSFORMER_NETWORKS


def transformer_block_types(net: nn.Module) -> tuple[type, ...]:
    """The repeated transformer block classes of a diffusers FLUX or SD3 transformer."""
    types = {type(m) for m in transformer_blocks(net)}
    if not types:
        raise TypeError(f'{type(net).__name__} has no transformer_blocks to wrap per block')
    return tuple(types)


def fsdp_device() -> torch.device:
    """This rank's device under FSDP: its GPU, or the CPU under FSDP2 (Composer's FSDP1 wraps onto CUDA devices only)."""
    if torch.cuda.is_available():
        return torch.device('cuda', dist.get_local_rank())
    if os.environ.get('FSDP_VERSION') == '2':  # FSDP2 also shards on CPU processes (gloo), e.g. in tests
        return torch.device('cpu')
    raise ValueError('trainer.parallelism_config.fsdp needs CUDA devices (or FSDP_VERSION=2 on CPU); set '
                     'trainer.parallelism_config=null to train without FSDP on this machine')


def _rank0_log(message: str) -> None:
    if dist.get_global_rank() == 0:
        print(message, flush=True)


def lean_start(model_cfg: dict[str, Any], fsdp: bool, cpu_offload: bool = False) -> bool:
    """Whether this run starts lean: rank 0 loads the transformers, the other ranks build them on the meta device.

    It does when the run loads ``model.pretrained`` (tiny models are built from a seed on every rank) under FSDP with
    more than one rank, unless ``SENSEFLOW_LEAN_START=0`` or parameter CPU offload is on. Offload keeps the old start
    because Composer's FSDP2 broadcast from rank 0 moves the sharded parameters to the GPU, where the offload policy
    refuses them. Call it before the model is built; rank and world size come from the launcher's environment.

    Args:
        model_cfg (dict): The ``model:`` section.
        fsdp (bool): ``trainer.parallelism_config.fsdp`` is set.
        cpu_offload (bool): ``trainer.parallelism_config.fsdp.cpu_offload`` is true.
    """
    if not fsdp or dist.get_world_size() < 2 or model_cfg.get('tiny') or not model_cfg.get('pretrained'):
        return False
    if os.environ.get(LEAN_START_ENV, '1') == '0':
        _rank0_log(f'{LEAN_START_ENV}=0: every rank loads the teacher, generator and fake score (old start)')
        return False
    if cpu_offload:
        _rank0_log('lean start off under parameter CPU offload: every rank loads the teacher, generator and fake score')
        return False
    _rank0_log(f'lean start: global rank 0 loads the teacher, generator and fake score; the other '
               f'{dist.get_world_size() - 1} ranks build them on the meta device and receive their shards from rank 0')
    return True


def lean_start_trainer_config(trainer_cfg: dict[str, Any], fsdp_version: str) -> dict[str, Any]:
    """The ``trainer:`` section for a lean start: under FSDP1, ``parallelism_config.fsdp.sync_module_states: true``.

    Composer's FSDP1 refuses meta-device ranks without it; its FSDP2 has no such key and turns the broadcast on by
    itself when it finds them.

    Args:
        trainer_cfg (dict): The ``trainer:`` section; not modified (a changed copy is returned).
        fsdp_version (str): ``FSDP_VERSION`` from the environment (``'2'``: FSDP2, else FSDP1).
    """
    fsdp = trainer_cfg['parallelism_config']['fsdp']
    if fsdp_version == '2' or fsdp.get('sync_module_states') is True:
        return trainer_cfg
    _rank0_log('lean start: setting trainer.parallelism_config.fsdp.sync_module_states=true (rank 0 broadcasts the '
               'weights while FSDP wraps them)')
    return {**trainer_cfg, 'parallelism_config': {**trainer_cfg['parallelism_config'],
                                                  'fsdp': {**fsdp, 'sync_module_states': True}}}


def _filled_from_rank0(module: nn.Module) -> None:
    """FSDP1's ``param_init_fn`` for meta-device networks: nothing to draw, ``sync_module_states`` overwrites every
    parameter and buffer with rank 0's right after this."""


class _HeldOut(nn.Module):
    """Stands in for a replicated child (VAE, text encoders) while the Trainer wraps the model at a lean start."""

    _fsdp_wrap = False


class LeanStartCheck(Callback):
    """Ends a lean start once the Trainer has wrapped the model (``Event.BEFORE_LOAD``, before any checkpoint loads).

    Puts the held-out replicated children back, leaves the frozen networks out of the model's state dict again, makes a
    tensor still on the meta device an error naming it, and broadcasts the transformers' buffers (e.g. SD3's
    ``pos_embed``) from global rank 0 once more: under FSDP1 hybrid sharding torch syncs buffers within each node only,
    from the node's first rank, a meta-device rank on every node but the first (parameters it also syncs across
    nodes). FSDP never shards buffers, so one broadcast over all ranks is right for every sharding strategy.

    Args:
        held_out (dict[str, nn.Module]): The children :func:`prepare_lean_start` replaced by placeholders.
    """

    def __init__(self, held_out: dict[str, nn.Module]):
        self.held_out = held_out

    def before_load(self, state: State, logger: Logger) -> None:
        model = state.model
        for name, child in self.held_out.items():
            setattr(model, name, child)  # same key in the children's order
        self.held_out = {}
        model.keep_frozen_in_state_dict = False
        for kind, tensors in (('parameter', model.named_parameters()), ('buffer', model.named_buffers())):
            for name, tensor in tensors:
                if tensor.is_meta:
                    raise RuntimeError(f'lean start: {kind} {name} is still on the meta device after FSDP wrapping '
                                       f'on rank {dist.get_global_rank()}; rank 0 broadcast nothing into it. Set '
                                       f'{LEAN_START_ENV}=0 to load the weights on every rank')
        for name in LEAN_NETWORKS:
            for buffer in getattr(model, name).buffers():
                dist.broadcast(buffer, src=0)


def prepare_lean_start(model: DMDModel) -> LeanStartCheck:
    """This rank's part of a lean start, after :func:`prepare_for_fsdp` and before the Trainer is built.

    * FSDP1: the transformers get a ``param_init_fn`` for their meta-device ranks (Composer calls it after
      ``to_empty``; ``sync_module_states`` then broadcasts rank 0's parameters and buffers into every FSDP unit).
    * FSDP2: Composer finds the meta-device ranks, takes rank 0's full state dict before sharding and broadcasts it
      into every rank's ``to_empty`` model. Frozen networks stay in the state dict meanwhile (the teacher and the VFM
      backbone must be broadcast too), and the replicated VAE and text encoders, which every rank loaded, sit out as
      placeholders: nothing to send, and Composer refuses their tied modules (T5's ``shared`` is also
      ``encoder.embed_tokens``).

    Returns:
        The callback that ends the lean start; pass it to the Trainer.
    """
    for name in LEAN_NETWORKS:
        getattr(model, name).param_init_fn = _filled_from_rank0
    held_out = {}
    for name, child in model.named_children():
        if name in model.frozen_modules and getattr(child, '_fsdp_wrap', True) is False:
            held_out[name] = child
    for name in held_out:
        setattr(model, name, _HeldOut())
    model.keep_frozen_in_state_dict = True
    return LeanStartCheck(held_out)


def prepare_for_fsdp(model: DMDModel, device: torch.device) -> DMDModel:
    """Set the FSDP wrap and activation-checkpointing hooks and place the unwrapped parts on ``device``.

    Whether blocks are actually checkpointed is Composer's ``parallelism_config.fsdp.activation_checkpointing``.

    Args:
        model (DMDModel): The model, before the Trainer wraps it.
        device (torch.device): This rank's device (``cuda:<local rank>``).
    """
    blocks = transformer_block_types(model.generator)
    for name in LEAN_NETWORKS:
        net = getattr(model, name)
        net.fsdp_wrap_fn = lambda module, blocks=blocks: isinstance(module, blocks)
        if name != 'teacher':  # the frozen teacher keeps no activations for backward
            net.activation_checkpointing_fn = lambda module, blocks=blocks: isinstance(module, blocks)
    for name in model.frozen_modules:
        if name != 'teacher':
            child = getattr(model, name)
            child._fsdp_wrap = False
            child.to(device)
    for name, buffer in list(model.named_buffers(recurse=False)):
        setattr(model, name, buffer.to(device))
    return model
