"""FSDP wiring of a DMD model for Composer's ``parallelism_config: {fsdp: ...}``.

Composer wraps every direct child of the ``ComposerModel`` as its own FSDP root and reads two hooks on each child:
``fsdp_wrap_fn(module)`` (wrap this submodule as its own unit) and ``activation_checkpointing_fn(module)``. Here the
transformer blocks of generator, fake score and teacher become FSDP units (per-block sharding, as for a 12B
FLUX), activation checkpointing is on for the two trained networks only, and the small frozen networks (VAE, text
encoders, the VFM backbone) stay unwrapped, replicated on every rank. With ``parallelism_config`` set, Composer does
not move the model to the GPU, so the unwrapped children and the model's own buffers are moved here.
"""

from __future__ import annotations

import os

import torch
from composer.utils import dist
from torch import nn

from senseflow_algos.models.dmd import DMDModel

__all__ = ['fsdp_device', 'prepare_for_fsdp', 'transformer_block_types']


def transformer_block_types(net: nn.Module) -> tuple[type, ...]:
    """The repeated transformer block classes of a diffusers FLUX or SD3 transformer."""
    types = {type(m) for attr in ('transformer_blocks', 'single_transformer_blocks') for m in getattr(net, attr, [])}
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


def prepare_for_fsdp(model: DMDModel, device: torch.device) -> DMDModel:
    """Set the FSDP wrap and activation-checkpointing hooks and place the unwrapped parts on ``device``.

    Whether blocks are actually checkpointed is Composer's ``parallelism_config.fsdp.activation_checkpointing``.

    Args:
        model (DMDModel): The model, before the Trainer wraps it.
        device (torch.device): This rank's device (``cuda:<local rank>``).
    """
    blocks = transformer_block_types(model.generator)
    for name in ('generator', 'fake_score', 'teacher'):
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
