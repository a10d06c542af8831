"""Model factory: the ``model:`` section of a run YAML -> :class:`DMDModel`."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from senseflow_algos.models.dmd import DMDModel
from senseflow_algos.models.families import get_family
from senseflow_algos.models.lora import apply_lora

__all__ = ['build_dmd_model', 'build_encoders', 'DTYPES']

DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def build_dmd_model(family: str, resolution: int, pretrained: Optional[str] = None, tiny: bool = False,
                    revision: Optional[str] = None, dtype: str = 'fp32', teacher_dtype: Optional[str] = None,
                    gen_every: int = 5, backsim_prob: float = 0.5, dmd_guidance: Sequence[float] = (1.0, 8.0),
                    family_kwargs: Optional[dict[str, Any]] = None, seed: int = 0, text_encoders: bool = True,
                    vae_encoder: bool = True, lora: Optional[dict[str, Any]] = None) -> DMDModel:
    """Build a DMD model for a teacher family.

    Args:
        family (str): ``flux`` or ``sd35``.
        resolution (int): Training image side.
        pretrained (str, optional): Hub id or local diffusers pipeline folder of the teacher.
        tiny (bool): Build random-weight tiny components of the same classes instead (CPU tests, demos).
        revision (str, optional): Hub revision.
        dtype (str): Dtype of generator, fake score, VAE and text encoders (``fp32``, ``bf16``, ``fp16``).
            Default: ``fp32`` (Composer's ``amp_bf16`` autocasts the compute).
        teacher_dtype (str, optional): Dtype of the frozen teacher. Default: same as ``dtype``.
        gen_every, backsim_prob, dmd_guidance, seed: See :class:`DMDModel`.
        family_kwargs (dict, optional): Extra arguments of the family class (e.g. SD 3.5's ``shift``).
        text_encoders (bool): Load the text encoders. ``False`` for training on precomputed embeddings
            (``dataset.kind: precomputed``): the model then has no conditioner. Default: ``True``.
        vae_encoder (bool): Keep the VAE's encoder. ``False`` for training on precomputed latents (the decoder
            stays, for the VFM discriminator and sampling). Default: ``True``.
        lora (dict, optional): Train LoRA adapters of generator and fake score instead of all weights: keyword
            arguments of :func:`~senseflow_algos.models.lora.apply_lora` (``rank``, ``alpha``, ``target_modules``,
            ``dropout``). Default: ``None`` (full fine-tuning, as the paper).
    """
    fam = get_family(family, **(family_kwargs or {}))
    if tiny:
        components = fam.tiny_components(seed=seed, text_encoders=text_encoders, vae_encoder=vae_encoder)
    elif pretrained:
        for key, value in (('model.dtype', dtype), ('model.teacher_dtype', teacher_dtype)):
            if value is not None and value not in DTYPES:
                raise ValueError(f'{key}={value!r} is not one of {sorted(DTYPES)}')
        components = fam.load_components(pretrained, torch_dtype=DTYPES[dtype],
                                         teacher_dtype=DTYPES[teacher_dtype] if teacher_dtype else None,
                                         revision=revision, text_encoders=text_encoders, vae_encoder=vae_encoder)
    else:
        raise ValueError('set model.pretrained (hub id or local diffusers folder) or model.tiny=true')
    if lora is not None:
        apply_lora(components.student, **lora)  # the fake score is copied from the student, adapters included
    return DMDModel(fam, components, resolution=resolution, gen_every=gen_every, backsim_prob=backsim_prob,
                    dmd_guidance=dmd_guidance, seed=seed)


def build_encoders(family: str, pretrained: Optional[str] = None, tiny: bool = False, revision: Optional[str] = None,
                   dtype: str = 'fp32', family_kwargs: Optional[dict[str, Any]] = None, seed: int = 0):
    """The family, its conditioner (text encoders) and its VAE alone, loaded as :func:`build_dmd_model` would load
    them (same weights for the same arguments): what ``data_prep/precompute.py`` encodes with.

    Returns:
        ``(family, conditioner, vae)``, frozen, in eval mode.
    """
    fam = get_family(family, **(family_kwargs or {}))
    if tiny:
        conditioner, vae = fam.tiny_encoders(seed=seed)
    elif pretrained:
        if dtype not in DTYPES:
            raise ValueError(f'dtype={dtype!r} is not one of {sorted(DTYPES)}')
        conditioner, vae = fam.load_encoders(pretrained, torch_dtype=DTYPES[dtype], revision=revision)
    else:
        raise ValueError('give a pretrained teacher (hub id or local diffusers folder) or tiny=True')
    return fam, conditioner.requires_grad_(False).eval(), vae.requires_grad_(False).eval()
