"""Published architecture configs of the supported teachers, and networks built from them on the meta device.

The package ships the ``config.json`` files (no weights) of FLUX.1-dev, SD 3.5 Large and SD 3.5 Medium laid out as
diffusers pipeline folders (``architectures/<name>/model_index.json`` + ``<component>/config.json``), and DINOv2-L's
timm config (``architectures/dinov2-vitl14/config.json``). :func:`architecture_folder` maps ``model.pretrained`` (a
hub id of these, or a local pipeline folder, which is read from its own configs) to a folder, and
:func:`meta_components` builds the family's :class:`~senseflow_algos.models.families.Components` from it on the meta
device, the way the family's ``load_components`` assembles them from real weights.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

from senseflow_algos.config import ConfigError
from senseflow_algos.models.families import Components, ModelFamily
from senseflow_algos.models.families.base import drop_vae_encoder

__all__ = ['ARCHITECTURES_DIR', 'HUB_IDS', 'DINOV2_CONFIG', 'architecture_folder', 'build_component',
           'meta_components', 'component_classes', 'quiet_diffusers']

#: Folder of the shipped architecture configs.
ARCHITECTURES_DIR = Path(__file__).resolve().parent / 'architectures'
#: Hub ids of the published teachers -> shipped folder names (each folder's ``hub_id`` file names its teacher).
HUB_IDS = {(d / 'hub_id').read_text().strip(): d.name
           for d in sorted(ARCHITECTURES_DIR.iterdir()) if (d / 'hub_id').is_file()}
#: timm config of DINOv2 ViT-L/14 (``vit_large_patch14_dinov2.lvd142m``), the VFM discriminator's default backbone.
DINOV2_CONFIG = ARCHITECTURES_DIR / 'dinov2-vitl14' / 'config.json'


@contextlib.contextmanager
def quiet_diffusers() -> Iterator[None]:
    """Silence diffusers' warning on every ``.to(dtype)`` of a model built from a config (planning casts on purpose)."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()  # also configures diffusers' root logger, which would reset a level set now
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def architecture_folder(pretrained: str) -> Path:
    """The pipeline folder whose configs describe ``model.pretrained``.

    Raises:
        ConfigError: ``pretrained`` is neither a shipped hub id nor a folder with a ``model_index.json``.
    """
    if pretrained in HUB_IDS:
        return ARCHITECTURES_DIR / HUB_IDS[pretrained]
    folder = Path(pretrained).expanduser()
    if (folder / 'model_index.json').is_file():
        return folder
    raise ConfigError(f'model.pretrained={pretrained!r}: the planner knows the architectures of {sorted(HUB_IDS)} '
                      'and reads any local diffusers pipeline folder (with a model_index.json); this is neither')


def component_classes(folder: Path) -> dict[str, tuple[str, str]]:
    """``model_index.json`` of ``folder``: component name -> ``(library, class name)`` (null entries left out)."""
    index = json.loads((folder / 'model_index.json').read_text())
    return {k: tuple(v) for k, v in index.items() if not k.startswith('_') and isinstance(v, list) and v[0]}


def build_component(folder: Path, name: str, dtype: torch.dtype) -> nn.Module:
    """Component ``name`` of the pipeline folder, built from its ``config.json`` on the current default device (call it
    under ``torch.device('meta')``), cast to ``dtype``, frozen and in eval mode."""
    classes = component_classes(folder)
    if name not in classes:
        raise ConfigError(f'{folder}/model_index.json has no component {name!r} (has {sorted(classes)})')
    library, class_name = classes[name]
    sub = folder / name
    if not (sub / 'config.json').is_file():
        raise ConfigError(f'{sub}/config.json is missing: the planner builds {name} from it')
    if library == 'diffusers':
        import diffusers

        cls = getattr(diffusers, class_name)
        module = cls.from_config(cls.load_config(sub))
    elif library == 'transformers':
        import transformers

        cls = getattr(transformers, class_name)
        module = cls(cls.config_class.from_pretrained(sub))
    else:
        raise ConfigError(f'{folder}/model_index.json: {name} comes from {library!r}, not diffusers or transformers')
    return module.to(dtype).requires_grad_(False).eval()


def meta_components(family: ModelFamily, folder: Path, student_dtype: torch.dtype, teacher_dtype: torch.dtype,
                    encoder_dtype: torch.dtype, text_encoders: bool = True, vae_encoder: bool = True) -> Components:
    """The family's components built from ``folder``'s configs on the meta device (no weight is read).

    Mirrors :meth:`~senseflow_algos.models.families.ModelFamily.load_components`: the teacher is the family's
    network, the student its ``student_from_teacher`` (FLUX: without guidance embedding; others: a copy); the
    conditioner holds the text encoders (no tokenizers: the planner feeds token ids).
    """
    with torch.device('meta'):
        teacher = build_component(folder, family.network_subfolder, teacher_dtype)
        try:
            family.check_teacher(teacher, str(folder))
        except ValueError as e:
            raise ConfigError(str(e)) from e
        student = family.student_from_teacher(teacher, student_dtype)
        student.requires_grad_(True).train()
        vae = build_component(folder, 'vae', encoder_dtype)
        conditioner = None
        if text_encoders:
            modules = {name: None if name.startswith('tokenizer') else build_component(folder, name, encoder_dtype)
                       for name in family.text_components}
            conditioner = family.make_conditioner(modules, family.max_sequence_length)
    scheduler = folder / 'scheduler' / 'scheduler_config.json'
    return Components(teacher=teacher, student=student, vae=vae if vae_encoder else drop_vae_encoder(vae),
                      conditioner=conditioner,
                      scheduler_config=json.loads(scheduler.read_text()) if scheduler.is_file() else {})


def tiny_meta_components(family: ModelFamily, seed: int, text_encoders: bool, vae_encoder: bool,
                         student_dtype: Optional[torch.dtype] = None) -> Components:
    """``model.tiny: true``: the family's own tiny builders, run on the meta device (same classes and sizes)."""
    with torch.device('meta'):
        components = family.tiny_components(seed=seed, text_encoders=text_encoders, vae_encoder=vae_encoder)
    if student_dtype is not None:
        components.student.to(student_dtype)
    return components


def accepts(function, name: str) -> bool:
    """Whether ``function`` takes a keyword ``name`` (keys other helpers add: read them only where they exist)."""
    return name in inspect.signature(function).parameters
