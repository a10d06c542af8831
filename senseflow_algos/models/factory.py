"""Model factory: the ``model:`` section of a run YAML -> :class:`DMDModel`."""

from __future__ import annotations

from typing import Any, Optional

import torch

from senseflow_algos.dtypes import DTYPES
from senseflow_algos.models.blocks import TRANSFORMER_NETWORKS, transformer_blocks
from senseflow_algos.models.dmd import DMDModel
from senseflow_algos.models.families import get_family
from senseflow_algos.models.lora import apply_lora

__all__ = ['build_dmd_model', 'build_encoders', 'compile_transformer_blocks', 'DTYPES']


def build_dmd_model(family: str, resolution: int, pretrained: Optional[str] = None, tiny: bool = False,
                    revision: Optional[str] = None, dtype: str = 'fp32', teacher_dtype: Optional[str] = None,
                    encoder_dtype: Optional[str] = None, family_kwargs: Optional[dict[str, Any]] = None,
                    seed: int = 0, text_encoders: bool = True, vae_encoder: bool = True,
                    lora: Optional[dict[str, Any]] = None, transformers_on_meta: bool = False,
                    compile_blocks: bool = False, **dmd_kwargs: Any) -> DMDModel:
    """Build a DMD model for a teacher family.

    Args:
        family (str): ``flux`` or ``sd35``.
        resolution (int): Training image side.
        pretrained (str, optional): Hub id or local diffusers pipeline folder of the teacher.
        tiny (bool): Build random-weight tiny components of the same classes instead (CPU tests, demos).
        revision (str, optional): Hub revision.
        dtype (str): Dtype of the trained networks, generator and fake score (``fp32``, ``bf16``, ``fp16``).
            Default: ``fp32`` (master weights; Composer's ``amp_bf16`` autocasts the compute).
        teacher_dtype (str, optional): Dtype of the frozen teacher. Default: same as ``dtype``.
        encoder_dtype (str, optional): Dtype of the frozen VAE and text encoders. Default: ``teacher_dtype`` if set,
            else ``dtype``.
        seed (int): Seed of the tiny weights and of the model's noise streams. Default: ``0``.
        family_kwargs (dict, optional): Extra arguments of the family class (e.g. SD 3.5's ``shift``).
        text_encoders (bool): Load the text encoders. ``False`` for training on precomputed embeddings
            (``dataset.kind: precomputed``): the model then has no conditioner. Default: ``True``.
        vae_encoder (bool): Keep the VAE's encoder. ``False`` for training on precomputed latents (the decoder
            stays, for the VFM discriminator and sampling). Default: ``True``.
        lora (dict, optional): Train LoRA adapters of generator and fake score instead of all weights: keyword
            arguments of :func:`~senseflow_algos.models.lora.apply_lora` (``rank``, ``alpha``, ``target_modules``,
            ``dropout``). Default: ``None`` (full fine-tuning, as the paper).
        transformers_on_meta (bool): Read no transformer weight: teacher, generator and fake score are built on the
            meta device from the teacher's config and receive their weights from global rank 0 when FSDP wraps them
            (the lean start; :func:`~senseflow_algos.models.fsdp.lean_start` decides). VAE and text encoders are
            loaded all the same. Needs ``pretrained``. Default: ``False``.
        compile_blocks (bool): ``torch.compile`` every transformer block of generator, fake score and teacher in
            place (:func:`compile_transformer_blocks`); compiled on first call, after FSDP has wrapped them.
            Default: ``False`` (eager).
        **dmd_kwargs: Further keyword arguments of :class:`DMDModel` (``gen_every``, ``backsim_prob``,
            ``dmd_guidance``, ``num_steps``); one left out takes the model's default, its one definition.
    """
    fam = get_family(family, **(family_kwargs or {}))
    if tiny:
        if transformers_on_meta:
            raise ValueError('transformers_on_meta is for loading model.pretrained; tiny models are built in full')
        components = fam.tiny_components(seed=seed, text_encoders=text_encoders, vae_encoder=vae_encoder)
    elif pretrained:
        torch_dtype, teacher, encoders = _resolve_dtypes(dtype, teacher_dtype, encoder_dtype)
        components = fam.load_components(pretrained, torch_dtype=torch_dtype, teacher_dtype=teacher,
                                         encoder_dtype=encoders, revision=revision, text_encoders=text_encoders,
                                         vae_encoder=vae_encoder, transformers_on_meta=transformers_on_meta)
    else:
        raise ValueError('set model.pretrained (hub id or local diffusers folder) or model.tiny=true')
    if not isinstance(compile_blocks, bool):
        raise ValueError(f'model.compile_blocks={compile_blocks!r} must be true or false')
    if lora is not None:
        apply_lora(components.student, **lora)  # the fake score is copied from the student, adapters included
    model = DMDModel(fam, components, resolution=resolution, seed=seed, **dmd_kwargs)
    if compile_blocks:  # after DMDModel deep-copies the fake score from the student: a copy would share no compile
        compile_transformer_blocks(model)
    return model


def compile_transformer_blocks(model: DMDModel, **compile_kwargs: Any) -> int:
    """Compile each ``transformer_blocks`` / ``single_transformer_blocks`` entry of generator, fake score and teacher.

    Uses ``nn.Module.compile`` (in place), not ``torch.compile(module)``: the block keeps its class, its parameters and
    its state-dict keys (no ``_orig_mod.`` wrapper), so ``prepare_for_fsdp``'s per-block ``isinstance`` wrap and
    activation-checkpointing hooks, checkpoints, LoRA export and the phased closures see the same modules as in eager
    mode. Only the block's ``__call__`` goes through dynamo; compilation happens at the first call of each block
    (inside FSDP's and the checkpoint wrapper's forward), and identical blocks share one compiled graph.

    Args:
        model (DMDModel): The model, before the Trainer wraps it.
        **compile_kwargs: Keyword arguments of ``torch.compile`` (e.g. ``mode``). Default: none.

    Returns:
        The number of blocks compiled.
    """
    count = 0
    for name in TRANSFORMER_NETWORKS:
        for block in transformer_blocks(getattr(model, name)):
            block.compile(**compile_kwargs)
            count += 1
    if not count:
        raise TypeError(f'model.compile_blocks: {type(model.generator).__name__} has no transformer_blocks to compile')
    return count


def build_encoders(family: str, pretrained: Optional[str] = None, tiny: bool = False, revision: Optional[str] = None,
                   dtype: str = 'fp32', family_kwargs: Optional[dict[str, Any]] = None, seed: int = 0,
                   teacher_dtype: Optional[str] = None, encoder_dtype: Optional[str] = None):
    """The family, its conditioner (text encoders) and its VAE alone, loaded as :func:`build_dmd_model` would load
    them (same weights and dtype for the same arguments): what ``data_prep/precompute.py`` encodes with.

    The dtype is resolved as in :func:`build_dmd_model`: ``encoder_dtype``, else ``teacher_dtype``, else ``dtype``
    (``data_prep/precompute.py`` passes its ``--dtype`` as ``dtype``).

    Returns:
        ``(family, conditioner, vae)``, frozen, in eval mode.
    """
    fam = get_family(family, **(family_kwargs or {}))
    if tiny:
        conditioner, vae = fam.tiny_encoders(seed=seed)
    elif pretrained:
        encoders = _resolve_dtypes(dtype, teacher_dtype, encoder_dtype)[2]
        conditioner, vae = fam.load_encoders(pretrained, torch_dtype=encoders, revision=revision)
    else:
        raise ValueError('give a pretrained teacher (hub id or local diffusers folder) or tiny=True')
    return fam, conditioner.requires_grad_(False).eval(), vae.requires_grad_(False).eval()


def _resolve_dtypes(dtype: str, teacher_dtype: Optional[str],
                    encoder_dtype: Optional[str]) -> tuple[torch.dtype, torch.dtype, torch.dtype]:
    """``(student, teacher, encoders)`` torch dtypes: the teacher defaults to ``dtype``, the encoders to the teacher."""
    for key, value in (('model.dtype', dtype), ('model.teacher_dtype', teacher_dtype),
                       ('model.encoder_dtype', encoder_dtype)):
        if value is not None and value not in DTYPES:
            raise ValueError(f'{key}={value!r} is not one of {sorted(DTYPES)}')
    teacher = teacher_dtype or dtype
    return DTYPES[dtype], DTYPES[teacher], DTYPES[encoder_dtype or teacher]
