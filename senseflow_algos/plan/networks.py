"""Every network of a run config, built on the meta device with the project's own classes and wrap policy.

The DMD model is assembled as :func:`~senseflow_algos.models.factory.build_dmd_model` assembles it (family,
components, LoRA, :class:`~senseflow_algos.models.dmd.DMDModel`), but from the architecture configs on the meta device;
the VFM discriminator's backbone and heads are attached by :class:`VFMDiscriminator` itself (its defaults are the
only source), and :func:`~senseflow_algos.models.fsdp.prepare_for_fsdp` sets the FSDP wrap hooks.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from senseflow_algos.dtypes import DTYPES, dtype_name
from senseflow_algos.plan.architectures import (
    accepts,
    architecture_folder,
    meta_components,
    quiet_diffusers,
    tiny_meta_components,
)
from senseflow_algos.plan.settings import RunSettings

__all__ = ['MetaModel', 'Network', 'build_meta_model', 'DTYPES', 'compute_dtype', 'dtype_name']

@dataclass
class Network:
    """One network of the run.

    Attributes:
        name: Where it lives in the DMD model (``generator``, ``conditioner.text_encoder_2``, ...).
        module: The module (meta tensors).
        sharded: Wrapped by FSDP as its own root (else replicated on every rank).
        trained: Has trainable parameters (generator, fake score, discriminator heads).
        wrap_fn: FSDP unit policy inside the root (``None``: the root is the only unit).
        checkpoint_fn: Which submodules activation checkpointing wraps (``None``: none).
    """
    name: str
    module: nn.Module
    sharded: bool
    trained: bool
    wrap_fn: Optional[Callable[[nn.Module], bool]] = None
    checkpoint_fn: Optional[Callable[[nn.Module], bool]] = None

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters() if p.requires_grad)

    @property
    def frozen_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters() if not p.requires_grad)

    @property
    def buffer_numel(self) -> int:
        return sum(b.numel() for b in self.module.buffers())

    @property
    def dtypes(self) -> str:
        return '/'.join(sorted({dtype_name(p.dtype) for p in self.module.parameters()}))

    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.module.parameters())

    def buffer_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.module.buffers())


@dataclass
class MetaModel:
    """The run's DMD model on the meta device, its VFM discriminator (if any) and the list of networks."""
    model: nn.Module
    vfm: Optional[object]
    networks: list[Network]
    student_dtype: torch.dtype
    teacher_dtype: torch.dtype
    encoder_dtype: torch.dtype

    def network(self, name: str) -> Network:
        for net in self.networks:
            if net.name == name:
                return net
        raise KeyError(name)

    def has(self, name: str) -> bool:
        return any(net.name == name for net in self.networks)


def compute_dtype(settings: RunSettings, stored: torch.dtype) -> torch.dtype:
    """The dtype a network computes in: bf16 under ``amp_bf16`` (FSDP mixed precision or autocast), else its own."""
    return torch.bfloat16 if settings.precision == 'amp_bf16' else stored


def _dtypes(settings: RunSettings) -> tuple[torch.dtype, torch.dtype, torch.dtype]:
    """``(student, teacher, encoders)``: the encoders follow ``encoder_dtype``, else the teacher (once the factory
    knows ``encoder_dtype``), else ``dtype`` (the factory before that key existed)."""
    from senseflow_algos.models.factory import build_dmd_model

    student = DTYPES[settings.dtype]
    teacher = DTYPES[settings.teacher_dtype] if settings.teacher_dtype else student
    if accepts(build_dmd_model, 'encoder_dtype'):
        encoders = DTYPES[settings.encoder_dtype] if settings.encoder_dtype else teacher
    else:
        encoders = student
    return student, teacher, encoders


def _attach_vfm(model: nn.Module, vfm_cfg: dict) -> object:
    """Attach the VFM discriminator's backbone and heads as the algorithm does at ``Event.INIT`` (no weights read)."""
    from senseflow_algos.algorithms.vfm_discriminator import VFMDiscriminator

    vfm = VFMDiscriminator(**{**vfm_cfg, 'pretrained': False})
    optimizer = types.SimpleNamespace(add_param_group=lambda group: None)
    vfm._attach(model, types.SimpleNamespace(optimizers=[optimizer]))
    return vfm


def build_meta_model(settings: RunSettings) -> MetaModel:
    """Build every network of the run on the meta device."""
    with quiet_diffusers():
        return _build_meta_model(settings)


def _build_meta_model(settings: RunSettings) -> MetaModel:
    from senseflow_algos.models.dmd import DMDModel
    from senseflow_algos.models.families import get_family
    from senseflow_algos.models.fsdp import prepare_for_fsdp
    from senseflow_algos.models.lora import apply_lora

    family = get_family(settings.family, **settings.family_kwargs)
    student, teacher, encoders = _dtypes(settings)
    if settings.tiny:  # the factory builds tiny models in fp32 whatever model.dtype says
        student = teacher = encoders = torch.float32
        components = tiny_meta_components(family, settings.seed, settings.text_encoders, settings.vae_encoder)
    else:
        if not settings.pretrained:
            from senseflow_algos.config import ConfigError

            raise ConfigError('set model.pretrained (hub id or local diffusers folder) or model.tiny=true')
        components = meta_components(family, architecture_folder(settings.pretrained), student, teacher, encoders,
                                     settings.text_encoders, settings.vae_encoder)
    with torch.device('meta'):
        if settings.lora is not None:
            apply_lora(components.student, **settings.lora)
        model = DMDModel(family, components, resolution=settings.resolution, gen_every=settings.gen_every,
                         backsim_prob=settings.backsim_prob, seed=settings.seed, num_steps=settings.num_steps)
        vfm = _attach_vfm(model, settings.vfm) if settings.vfm is not None else None
    prepare_for_fsdp(model, torch.device('meta'))
    networks = [Network(name, getattr(model, name), sharded=True, trained=name != 'teacher',
                        wrap_fn=getattr(model, name).fsdp_wrap_fn,
                        checkpoint_fn=getattr(getattr(model, name), 'activation_checkpointing_fn', None))
                for name in ('teacher', 'generator', 'fake_score')]
    if vfm is not None:
        networks.append(Network('discriminator', model.discriminator, sharded=True, trained=True))
    networks.append(Network('vae', model.vae, sharded=False, trained=False))
    if model.conditioner is not None:
        for name, child in model.conditioner.named_children():
            networks.append(Network(f'conditioner.{name}', child, sharded=False, trained=False))
    if vfm is not None:
        networks.append(Network('vfm_backbone', model.vfm_backbone, sharded=False, trained=False))
    return MetaModel(model, vfm, networks, student, teacher, encoders)
