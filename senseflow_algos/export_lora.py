"""Export of a LoRA-trained student (``model.lora``): a fused transformer, and a diffusers-format LoRA file.

A student trained with ``model.lora`` is the frozen base transformer (the teacher's weights; FLUX: without the guidance
embedding) plus PEFT adapters. :func:`senseflow_algos.export.export_pipeline` calls this module when the generator
carries adapters, and ships it two ways:

* a full pipeline whose transformer has the adapters merged (:func:`fused_copy`: a copy, the live model is untouched);
* ``<out>/lora/pytorch_lora_weights.safetensors``, written with the pipeline class's own ``save_lora_weights`` from
  peft's ``get_peft_model_state_dict`` (keys ``transformer.<module>.lora_A.weight`` / ``lora_B``, the adapter's
  ``LoraConfig``, rank and alpha, in the file's metadata), which ``FluxPipeline.load_lora_weights`` /
  ``StableDiffusion3Pipeline.load_lora_weights`` accept on the teacher's own pipeline, plus ``<out>/lora/scheduler``,
  the student's scheduler.

FLUX: the student has no guidance embedding (``guidance_embeds=False``, as the reference trains and ships it), the
teacher's transformer has one, and FluxPipeline feeds it whenever the config says so. The adapters never touch the
guidance layers (they are not in the student at all), so the LoRA loads onto the teacher's weights; the teacher's
transformer is loaded with ``guidance_embeds=False`` (diffusers then skips the guidance-embedding weights), which is
the student's base exactly. :func:`load_lora_pipeline` does all of this; ``senseflow_export.json`` records it under
``lora``.

Example:
    >>> pipe = load_lora_pipeline('black-forest-labs/FLUX.1-dev', 'export/lora')   # or by hand:
    >>> transformer = FluxTransformer2DModel.from_pretrained(teacher, subfolder='transformer', guidance_embeds=False)
    >>> pipe = FluxPipeline.from_pretrained(teacher, transformer=transformer)
    >>> pipe.load_lora_weights('export/lora')
    >>> pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained('export/lora', subfolder='scheduler')
    >>> pipe(prompt, **info['call_kwargs'])
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

__all__ = ['LORA_FOLDER', 'LORA_WEIGHTS', 'ADAPTER', 'has_lora', 'fused_copy', 'lora_state_dict', 'save_lora',
           'load_lora_pipeline']

#: Subfolder of an export holding the LoRA file and the student's scheduler.
LORA_FOLDER = 'lora'
#: diffusers' default LoRA file name (``load_lora_weights(folder)`` finds it without ``weight_name``).
LORA_WEIGHTS = 'pytorch_lora_weights.safetensors'
#: The adapter name :func:`senseflow_algos.models.lora.apply_lora` creates (diffusers' ``add_adapter`` default).
ADAPTER = 'default'


def has_lora(net: nn.Module) -> bool:
    """Whether ``net`` carries PEFT adapters (a student trained with ``model.lora``)."""
    return bool(getattr(net, 'peft_config', None))


def _check(net: nn.Module) -> None:
    configs = getattr(net, 'peft_config', None) or {}
    if list(configs) != [ADAPTER]:
        raise ValueError(f'expected exactly one LoRA adapter named {ADAPTER!r} on the generator, found '
                         f'{sorted(configs)}')


def fused_copy(net: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """A copy of ``net`` with its LoRA adapters merged into the base weights and the PEFT layers removed.

    The merge is peft's (``W + scale * B @ A``, computed in the adapters' fp32 and cast to the base's dtype), through
    diffusers' ``fuse_lora`` / ``unload_lora``. ``net`` itself is not changed.

    Args:
        net: A diffusers transformer with one adapter.
        dtype: Cast the fused copy to this dtype. Default: the base weights' dtype.
    """
    _check(net)
    fused = copy.deepcopy(net)
    fused.fuse_lora(lora_scale=1.0)
    fused.unload_lora()
    if dtype is not None:
        fused = fused.to(dtype)
    if any('lora_' in k for k in fused.state_dict()):
        raise RuntimeError('LoRA layers remain after fusing; the peft / diffusers versions do not unload them')
    return fused.requires_grad_(False)


def lora_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """peft's ``get_peft_model_state_dict`` of the adapter (keys ``<module>.lora_A.weight``), detached, on the CPU."""
    from peft.utils import get_peft_model_state_dict

    _check(net)
    state = get_peft_model_state_dict(net, adapter_name=ADAPTER)
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_lora(pipeline_class: type, net: nn.Module, scheduler, out: str | Path, network: str = 'transformer') -> Path:
    """Write ``net``'s adapter as a diffusers LoRA folder (``pytorch_lora_weights.safetensors``, ``scheduler/``).

    Args:
        pipeline_class: ``FluxPipeline`` or ``StableDiffusion3Pipeline`` (their ``save_lora_weights`` sets the
            ``transformer.`` key prefix their ``load_lora_weights`` expects).
        net: The generator with its adapter.
        scheduler: The student's scheduler (saved under ``scheduler/``).
        out: The LoRA folder.

    Returns:
        Path: The LoRA file.
    """
    out = Path(out)
    metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in net.peft_config[ADAPTER].to_dict().items()}
    pipeline_class.save_lora_weights(out, weight_name=LORA_WEIGHTS, safe_serialization=True,
                                     **{f'{network}_lora_layers': lora_state_dict(net),
                                        f'{network}_lora_adapter_metadata': metadata})
    scheduler.save_pretrained(out / 'scheduler')
    return out / LORA_WEIGHTS


def lora_info(family, net: nn.Module, teacher: Optional[nn.Module], folder: str | Path,
              scheduler_config: dict[str, Any]) -> dict[str, Any]:
    """The ``lora`` section of ``senseflow_export.json``: where the file is and how to load it.

    The LoRA's base is the teacher's network with the family's ``lora_base_overrides`` (FLUX: no guidance
    embedding) in the family's pipeline.
    """
    cfg = net.peft_config[ADAPTER]
    overrides = dict(family.lora_base_overrides)
    base = next((getattr(m.config, '_name_or_path', None) for m in (teacher, net)
                 if m is not None and getattr(m.config, '_name_or_path', None)), None)
    sub, pipeline = family.network_subfolder, family.pipeline_class
    if overrides:
        args = ', '.join(f'{k}={v!r}' for k, v in overrides.items())
        load = (f"{sub} = {family.network_class}.from_pretrained(BASE, subfolder={sub!r}, {args}); "
                f'pipe = {pipeline}.from_pretrained(BASE, {sub}={sub})')
    else:
        load = f'pipe = {pipeline}.from_pretrained(BASE)'
    scheduler_class = scheduler_config.get('_class_name', 'FlowMatchEulerDiscreteScheduler')
    return {
        'folder': Path(folder).name,
        'weights': f'{Path(folder).name}/{LORA_WEIGHTS}',
        'rank': int(cfg.r),
        'alpha': float(cfg.lora_alpha),
        'target_modules': sorted(cfg.target_modules),
        'base_model': base,
        'base_transformer_overrides': overrides,
        'scheduler_config': {k: v for k, v in scheduler_config.items() if not k.startswith('_')},
        'how': (f'{load}; pipe.load_lora_weights(EXPORT/{Path(folder).name!r}); '
                f"pipe.scheduler = {scheduler_class}.from_pretrained(EXPORT/{Path(folder).name!r}, "
                "subfolder='scheduler'); pipe(prompt, **call_kwargs)"),
    }


def write_lora_export(model, net: nn.Module, pipeline_class: type, scheduler, out: Path) -> dict[str, Any]:
    """Write ``<out>/lora`` for the LoRA generator ``net`` of ``model``; returns the json's ``lora`` section."""
    folder = out / LORA_FOLDER
    save_lora(pipeline_class, net, scheduler, folder, model.family.network_subfolder)
    return lora_info(model.family, net, getattr(model, 'teacher', None), folder,
                     {'_class_name': type(scheduler).__name__, **dict(scheduler.config)})


def load_lora_pipeline(base: str | Path, export: str | Path, torch_dtype: Optional[torch.dtype] = None):
    """The teacher's pipeline from ``base`` with the exported LoRA loaded and the student's scheduler.

    Args:
        base: The teacher (hub id or diffusers folder), the ``base_model`` of the export.
        export: The export folder (holding ``senseflow_export.json`` and ``lora/``).
        torch_dtype: Passed to ``from_pretrained``.

    Returns:
        The pipeline; call it with ``senseflow_export.json``'s ``call_kwargs``.
    """
    import diffusers

    from senseflow_algos.models.families import get_family

    export = Path(export)
    info = json.loads((export / 'senseflow_export.json').read_text())
    lora = info.get('lora')
    if not lora:
        raise ValueError(f'{export} holds no LoRA export (senseflow_export.json has no "lora" section): the student '
                         'was not trained with model.lora')
    cls = getattr(diffusers, info['pipeline_class'])
    kwargs: dict[str, Any] = {} if torch_dtype is None else {'torch_dtype': torch_dtype}
    family = get_family(info['family'])
    if lora['base_transformer_overrides']:
        kwargs[family.network_subfolder] = getattr(diffusers, family.network_class).from_pretrained(
            base, subfolder=family.network_subfolder, **lora['base_transformer_overrides'], **kwargs)
    pipe = cls.from_pretrained(base, **kwargs)
    pipe.load_lora_weights(str(export / lora['folder']))
    scheduler_dir = export / lora['folder'] / 'scheduler'
    scheduler_class = json.loads((scheduler_dir / 'scheduler_config.json').read_text())['_class_name']
    pipe.scheduler = getattr(diffusers, scheduler_class).from_pretrained(str(export / lora['folder']),
                                                                        subfolder='scheduler')
    return pipe
