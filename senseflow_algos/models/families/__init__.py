"""Teacher families behind one interface.

Adding a family is one module in this package with a :class:`ModelFamily` subclass that sets ``name``: every module
here is imported when the package is, and each such subclass is registered in :data:`FAMILIES` under its name
(``model.family`` in YAML). Nothing outside the module names the family.
"""

import importlib
import pkgutil

from senseflow_algos.models.families.base import (
    DEFAULT_NUM_STEPS,
    UNIFORM_ANCHORS,
    Components,
    Conditioning,
    ExportError,
    MethodDefaults,
    ModelFamily,
    SchedulerExport,
)
from senseflow_algos.models.families.flux import FluxConditioner, FluxFamily
from senseflow_algos.models.families.sd35 import SD35Conditioner, SD35Family


def _discover() -> dict[str, type[ModelFamily]]:
    """Import every module of this package and collect its named :class:`ModelFamily` subclasses."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f'{__name__}.{info.name}')
    found: dict[str, type[ModelFamily]] = {}
    pending = list(ModelFamily.__subclasses__())
    while pending:
        cls = pending.pop(0)
        pending.extend(cls.__subclasses__())
        if not cls.name or not cls.__module__.startswith(f'{__name__}.'):
            continue
        if cls.name in found and found[cls.name] is not cls:
            raise TypeError(f'two families are named {cls.name!r}: {found[cls.name].__qualname__} and {cls.__qualname__}')
        found[cls.name] = cls
    return dict(sorted(found.items()))


#: ``model.family`` in YAML -> family class (every family module of this package).
FAMILIES: dict[str, type[ModelFamily]] = _discover()


def get_family(name: str, **kwargs) -> ModelFamily:
    """Instantiate the family registered as ``name`` (``model.family`` in YAML)."""
    if name not in FAMILIES:
        raise ValueError(f'model.family={name!r} is not a known family; choose one of {sorted(FAMILIES)}')
    return FAMILIES[name](**kwargs)


__all__ = [
    'Components', 'Conditioning', 'ExportError', 'MethodDefaults', 'ModelFamily', 'SchedulerExport', 'UNIFORM_ANCHORS',
    'DEFAULT_NUM_STEPS', 'FAMILIES', 'get_family', 'FluxFamily', 'FluxConditioner', 'SD35Family', 'SD35Conditioner'
]
