"""Teacher families behind one interface. Adding a family: one file with a :class:`ModelFamily` subclass,
registered in :data:`FAMILIES`."""

from senseflow_algos.models.families.base import (
    DEFAULT_NUM_STEPS,
    UNIFORM_ANCHORS,
    Components,
    Conditioning,
    ModelFamily,
)
from senseflow_algos.models.families.flux import FluxConditioner, FluxFamily
from senseflow_algos.models.families.sd35 import SD35Conditioner, SD35Family

#: ``model.family`` in YAML -> family class.
FAMILIES: dict[str, type[ModelFamily]] = {FluxFamily.name: FluxFamily, SD35Family.name: SD35Family}


def get_family(name: str, **kwargs) -> ModelFamily:
    """Instantiate the family registered as ``name`` (``model.family`` in YAML)."""
    if name not in FAMILIES:
        raise ValueError(f'model.family={name!r} is not a known family; choose one of {sorted(FAMILIES)}')
    return FAMILIES[name](**kwargs)


__all__ = [
    'Components', 'Conditioning', 'ModelFamily', 'UNIFORM_ANCHORS', 'DEFAULT_NUM_STEPS', 'FAMILIES', 'get_family', 'FluxFamily',
    'FluxConditioner', 'SD35Family', 'SD35Conditioner'
]
